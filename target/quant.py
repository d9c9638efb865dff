"""Weight-only quantisation of a loaded model (`--quantization w8a16 | w4a16`).

Batch-1 decode streams every weight once per token, so fewer weight bytes is the main lever
on a CPU. After strict loading, every `Linear` (attention, MLP, the draft's fc, the lm_head;
for tied embeddings an int8 copy of the embedding serves as lm_head) and every routed expert
is replaced by its quantised form; activations, norms, attention and the KV cache keep the
model dtype.

* w8a16: int8, one symmetric scale per output channel (scale = max|w_row| / 127). On x86
  CPUs with AVX2 our kernel (kernels/csrc/w8_linear.cpp) takes float32 activations and
  quantises them to int16 per block of 32 for integer dot products (finer than bf16);
  elsewhere on the CPU PyTorch's `_weight_int8pack_mm` (bfloat16 activations); on other
  devices the weight is dequantised per call.
* w4a16: int4, groups of 32 along K with a scale and a low value per group (asymmetric;
  llama.cpp's Q4_1 arrangement). On AVX2 CPUs our kernel (kernels/csrc/w4_linear.cpp, float16
  scales, the same int16 activations); elsewhere on the CPU PyTorch's
  `_weight_int4pack_mm_for_cpu` (bfloat16 activations; a weight with K % 32 != 0 or
  N % 16 != 0 is then quantised to int8); dequantised on other devices.

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

QUANTIZATION_CHOICES = ("w8a16", "w4a16")
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
    """One quantised [N, K] weight and how to multiply by it on this device."""

    qweight: Tensor  # int8 [N8, K] (pack_w8) | uint8 [N8, K/2] (pack_w4) | int4pack | uint8 codes
    scale: Tensor  # float32 [N] (w8a16) | float16 (pack_w4) | float32 [N, K/g] (dequant)
    scale_bf16: Tensor
    scales_zeros: Tensor  # [K/g, N, 2] bf16 (int4pack)
    zero: Tensor
    _avx2: Any

    def __init__(self, weight: Tensor, scheme: str) -> None:
        super().__init__()
        if scheme not in QUANTIZATION_CHOICES:
            raise ValueError(f"unknown quantization {scheme!r}; choose one of {QUANTIZATION_CHOICES}")
        self.out_features, self.in_features = weight.shape
        cpu = weight.device.type == "cpu"
        # our AVX2 kernels (int8 and int4) need K % 32 == 0; None when unavailable
        self._avx2 = cpu_kernels.extension() if cpu and self.in_features % 32 == 0 else None
        if scheme == "w4a16" and self._avx2 is None and (self.in_features % W4_GROUP or self.out_features % 16):
            scheme = "w8a16"  # PyTorch's int4 packing needs K % 32 == 0, N % 16 == 0: keep int8
        self.scheme = scheme
        self.kernel = "dequant"
        self._no_bias = torch.empty(0)
        if scheme == "w8a16":
            q, scale = quantize_w8(weight)
            self.register_buffer("scale", scale, persistent=False)
            if self._avx2 is not None:
                self.kernel = "avx2"
                self.register_buffer("qweight", cpu_kernels.pack_w8(q), persistent=False)
            else:
                if cpu:
                    self.kernel = "int8pack"
                self.register_buffer("qweight", q, persistent=False)
                self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        else:
            q, scale, zero = quantize_w4(weight)
            if self._avx2 is not None:  # w = scale * q + low, float16 scale and low (Q4_1's layout)
                self.kernel = "avx2"
                wq, ws = cpu_kernels.pack_w4(q, scale, zero - 8.0 * scale)
                self.register_buffer("qweight", wq, persistent=False)
                self.register_buffer("scale", ws, persistent=False)
            elif cpu:
                self.kernel = "int4pack"
                packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
                sz = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()
                self.register_buffer("qweight", packed, persistent=False)
                self.register_buffer("scales_zeros", sz, persistent=False)  # [K/g, N, 2]
            else:
                self.register_buffer("qweight", q.to(torch.uint8), persistent=False)
                self.register_buffer("scale", scale, persistent=False)
                self.register_buffer("zero", zero, persistent=False)

    def dequantized(self) -> Tensor:
        """The float32 [N, K] weight this module multiplies by (for references and tests)."""
        if self.scheme == "w8a16":
            q = cpu_kernels.unpack_w8(self.qweight, self.out_features) if self.kernel == "avx2" else self.qweight
            return q.float() * self.scale[:, None]
        if self.kernel == "avx2":
            return cpu_kernels.unpack_w4(self.qweight, self.scale, self.out_features)
        if self.kernel == "int4pack":
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, W4_GROUP, self.scales_zeros).float().t()
        N, K = self.out_features, self.in_features
        q = self.qweight.float().view(N, K // W4_GROUP, W4_GROUP)
        return ((q - 8.0) * self.scale[..., None] + self.zero[..., None]).view(N, K)

    def _avx2_linear(self, x: Tensor, bias: Tensor | None) -> Tensor:  # float32 [M, K] contiguous
        b = self._no_bias if bias is None else bias.float()
        if self.scheme == "w8a16":
            return self._avx2.w8_linear(x, self.qweight, self.scale, b)
        return self._avx2.w4_linear(x, self.qweight, self.scale, self.out_features, b)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:  # [..., K] -> [..., N]
        if self.kernel == "avx2" and x.dtype == torch.float32 and x.dim() == 2:  # the hot path
            return self._avx2_linear(x.contiguous(), bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "avx2":
            y = self._avx2_linear(x2.float().contiguous(), bias)
            return y.to(x.dtype).view(*lead, self.out_features)
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.scale_bf16)
        elif self.kernel == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.qweight, W4_GROUP, self.scales_zeros
            )
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype))
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
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
