"""Quantisation of a loaded model (`--quantization w8a16 | w8a8_int8 | w4a16`).

Batch-1 decode streams every weight once per token, so fewer weight bytes is the main lever
on a CPU. After strict loading, every `Linear` (attention, MLP, the draft's fc, the lm_head;
for tied embeddings an int8 copy of the embedding serves as lm_head) and every routed expert
is replaced by its quantised form; activations, norms, attention and the KV cache keep the
model dtype.

* w8a16: int8, one symmetric scale per output channel (scale = max|w_row| / 127).
* w8a8_int8: the same int8 weights; the activations of every int8 linear are quantised to int8
  codes per row and block of 64 k on the fly, so that AVX-512 VNNI multiplies 4 k per
  instruction and row instead of 2 (multi-row products ~1.6x faster; docs/KERNELS.md). SGLang's
  `w8a8_int8` scales activations per token; blocks of 64 have less than half its logprob error
  on the bundled model (docs/PERFORMANCE.md).
* w4a16: int4, groups of 32 along K with a scale and a low value per group (asymmetric;
  llama.cpp's Q4_1 arrangement).

On the CPU they run on specdec's kernels for the active tier (kernels/cpu_isa.py), which take
float32 activations, quantise them to int16 codes per block (finer than bf16; int8 codes for
w8a8_int8) for integer dot products and handle any K (the packed weight is padded with zero
columns). Without a kernel tier (`SPECDEC_CPU_ISA=none`, a CPU without AVX2, another device)
the weight stays quantised in memory and is dequantised for each product (w8a8_int8's
activations rounded to the same int8 codes first): always correct, never faster. PyTorch's private
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are not used: the first crashes on
AVX-512 CPUs for K % 32 != 0.

Both are lossy; docs/PERFORMANCE.md records the logprob differences against the unquantised
model. Speculative output stays exactly the quantised model's own greedy output.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.kernels import cpu_kernels

from .layers import Linear

log = logging.getLogger("specdec")

QUANTIZATION_CHOICES = ("w8a16", "w8a8_int8", "w4a16")
W8_SCHEMES = ("w8a16", "w8a8_int8")
W4_GROUP = 32


def quantize_w8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scale [N]) with w ~= q * scale[:, None]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_w4(weight: Tensor, group: int = W4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """[N, K] float -> (uint4 codes as int32 [N, K], scale [N, K/g], zero [N, K/g]) with
    w ~= (q - 8) * scale + zero per group of `group` columns (PyTorch's int4 convention)."""
    N, K = weight.shape
    if K % group:
        raise ValueError(f"w4a16 needs in_features % {group} == 0, got {K}")
    w = weight.float().view(N, K // group, group)
    lo, hi = w.amin(-1), w.amax(-1)  # [N, K/g]
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(N, K), scale, lo + 8.0 * scale


class QuantWeight(nn.Module):
    """One quantised [N, K] weight and how to multiply by it on this device.

    `kernel` is the CPU kernel tier whose packed layout `qweight` holds (`cpu_kernels.active_isa()`,
    e.g. "avx2"), or "dequant" (codes as quantised, dequantised per product)."""

    qweight: Tensor  # int8 [N8, Kp] (pack_w8) | uint8 [N8, Kp/2] (pack_w4) | int8 / uint8 codes [N, K(p)]
    scale: Tensor  # float32 [N] (w8a16, w8a8_int8) | float16 (pack_w4) | float32 [N, Kp/g] (dequant w4)
    zero: Tensor
    _ext: Any

    def __init__(self, weight: Tensor, scheme: str) -> None:
        super().__init__()
        if scheme not in QUANTIZATION_CHOICES:
            raise ValueError(f"unknown quantization {scheme!r}; choose one of {QUANTIZATION_CHOICES}")
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        # the int8 linears' activation codes: int8 for w8a8_int8, else int16
        self.act_bits = 8 if scheme == "w8a8_int8" else 16
        self._ext = cpu_kernels.extension() if weight.device.type == "cpu" else None
        self.kernel = cpu_kernels.active_isa() if self._ext is not None else "dequant"
        self._no_bias = torch.empty(0)
        # zero columns up to a whole group: no effect on the product, any K works
        padded = F.pad(weight, (0, cpu_kernels.padded_k(self.in_features) - self.in_features))
        if scheme in W8_SCHEMES:
            q, scale = quantize_w8(padded)
            self.register_buffer("scale", scale, persistent=False)
            packed = cpu_kernels.pack_w8(q) if self._ext is not None else q
            self.register_buffer("qweight", packed, persistent=False)
            return
        q, scale, zero = quantize_w4(padded)
        if self._ext is not None:  # w = scale * q + low, float16 scale and low (Q4_1's layout)
            wq, ws = cpu_kernels.pack_w4(q, scale, zero - 8.0 * scale)
            self.register_buffer("qweight", wq, persistent=False)
            self.register_buffer("scale", ws, persistent=False)
        else:
            self.register_buffer("qweight", q.to(torch.uint8), persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            self.register_buffer("zero", zero, persistent=False)

    @property
    def packed(self) -> bool:
        """True when `qweight` is in a CPU kernel's layout (the fused layers can take it)."""
        return self._ext is not None

    def dequantized(self) -> Tensor:
        """The float32 [N, K] weight this module multiplies by (for references and tests)."""
        N, K = self.out_features, self.in_features
        if self.scheme in W8_SCHEMES:
            q = cpu_kernels.unpack_w8(self.qweight, N, K) if self.packed else self.qweight[:, :K]
            return q.float() * self.scale[:, None]
        if self.packed:
            return cpu_kernels.unpack_w4(self.qweight, self.scale, N, K, isa=self.kernel)
        Kp = self.qweight.shape[1]
        q = self.qweight.float().view(N, Kp // W4_GROUP, W4_GROUP)
        return ((q - 8.0) * self.scale[..., None] + self.zero[..., None]).view(N, Kp)[:, :K]

    def _kernel_linear(self, x: Tensor, bias: Tensor | None) -> Tensor:  # float32 [M, K] contiguous
        b = self._no_bias if bias is None else bias.float()
        if self.scheme in W8_SCHEMES:
            return self._ext.w8_linear(x, self.qweight, self.scale, b, self.act_bits)
        return self._ext.w4_linear(x, self.qweight, self.scale, self.out_features, b)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:  # [..., K] -> [..., N]
        if self.packed and x.dtype == torch.float32 and x.dim() == 2:  # the hot path
            return self._kernel_linear(x.contiguous(), bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.packed:
            y = self._kernel_linear(x2.float().contiguous(), bias)
            return y.to(x.dtype).view(*lead, self.out_features)
        if self.act_bits == 8:  # the int8 codes the kernels would multiply
            x2 = cpu_kernels.quantized_activations(x2.float(), self.act_bits).to(x.dtype)
        y = F.linear(x2, self.dequantized().to(x.dtype), None if bias is None else bias.to(x.dtype))
        return y.view(*lead, self.out_features)


class QuantLinear(nn.Module):
    """Drop-in for `Linear` after loading: same out_sizes, quantised weight."""

    def __init__(self, linear: Linear, scheme: str) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_sizes = linear.out_sizes
        self.qw = QuantWeight(linear.weight.data, scheme)
        self.bias: Tensor | None = linear.bias

    @classmethod
    def from_weight(cls, weight: Tensor, scheme: str) -> QuantLinear:
        linear = Linear(weight.shape[1], (weight.shape[0],))
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return cls(linear, scheme)

    def forward(self, x: Tensor) -> Tensor:
        return self.qw.forward(x, self.bias)


def quantize_module(model: nn.Module, scheme: str) -> int:
    """Replace every `Linear` below `model` by a `QuantLinear`, and quantise stacked experts.
    Returns how many weights were quantised."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, QuantLinear(child, scheme))
                count += 1
        quantize_experts = getattr(parent, "quantize", None)
        if callable(quantize_experts) and not isinstance(parent, QuantLinear):
            count += quantize_experts(scheme)
    return count


def quantize_model(model: nn.Module, scheme: str | None) -> None:
    """Quantise a loaded target (or draft) in place; `None` leaves it as loaded."""
    if scheme is None:
        return
    if scheme not in QUANTIZATION_CHOICES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATION_CHOICES)}")
    count = quantize_module(model, scheme)
    tie = getattr(model, "tie_lm_head", None)
    if callable(tie):
        tie(scheme)
        count += 1
    for m in model.modules():  # layers decide their fused-kernel weights again
        if hasattr(m, "_fused"):
            setattr(m, "_fused", None)  # noqa: B010
    kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantWeight)})
    log.info("quantized %d weights to %s (kernels: %s)", count, scheme, ", ".join(kernels))
