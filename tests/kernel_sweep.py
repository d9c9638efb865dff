"""The quantised linear over a sweep of shapes, against a float64 reference, for the CPU kernel
tier of this process (`SPECDEC_CPU_ISA`). Run in a subprocess by tests/test_cpu_tiers.py, so a
kernel that crashes fails that test (with the signal) instead of killing the test run.

    SPECDEC_CPU_ISA=avx2 python -m tests.kernel_sweep      # prints one JSON line, exit 1 on a miss

Shapes: M 0-64 rows; K and N that are and are not multiples of 8, 16 and 32. A packed tier is
held to the kernel's own arithmetic (int16 activation codes per block, int8 codes for w8a8_int8,
`w8_linear_reference` / `w4_linear_reference`); `none` (dequantised weight, torch's float32 linear) to the float64
product on the same weight. For packed tiers every row of the largest M must also equal that row
computed alone (bitwise), the property lossless speculation rests on (torch's own float32 linear
does not promise it: its one-row and many-row paths block the sums differently).
"""

from __future__ import annotations

import json
import sys

import torch

from specdec.kernels import cpu_kernels as ck
from specdec.target.quant import QUANTIZATION_CHOICES, W8_SCHEMES, QuantWeight

MS = tuple(range(0, 65))
KS = (8, 16, 24, 32, 40, 48, 64, 72, 100, 576)
NS = (1, 7, 8, 15, 16, 24, 31, 32, 33, 64)
TOL = 2e-5  # relative to the largest |output|: float32 accumulation against float64


def reference(qw: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    """What the product must be, in float64 (returned as float32 for packed tiers)."""
    if not qw.packed:  # w8a8_int8 multiplies the int8 activation codes, as the kernels do
        xin = ck.quantized_activations(x, 8) if qw.act_bits == 8 else x
        return (xin.double() @ qw.dequantized().double().T).float()
    if qw.scheme in W8_SCHEMES:
        q = ck.unpack_w8(qw.qweight, qw.out_features, qw.in_features)
        return ck.w8_linear_reference(x, q, qw.scale, act_bits=qw.act_bits)
    return ck.w4_linear_reference(x, qw.qweight, qw.scale, qw.out_features)


def sweep() -> dict[str, object]:
    torch.set_num_threads(1)
    failures: list[str] = []
    checked = 0
    for scheme in QUANTIZATION_CHOICES:
        for K in KS:
            for N in NS:
                g = torch.Generator().manual_seed(K * 1000 + N)
                qw = QuantWeight(torch.randn(N, K, generator=g), scheme)
                x_all = torch.randn(MS[-1], K, generator=g)
                for M in MS:
                    x = x_all[:M].contiguous()
                    y, ref = qw(x), reference(qw, x)
                    checked += 1
                    if y.shape != (M, N) or y.dtype != torch.float32:
                        failures.append(f"{scheme} M={M} K={K} N={N}: shape {tuple(y.shape)} {y.dtype}")
                        continue
                    if M == 0:
                        continue
                    err = (y - ref).abs().max().item()
                    if not err <= TOL * max(1.0, ref.abs().max().item()):  # also catches NaN
                        bad = int(((y - ref).abs().amax(1) > TOL * max(1.0, ref.abs().max().item())).nonzero()[0])
                        failures.append(f"{scheme} M={M} K={K} N={N}: max error {err:.3g} (first bad row {bad})")
                if not qw.packed:
                    continue
                full = qw(x_all)
                for m in range(x_all.shape[0]):
                    if not torch.equal(full[m : m + 1], qw(x_all[m : m + 1].contiguous())):
                        failures.append(f"{scheme} K={K} N={N}: row {m} of {x_all.shape[0]} differs from it alone")
                        break
    return {"isa": ck.active_isa(), "kernel": QuantWeight(torch.zeros(8, 32), "w8a16").kernel,
            "checked": checked, "failures": failures[:50], "num_failures": len(failures)}


def main() -> int:
    report = sweep()
    print(json.dumps(report))
    return 1 if report["num_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
