"""Per-layer K/V tensors indexed by slot (slot = page * page_size + offset).

The page allocator decides which slots a request owns; a pool only stores tensors. The
target and the draft each have their own pool over the same slot space, so one allocator
and one page table per request serve both.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVPool:
    """`num_layers` pairs of [num_slots, num_kv_heads, head_dim] tensors."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_slots = num_slots
        # torch.empty: untouched pages are never made resident, so a generous budget is cheap
        self.k: list[Tensor] = [
            torch.empty(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v: list[Tensor] = [
            torch.empty(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        """Move K/V of every layer from slots `src` [N] to slots `dst` [N] (path compaction)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst] = k[src]
            v[dst] = v[src]
