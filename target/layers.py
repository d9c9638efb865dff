"""Shared building blocks: norms, rotary embedding, linear layers that load shard by shard.

The linear layers keep checkpoint-to-parameter loading in `load_shard`, so a tensor-parallel
variant only has to slice the incoming tensor by rank; the model code does not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.kernels import cpu_kernels


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 like transformers."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            fast = cpu_kernels.extension() if x.device.type == "cpu" and x.dim() == 2 else None
            if fast is not None and not torch.is_grad_enabled():
                return fast.rms_norm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Llama 4's weightless QK norm over the last dim (fp32 inside)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RotaryEmbedding:
    """RoPE that rotates *adjacent* pairs (x[2i], x[2i+1]), Llama 4's layout.

    A dense Llama checkpoint (half-split pairs x[i], x[i + D/2]) is permuted at load time
    so the same rotation applies; q.k products are unchanged by that permutation.
    """

    def __init__(self, inv_freq: Sequence[float]) -> None:
        self.inv_freq = torch.tensor(list(inv_freq), dtype=torch.float32, device="cpu")

    def angles(self, positions: Tensor) -> Tensor:
        """positions [T] -> rotation angles [T, D/2] in fp32."""
        return positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] -> cos, sin [T, D/2] in fp32."""
        freqs = self.angles(positions)
        return torch.cos(freqs), torch.sin(freqs)

    def cis(self, positions: Tensor) -> Tensor:
        """positions [T] -> cos + i sin [T, D/2] complex64, for `apply_rope_cis`."""
        freqs = self.angles(positions)
        return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D]; cos/sin [T, D/2] -> rotated x, same dtype (fp32 math)."""
    xf = x.float().unflatten(-1, (-1, 2))  # [T, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_cis(x: Tensor, cis: Tensor) -> Tensor:
    """x [T, H, D] (last dim contiguous); cis [T, D/2] complex -> rotated x, same dtype.

    The same rotation as `apply_rope`, as one complex multiply: adjacent pairs are the real
    and imaginary parts. Used on the hot path (q and k of a layer in one call)."""
    T, H, D = x.shape
    xc = torch.view_as_complex(x.float().view(T, H, D // 2, 2))  # [T, H, D/2]
    return torch.view_as_real(xc * cis[:, None, :]).view(T, H, D).to(x.dtype)


class Linear(nn.Module):
    """y = x W^T (+ b) whose weight is assembled from one or more checkpoint shards.

    `out_sizes` lists the stacked projections along the output dim, e.g. (q, k, v) or
    (gate, up). Each shard is loaded with `load_shard(i, weight, bias)`.
    """

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        out = sum(self.out_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(self.out_sizes))]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def shard_shape(self, shard: int) -> tuple[int, int]:
        return (self.out_sizes[shard], self.in_features)

    def load_shard(self, shard: int, weight: Tensor, is_bias: bool = False) -> None:
        lo = self.offsets[shard]
        hi = lo + self.out_sizes[shard]
        if is_bias:
            assert self.bias is not None
            self.bias.data[lo:hi].copy_(weight)
        else:
            self.weight.data[lo:hi].copy_(weight)


class GatedMLP(nn.Module):
    """SiLU-gated MLP with fused gate|up: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = Linear(hidden_size, (intermediate_size, intermediate_size))
        self.down = Linear(intermediate_size, (hidden_size,))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)  # [T, I] each
        return self.down(F.silu(gate) * up)
