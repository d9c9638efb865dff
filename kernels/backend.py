"""The attention-backend interface shared by target and draft models.

A forward pass over a batch of requests packs every request's new tokens into one tensor
of `T` rows. `AttentionMeta` tells a backend, per request, which rows are its queries, where
their K/V go in the paged pool, and which cached slots each query may see.

Visibility of key j for query i of one request (all must hold):
  * `mask is None`: causal by index, query i sits at kv index `kv_len - q_len + i`;
    otherwise `mask[i, j]` (tree verification, or any custom pattern);
  * chunked layers only: `q_pos[i] // chunk == kv_pos[j] // chunk` (Llama 4 local attention).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class SeqAttnMeta:
    """One request's slice of a packed batch."""

    q_start: int  # first row of this request in the packed [T, ...] tensors
    q_len: int
    kv_slots: Tensor  # [kv_len] int64: pool slots of every key this request attends over
    q_positions: Tensor  # [q_len] int64
    kv_positions: Tensor  # [kv_len] int64: position of each key (tree nodes share depths)
    mask: Tensor | None = None  # [q_len, kv_len] bool, True = may attend; None = causal

    @property
    def kv_len(self) -> int:
        return int(self.kv_slots.shape[0])

    def to(self, device: torch.device) -> SeqAttnMeta:
        """The same metadata with its tensors on `device` (built on the CPU, used on a GPU)."""
        return SeqAttnMeta(self.q_start, self.q_len, self.kv_slots.to(device),
                           self.q_positions.to(device), self.kv_positions.to(device),
                           None if self.mask is None else self.mask.to(device))


@dataclass(frozen=True, slots=True)
class PaddedKV:
    """A decode batch (one causal query per request) with every request's keys padded to
    the longest, so a backend can attend all requests in one call."""

    index: Tensor  # [B, L] int64 slots (0 where padded)
    valid: Tensor  # [B, L] bool
    kv_positions: Tensor  # [B, L] int64
    q_positions: Tensor  # [B] int64

    def to(self, device: torch.device) -> PaddedKV:
        return PaddedKV(self.index.to(device), self.valid.to(device), self.kv_positions.to(device),
                        self.q_positions.to(device))


@dataclass(frozen=True, slots=True)
class AttentionMeta:
    """Per-forward metadata, built once and shared by every layer."""

    out_slots: Tensor  # [T] int64: pool slot that receives each new token's K/V
    seqs: tuple[SeqAttnMeta, ...]
    decode: bool = False  # a plain decode batch: one causal query per request, no masks
    _padded: list[PaddedKV] = field(default_factory=list, compare=False, repr=False)  # (the cache)

    def __post_init__(self) -> None:
        if self.decode and not all(s.q_len == 1 and s.mask is None for s in self.seqs):
            raise ValueError("a decode batch has one causal query per request")

    @property
    def padded(self) -> PaddedKV | None:
        """A decode batch's keys padded to the longest request (`pad_decode`), built on first
        use (the fused CPU path never asks for it); None for any other batch."""
        if not self.decode:
            return None
        if not self._padded:
            self._padded.append(pad_decode(self.seqs))
        return self._padded[0]

    @property
    def num_tokens(self) -> int:
        return int(self.out_slots.shape[0])

    def to(self, device: torch.device) -> AttentionMeta:
        """Metadata is built on the CPU; a GPU forward gets a copy on its device."""
        if device.type == "cpu":
            return self
        return AttentionMeta(self.out_slots.to(device), tuple(s.to(device) for s in self.seqs), self.decode)


def pad_decode(seqs: Sequence[SeqAttnMeta]) -> PaddedKV:
    """One query per request: every request's keys padded to the longest, on the seqs' device."""
    lens = [s.kv_len for s in seqs]
    longest = max(lens)
    dev = seqs[0].kv_slots.device
    index = torch.zeros(len(seqs), longest, dtype=torch.long, device=dev)
    kv_pos = torch.zeros(len(seqs), longest, dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        index[i, : lens[i]] = s.kv_slots
        kv_pos[i, : lens[i]] = s.kv_positions
    valid = torch.arange(longest, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    q_pos = torch.cat([s.q_positions for s in seqs])
    return PaddedKV(index, valid, kv_pos, q_pos)


class AttentionBackend(ABC):
    """Writes new K/V into one layer's pool and attends over the paged cache."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        q: Tensor,  # [T, H, D]
        k: Tensor,  # [T, Hkv, D]
        v: Tensor,  # [T, Hkv, D]
        k_cache: Tensor,  # [num_slots, Hkv, D]
        v_cache: Tensor,  # [num_slots, Hkv, D]
        meta: AttentionMeta,
        scale: float,
        chunk_size: int | None,
    ) -> Tensor:  # [T, H, D]
        """Store k/v at `meta.out_slots`, then attend each request over its visible keys."""


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """Everything a model forward needs besides token ids and positions."""

    attn: AttentionMeta
    kv_k: list[Tensor]  # per layer [num_slots, Hkv, D]
    kv_v: list[Tensor]
    backend: AttentionBackend
    capture_layers: tuple[int, ...] = ()  # layers whose *input* hidden state is returned
    # hybrid KV: the chunked-attention layers' metadata over their own pool (each request's
    # keys from the chunk of its first query on); None: every layer reads `attn`
    swa_attn: AttentionMeta | None = None

    def attn_for(self, chunk_size: int | None) -> AttentionMeta:
        """The metadata a layer reads: its pool's (chunked layers have their own pool under
        hybrid KV)."""
        return self.swa_attn if chunk_size is not None and self.swa_attn is not None else self.attn
