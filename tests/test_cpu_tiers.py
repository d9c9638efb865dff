"""CPU kernel tiers: detection and forcing (pure functions), and every tier this machine
supports run in turn: the shape sweep of the quantised linear (tests/kernel_sweep.py) and the
kernel and quantisation tests, each in a subprocess with SPECDEC_CPU_ISA forced, so a kernel
that crashes fails a test with its signal instead of killing the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdec.kernels import cpu_isa, cpu_kernels

ROOT = Path(__file__).resolve().parent.parent
AVX2 = frozenset({"avx2", "fma", "f16c", "sse4_2"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
AMX = AVX512 | {"amx_tile", "amx_int8", "amx_bf16"}


# ---- detection and forcing -------------------------------------------------------------------
def test_tiers_follow_the_cpu_flags() -> None:
    assert cpu_isa.cpu_isas(AMX, "x86_64", amx_ok=True) == ("amx", "avx512", "avx2", "none")
    assert cpu_isa.cpu_isas(AMX, "x86_64", amx_ok=False) == ("avx512", "avx2", "none")  # tile data refused
    assert cpu_isa.cpu_isas(AVX512, "x86_64") == ("avx512", "avx2", "none")
    assert cpu_isa.cpu_isas(AVX512 - {"avx512_vnni"}, "x86_64") == ("avx2", "none")
    assert cpu_isa.cpu_isas(AVX2, "x86_64") == ("avx2", "none")
    assert cpu_isa.cpu_isas(AVX2 - {"fma"}, "x86_64") == ("none",)
    assert cpu_isa.cpu_isas(AMX, "aarch64") == ("none",)  # flags of another machine mean nothing


def test_choose_isa_takes_the_best_implemented_tier_or_refuses_a_forced_one() -> None:
    cpu = ("avx512", "avx2", "none")
    assert cpu_isa.choose_isa(None, cpu, implemented=("avx2", "none")) == "avx2"
    assert cpu_isa.choose_isa(None, cpu, implemented=("avx512", "avx2", "none")) == "avx512"
    assert cpu_isa.choose_isa("none", cpu) == "none"
    with pytest.raises(cpu_isa.IsaUnavailable, match="SPECDEC_CPU_ISA=amx: this CPU"):
        cpu_isa.choose_isa("amx", cpu)
    with pytest.raises(cpu_isa.IsaUnavailable, match="no avx512 kernels yet"):
        cpu_isa.choose_isa("avx512", cpu, implemented=("avx2", "none"))


def test_requested_isa_reads_the_environment() -> None:
    assert cpu_isa.requested_isa({}) is None
    assert cpu_isa.requested_isa({"SPECDEC_CPU_ISA": "auto"}) is None
    assert cpu_isa.requested_isa({"SPECDEC_CPU_ISA": " AVX2 "}) == "avx2"
    assert cpu_isa.requested_isa({"SPECDEC_NO_CPU_KERNELS": "1"}) == "none"
    with pytest.raises(cpu_isa.IsaUnavailable, match="choose one of auto, amx, avx512, avx2, none"):
        cpu_isa.requested_isa({"SPECDEC_CPU_ISA": "sse"})


def test_tier_builds_never_share_a_cache() -> None:
    flags = {isa: set(cpu_isa.COMPILE_FLAGS[isa]) for isa in cpu_isa.COMPILE_FLAGS}
    assert all(f"-DSPECDEC_ISA_{isa.upper()}" in flags[isa] for isa in flags)
    assert not any("native" in f for fs in flags.values() for f in fs)  # a tier's flags, not this CPU's
    # the extension's name (its cache folder) carries the tier
    assert "specdec_cpu_kernels_{isa}" in Path(cpu_kernels.__file__).read_text()


def test_active_isa_is_a_supported_tier() -> None:
    isa = cpu_kernels.active_isa()
    assert isa in cpu_isa.supported_isas()
    assert (cpu_kernels.extension() is None) == (isa == "none")


# ---- every supported tier, forced, in a subprocess --------------------------------------------
def _run(args: list[str], isa: str, timeout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPECDEC_CPU_ISA": isa}
    env.pop("SPECDEC_NO_CPU_KERNELS", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    """What went wrong, naming the signal when the process was killed (a crashing kernel)."""
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}\n{proc.stderr[-3000:]}"
    return f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_a_crashing_subprocess_is_reported_with_its_signal() -> None:
    proc = _run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], "none", 60)
    assert proc.returncode == -signal.SIGSEGV and _explain(proc).startswith("killed by SIGSEGV")


def test_the_sweep_fails_on_a_wrong_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's checks catch a kernel that returns one wrong row (mutation of the product)."""
    from specdec.target.quant import QuantWeight

    from . import kernel_sweep

    real = QuantWeight.forward

    def one_wrong_row(self: QuantWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = real(self, x, bias)
        if y.shape[0] > 5:
            y[5] += 1e-3 * (1.0 + y[5].abs())
        return y

    monkeypatch.setattr(QuantWeight, "forward", one_wrong_row)
    monkeypatch.setattr(kernel_sweep, "MS", (0, 1, 6, 9))
    monkeypatch.setattr(kernel_sweep, "KS", (40,))
    monkeypatch.setattr(kernel_sweep, "NS", (7,))
    report = kernel_sweep.sweep()
    assert report["num_failures"] and any("first bad row 5" in f for f in report["failures"])  # type: ignore[union-attr]


@pytest.mark.parametrize("isa", cpu_isa.supported_isas())
def test_shape_sweep_of_the_quantised_linear(isa: str) -> None:
    proc = _run([sys.executable, "-m", "tests.kernel_sweep"], isa, timeout=900)
    assert proc.returncode == 0, _explain(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa and report["checked"] > 10_000
    assert report["kernel"] == ("dequant" if isa == "none" else isa)


OTHER_TIERS = [i for i in cpu_isa.supported_isas() if i != cpu_kernels.active_isa()]


@pytest.mark.skipif(not OTHER_TIERS, reason="this machine supports only the tier the suite runs on")
@pytest.mark.parametrize("isa", OTHER_TIERS)
def test_kernel_and_quantisation_tests_pass_on_every_other_tier(isa: str) -> None:
    """The suite runs on the best tier; the kernel, quantisation and sampling-kernel tests run again
    per tier."""
    proc = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/test_cpu_kernels.py", "tests/test_quant.py", "tests/test_sampling_kernels.py"], isa,
                timeout=1800)
    assert proc.returncode == 0, _explain(proc)


def test_a_forced_tier_this_machine_cannot_run_stops_the_cli_with_one_line() -> None:
    proc = _run([sys.executable, "-m", "specdec.launch_server", "--port", "30999"], "sse9", timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "SPECDEC_CPU_ISA" in errors[0], proc.stderr


def test_every_tier_computes_the_same_int8_product_bitwise() -> None:
    """The int8 kernels of all tiers (and the AMX and VNNI paths of the amx tier, M >= 3 and < 3;
    int16 and int8 activation codes) compute exact int32 block sums and the same float steps:
    equal results, bit for bit."""
    tiers = [isa for isa in cpu_isa.supported_isas() if isa in cpu_kernels.W8_TILE]
    if len(tiers) < 2:
        pytest.skip(f"this machine runs only {tiers}")
    modules = {isa: cpu_kernels.build(isa) for isa in tiers}
    g = torch.Generator().manual_seed(0)
    for N, K in [(960, 576), (576, 1536), (33, 100), (7, 40)]:
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        scale, bias = torch.rand(N, generator=g) * 0.01, torch.randn(N, generator=g)
        for M in (1, 3, 4, 16, 17, 40):
            x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4
            for bits in (16, 8):  # w8a16's int16 and w8a8_int8's int8 activation codes
                ys = {isa: m.w8_linear(x, cpu_kernels.pack_w8(w, isa), scale, bias, bits) for isa, m in modules.items()}
                first = ys[tiers[0]]
                assert all(torch.equal(first, y) for y in ys.values()), (N, K, M, bits)


def test_every_tier_computes_the_same_int4_product_bitwise() -> None:
    """The int4 kernels of all tiers (AVX2's vpmaddwd over tiles of 8 channels, AVX-512's vpdpwssd
    over tiles of 16) take exact int32 group sums and the same float steps: equal results, bit
    for bit, on each tier's own layout of the same codes."""
    tiers = [isa for isa in cpu_isa.supported_isas() if isa in cpu_kernels.W4_TILE]
    if len(tiers) < 2:
        pytest.skip(f"this machine runs only {tiers}")
    modules = {isa: cpu_kernels.build(isa) for isa in tiers}
    g = torch.Generator().manual_seed(1)
    for N, K in [(960, 576), (576, 1536), (33, 128), (7, 64)]:
        q = torch.randint(0, 16, (N, K), generator=g)
        scale, low = torch.rand(N, K // 32, generator=g) * 0.02, -torch.rand(N, K // 32, generator=g) * 0.15
        packed = {isa: cpu_kernels.pack_w4(q, scale, low, isa) for isa in tiers}
        bias = torch.randn(N, generator=g)
        for M in (1, 3, 4, 5, 16, 17):
            x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 4
            ys = {isa: m.w4_linear(x, *packed[isa], N, bias) for isa, m in modules.items()}
            first = ys[tiers[0]]
            assert all(torch.equal(first, y) for y in ys.values()), (N, K, M)
