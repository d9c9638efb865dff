"""Triton paged KV store: scatter the new tokens' K/V rows into their pool slots.

`store_kv` is the kernel, `store_kv_ref` its torch reference (what `TorchAttentionBackend`
does inline). The pool is [num_slots, Hkv, D]; slot = page * page_size + offset, so one
scatter by slot serves every page size.

Import this module only after deciding on the interpreter: `@triton.jit` picks compiled or
interpreted kernels when the module is imported (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_interpreter import adopt_interpreter, interpreter_enabled

if interpreter_enabled():  # triton may have been imported before TRITON_INTERPRET was set
    adopt_interpreter()


@triton.jit
def _store_kv_kernel(
    K,  # [T, Hkv, D] new keys (any token/head strides, last dim contiguous)
    V,
    K_cache,  # [num_slots, Hkv, D]
    V_cache,
    out_slots,  # [T] int64
    T,
    s_kt,
    s_kh,
    s_vt,
    s_vh,
    s_kcs,
    s_kch,
    s_vcs,
    s_vch,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,  # Hkv * HEAD_DIM elements per token
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # grid: (cdiv(T, BLOCK_T), cdiv(ROW, BLOCK_R)); a tile = BLOCK_T tokens x BLOCK_R of (h, d)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = i // HEAD_DIM
    d = i % HEAD_DIM
    ok = (t < T)[:, None] & (i < ROW)[None, :]
    slot = tl.load(out_slots + t, mask=t < T, other=0).to(tl.int64)
    t64 = t.to(tl.int64)
    k = tl.load(K + t64[:, None] * s_kt + (h * s_kh + d)[None, :], mask=ok)
    v = tl.load(V + t64[:, None] * s_vt + (h * s_vh + d)[None, :], mask=ok)
    tl.store(K_cache + slot[:, None] * s_kcs + (h * s_kch + d)[None, :],
             k.to(K_cache.dtype.element_ty), mask=ok)
    tl.store(V_cache + slot[:, None] * s_vcs + (h * s_vch + d)[None, :],
             v.to(V_cache.dtype.element_ty), mask=ok)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, out_slots: Tensor) -> None:
    """k_cache[out_slots[t]] = k[t] (cast to the pool's dtype); the same for v."""
    T, hkv, d = k.shape
    if T == 0:
        return
    assert k_cache.shape[1:] == (hkv, d) and v.shape == k.shape, (k.shape, k_cache.shape)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    slots = out_slots.to(device=k.device, dtype=torch.int64)
    row = hkv * d
    block_r = min(triton.next_power_of_2(row), 2048)
    # ~2K elements per program (no spills at 4 warps): a few tokens of a Llama-sized row, many of a tiny one
    block_t = min(triton.next_power_of_2(T), max(1, 2048 // block_r))
    grid = (triton.cdiv(T, block_t), triton.cdiv(row, block_r))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slots, T,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEAD_DIM=d, ROW=row, BLOCK_T=block_t, BLOCK_R=block_r,
        num_warps=4,
    )


def store_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, out_slots: Tensor) -> None:
    """Torch reference of `store_kv` (the store `TorchAttentionBackend.forward` does)."""
    k_cache[out_slots] = k.to(k_cache.dtype)
    v_cache[out_slots] = v.to(v_cache.dtype)
