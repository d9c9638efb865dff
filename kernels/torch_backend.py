"""The reference attention backend: plain torch, runs on the CPU (and on any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .backend import AttentionBackend, AttentionMeta, PaddedKV, SeqAttnMeta

FAST_MAX_QUERIES = 64  # longer extends (prefill) go to SDPA


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fast_kernels(q: Tensor, k_cache: Tensor):  # -> the CPU extension module or None
    """float32 queries on the CPU over float32 caches, or fp8 ones (--kv-cache-dtype: the kernels
    upcast on load; head dims a multiple of 8)."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    if k_cache.dtype != torch.float32 and not (k_cache.dtype in FP8 and q.shape[-1] % 8 == 0):
        return None
    return cpu_kernels.extension()


def visibility_mask(seq: SeqAttnMeta, chunk_size: int | None) -> Tensor | None:
    """[q_len, kv_len] bool mask of the keys each query may see; None means all of them."""
    mask = seq.mask
    if mask is None and seq.q_len > 1:
        # causal by kv index: query i sits at kv index kv_len - q_len + i
        dev = seq.kv_slots.device  # (the metadata's device: the model's)
        q_idx = torch.arange(seq.kv_len - seq.q_len, seq.kv_len, device=dev)
        mask = torch.arange(seq.kv_len, device=dev)[None, :] <= q_idx[:, None]
    if chunk_size is not None:
        same_chunk = (seq.q_positions // chunk_size)[:, None] == (
            seq.kv_positions // chunk_size
        )[None, :]
        mask = same_chunk if mask is None else mask & same_chunk
    return mask


def attend_one(
    q: Tensor,  # [q_len, H, D]
    keys: Tensor,  # [kv_len, Hkv, D]
    values: Tensor,  # [kv_len, Hkv, D]
    mask: Tensor | None,  # [q_len, kv_len] bool
    scale: float,
) -> Tensor:  # [q_len, H, D]
    # 4-D inputs select PyTorch's fused CPU kernel (3-D falls back to the unfused math path)
    qh = q.transpose(0, 1)[None]  # (1, H, q_len, D)
    kh = keys.transpose(0, 1)[None]  # (1, Hkv, kv_len, D)
    vh = values.transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=kh.shape[1] != qh.shape[1]
    )
    return out[0].transpose(0, 1)


class TorchAttentionBackend(AttentionBackend):
    """Gathers each request's keys from the pool and runs SDPA with an explicit mask."""

    name = "torch"

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        meta: AttentionMeta,
        scale: float,
        chunk_size: int | None,
    ) -> Tensor:
        k_cache[meta.out_slots] = k.to(k_cache.dtype)
        v_cache[meta.out_slots] = v.to(v_cache.dtype)
        if not meta.decode and len(meta.seqs) == 1 and meta.seqs[0].q_len <= FAST_MAX_QUERIES:
            fast = _fast_kernels(q, k_cache)
            if fast is not None:  # batch-1 decode / verification on the CPU, float32
                seq = meta.seqs[0]
                mask = visibility_mask(seq, chunk_size) if chunk_size is not None else seq.mask
                return fast.paged_attention(q.contiguous(), k_cache, v_cache, seq.kv_slots,
                                            cpu_kernels.NO_MASK if mask is None else mask.contiguous(), scale)
        padded = meta.padded
        if padded is not None:
            fast = _fast_kernels(q, k_cache) if chunk_size is None and q.shape[-1] % 8 == 0 else None
            if fast is not None:  # a decode batch on the CPU, float32: one C++ call for all requests
                lens = padded.valid.sum(1)  # [B]; valid is a prefix of each row
                return fast.paged_attention_batch(q.contiguous(), k_cache, v_cache,
                                                  padded.index.contiguous(), lens, scale)
            return self._padded_decode(q, k_cache, v_cache, padded, scale, chunk_size)
        if len(meta.seqs) == 1:
            return self._one(q, k_cache, v_cache, meta.seqs[0], scale, chunk_size)
        out = torch.empty_like(q)
        # several requests' trees (speculative verification of a batch): the C++ kernel per
        # request where it applies, reading the pool in place (SDPA would gather every key)
        fast = _fast_kernels(q, k_cache)
        for seq in meta.seqs:
            rows = slice(seq.q_start, seq.q_start + seq.q_len)
            if fast is not None and seq.q_len <= FAST_MAX_QUERIES:
                mask = visibility_mask(seq, chunk_size) if chunk_size is not None else seq.mask
                out[rows] = fast.paged_attention(q[rows].contiguous(), k_cache, v_cache, seq.kv_slots,
                                                 cpu_kernels.NO_MASK if mask is None else mask.contiguous(), scale)
            else:
                out[rows] = self._one(q[rows], k_cache, v_cache, seq, scale, chunk_size)
        return out

    @staticmethod
    def _padded_decode(
        q: Tensor,  # [B, H, D]
        k_cache: Tensor,
        v_cache: Tensor,
        padded: PaddedKV,
        scale: float,
        chunk_size: int | None,
    ) -> Tensor:  # [B, H, D]
        mask = padded.valid  # [B, L]
        if chunk_size is not None:
            mask = mask & (
                (padded.kv_positions // chunk_size) == (padded.q_positions // chunk_size)[:, None]
            )
        keys = k_cache[padded.index].to(q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
        values = v_cache[padded.index].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=keys.shape[1] != q.shape[1],
        )  # (B, H, 1, D)
        return out[:, :, 0, :]

    @staticmethod
    def _one(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        seq: SeqAttnMeta,
        scale: float,
        chunk_size: int | None,
    ) -> Tensor:
        keys = k_cache[seq.kv_slots].to(q.dtype)  # [kv_len, Hkv, D]
        values = v_cache[seq.kv_slots].to(q.dtype)
        return attend_one(q, keys, values, visibility_mask(seq, chunk_size), scale)
