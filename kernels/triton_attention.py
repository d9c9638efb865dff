"""Triton attention over the paged KV pool: paged decode and tree-verify / extend.

Both kernels read keys and values straight from the pool ([num_slots, Hkv, D]) through each
request's `kv_slots` (token-granular, so any page size works) and apply the visibility rule
of `specdec.kernels.backend`: causal by kv index or a custom mask, intersected with Llama 4's
chunk window by position (`q_pos // chunk == kv_pos // chunk`).

Kernels (each has its torch reference in this module):

* `extend_attention`: any number of query rows per request (prefill, tree verification,
  draft-tree steps). One program owns a tile of `BLOCK_M` rows = a few queries x all query
  heads of one KV head (GQA packing: every K/V tile is loaded once per group), loops over
  `BLOCK_N` keys with an online softmax in fp32 and two `tl.dot`s. Custom masks are
  bit-packed (see `pack_mask_bits`): columns visible to every query (the cached prefix) are
  not stored, only the region from the first column some query may not see.
* `decode_attention`: one query row per request. Split-KV (flash-decoding): the keys of a
  request are cut into `num_kv_splits` ranges handled by separate programs whose partial
  results (normalised output + log-sum-exp) are merged by a second kernel.

Numerics: loads keep the storage dtype (fp16/bf16 feed the tensor cores), scores, softmax
and accumulators are fp32; fp32 inputs use IEEE dots (no TF32). Under the interpreter
bf16 is upcast to fp32 right after loading, because the interpreter's bf16 arithmetic is
wrong.

`TritonAttentionBackend` plugs both into the `AttentionBackend` interface. Metadata is built
once per forward (per `AttentionMeta` object and chunk size) and reused by every layer.
Import this module only after deciding on the interpreter (`TRITON_INTERPRET=1`): `@triton.jit`
picks compiled or interpreted kernels at import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import AttentionBackend, AttentionMeta, SeqAttnMeta
from .torch_backend import TorchAttentionBackend
from .triton_interpreter import adopt_interpreter, interpreter_enabled
from .triton_kv_store import store_kv, store_kv_ref

# columns of the per-request table `seq_info` [B, NUM_FIELDS] int32
F_Q_START, F_Q_LEN, F_KV_START, F_KV_LEN, F_KV_LO, F_KV_HI, F_CAUSAL_OFF = range(7)
F_MASK_START, F_MASK_OFF, F_MASK_WORDS = range(7, 10)
NUM_FIELDS = 10

LOG2E = 1.4426950408889634
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)  # running-max start: finite, no NaN on empty tiles

if interpreter_enabled():  # triton may have been imported before TRITON_INTERPRET was set
    adopt_interpreter()


def _is_interpreted(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# ---- device helpers ----------------------------------------------------------------------------


@triton.jit
def _attend_tile(
    acc, m_i, l_i,  # running output [BLOCK_M, BLOCK_D], max and sum [BLOCK_M] (fp32, log2 units)
    q,  # [BLOCK_M, BLOCK_D]
    row_ok, row_limit, q_chunk, mask_row,  # per row: valid, causal limit, chunk id, mask word base
    start, kv_base, kv_len, mask_start,
    K_cache, V_cache, kv_slots, kv_pos, mask_bits,
    kvh, s_kcs, s_kch, s_vcs, s_vch, qk_scale, chunk,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One BLOCK_N tile of keys [start, start + BLOCK_N) folded into the online softmax."""
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok = n < kv_len
    d_ok = d < HEAD_DIM
    slot = tl.load(kv_slots + kv_base + n, mask=n_ok, other=0).to(tl.int64)
    kt = tl.load(K_cache + slot[None, :] * s_kcs + kvh * s_kch + d[:, None],
                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    kt = kt.to(q.dtype)  # fp8 caches (and bf16 in the interpreter) upcast to the query's type
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
    vis = n_ok[None, :] & (n[None, :] <= row_limit[:, None])
    if HAS_CHUNK:
        k_chunk = tl.load(kv_pos + kv_base + n, mask=n_ok, other=0) // chunk
        vis = vis & (q_chunk[:, None] == k_chunk[None, :])
    if HAS_MASK:
        c = n - mask_start  # column inside the stored mask region
        in_c = c >= 0
        c = tl.where(in_c, c, 0)
        word = tl.load(mask_bits + mask_row[:, None] + (c // 32)[None, :],
                       mask=row_ok[:, None] & (in_c & n_ok)[None, :], other=0)
        bit = (word >> (c % 32)[None, :]) & 1
        vis = vis & ((bit != 0) | (~in_c)[None, :])
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V_cache + slot[:, None] * s_vcs + kvh * s_vch + d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


# ---- extend / tree-verify kernel ---------------------------------------------------------------


@triton.jit
def _extend_attn_kernel(
    Q, K_cache, V_cache, Out,
    seq_info, work, kv_slots, kv_pos, q_pos, mask_bits,
    qk_scale, chunk,
    s_qt, s_qh, s_ot, s_oh, s_kcs, s_kch, s_vcs, s_vch,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    QPB: tl.constexpr,  # queries per program: BLOCK_M // GROUP
    NUM_FIELDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid: (work items, Hkv); work item w = (request b, first query q0) of a query block
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(work + 2 * w)
    q0 = tl.load(work + 2 * w + 1)
    info = seq_info + b * NUM_FIELDS
    q_start = tl.load(info + 0)
    q_len = tl.load(info + 1)
    kv_base = tl.load(info + 2)
    kv_len = tl.load(info + 3)
    kv_lo = tl.load(info + 4)
    kv_hi = tl.load(info + 5)
    causal_off = tl.load(info + 6)
    mask_start = tl.load(info + 7)
    mask_off = tl.load(info + 8)
    mask_words = tl.load(info + 9)

    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // GROUP  # query index inside the request
    h = kvh * GROUP + r % GROUP
    row_ok = (r < QPB * GROUP) & (qi < q_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = (q_start + qi).to(tl.int64)
    q = tl.load(Q + row[:, None] * s_qt + h[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    row_limit = causal_off + qi  # causal: key n visible iff n <= kv_len - q_len + qi
    q_chunk = qi * 0
    if HAS_CHUNK:
        q_chunk = tl.load(q_pos + q_start + qi, mask=row_ok, other=0) // chunk
    mask_row = mask_off + qi * mask_words

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_last = tl.minimum(q0 + QPB, q_len) - 1
    hi = tl.minimum(kv_hi, causal_off + q_last + 1)
    for start in range(kv_lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, row_ok, row_limit, q_chunk, mask_row,
            start, kv_base, kv_len, mask_start,
            K_cache, V_cache, kv_slots, kv_pos, mask_bits,
            kvh, s_kcs, s_kch, s_vcs, s_vch, qk_scale, chunk,
            HEAD_DIM, BLOCK_N, BLOCK_D, HAS_CHUNK, HAS_MASK, UPCAST, DOT_PREC,
        )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + row[:, None] * s_ot + h[:, None] * s_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---- paged decode kernels (split-KV) -----------------------------------------------------------


@triton.jit
def _decode_attn_kernel(
    Q, K_cache, V_cache, Out, Mid_O, Mid_L,
    seq_info, kv_slots, kv_pos, q_pos, mask_bits,
    qk_scale, chunk,
    s_qt, s_qh, s_ot, s_oh, s_kcs, s_kch, s_vcs, s_vch,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_FIELDS: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= GROUP, >= 16 (tl.dot)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid: (B, Hkv, NUM_SPLITS); rows of the tile = the GROUP query heads of one KV head
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    info = seq_info + b * NUM_FIELDS
    q_start = tl.load(info + 0)
    kv_base = tl.load(info + 2)
    kv_len = tl.load(info + 3)
    kv_lo = tl.load(info + 4)
    kv_hi = tl.load(info + 5)
    causal_off = tl.load(info + 6)
    mask_start = tl.load(info + 7)
    mask_off = tl.load(info + 8)

    r = tl.arange(0, BLOCK_H)
    h = kvh * GROUP + r
    row_ok = r < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = q_start.to(tl.int64)
    q = tl.load(Q + row * s_qt + h[:, None] * s_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    zero = r * 0
    row_limit = zero + causal_off
    q_chunk = zero
    if HAS_CHUNK:
        q_chunk = zero + tl.load(q_pos + q_start) // chunk
    mask_row = zero + mask_off

    # this split's share of [kv_lo, kv_hi), a whole number of BLOCK_N tiles
    span = tl.maximum(kv_hi - kv_lo, 0)
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = kv_lo + split * per_split
    hi = tl.minimum(lo + per_split, kv_hi)

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, row_ok, row_limit, q_chunk, mask_row,
            start, kv_base, kv_len, mask_start,
            K_cache, V_cache, kv_slots, kv_pos, mask_bits,
            kvh, s_kcs, s_kch, s_vcs, s_vch, qk_scale, chunk,
            HEAD_DIM, BLOCK_N, BLOCK_D, HAS_CHUNK, HAS_MASK, UPCAST, DOT_PREC,
        )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    omask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + row * s_ot + h[:, None] * s_oh + d[None, :], out.to(Out.dtype.element_ty), mask=omask)
    else:
        # partials: Mid_O [B, H, NUM_SPLITS, BLOCK_D] fp32, Mid_L [B, H, NUM_SPLITS] (log2 units)
        H = tl.num_programs(1) * GROUP
        mid = (b * H + h).to(tl.int64) * NUM_SPLITS + split
        tl.store(Mid_O + mid[:, None] * BLOCK_D + d[None, :], out, mask=omask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(Mid_L + mid, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    Out, Mid_O, Mid_L, seq_info,
    s_ot, s_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_FIELDS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (B, H); merges the NUM_SPLITS partial results of one query head
    b = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    q_start = tl.load(seq_info + b * NUM_FIELDS + 0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    mid = (b * H + h).to(tl.int64) * NUM_SPLITS + s
    lse = tl.load(Mid_L + mid, mask=s_ok, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), NEG_BIG)
    wgt = tl.exp2(lse - m)  # empty splits weigh 0
    part = tl.load(Mid_O + mid[:, None] * BLOCK_D + d[None, :],
                   mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(wgt, 0)
    out = tl.sum(part * wgt[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + q_start * s_ot + h * s_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


# ---- host side: metadata -----------------------------------------------------------------------


def pack_mask_bits(mask: Tensor) -> tuple[int, Tensor]:
    """Compress one request's [q_len, kv_len] bool mask.

    Returns `(mask_start, words)`: every column before `mask_start` is visible to every
    query and not stored; `words` [q_len, ceil((kv_len - mask_start) / 32)] int32 holds the
    rest, bit j % 32 of word j // 32 = column mask_start + j.
    """
    q_len, kv_len = mask.shape
    partial = (~mask.all(0)).nonzero()
    start = int(partial[0]) if partial.numel() else kv_len
    width = kv_len - start
    n_words = (width + 31) // 32
    if n_words == 0:
        return start, torch.zeros(q_len, 0, dtype=torch.int32)
    bits = torch.zeros(q_len, n_words * 32, dtype=torch.int64)
    bits[:, :width] = mask[:, start:].to(torch.int64)
    words = (bits.view(q_len, n_words, 32) << torch.arange(32)).sum(-1)  # [0, 2^32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as int32 bit patterns
    return start, words.to(torch.int32)


def unpack_mask_bits(mask_start: int, words: Tensor, kv_len: int) -> Tensor:
    """Reference inverse of `pack_mask_bits`."""
    q_len = words.shape[0]
    bits = (words.to(torch.int64)[:, :, None] >> torch.arange(32)) & 1
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    mask[:, mask_start:] = bits.reshape(q_len, -1)[:, : kv_len - mask_start].bool()
    return mask


def _kv_bounds(seq: SeqAttnMeta, chunk_size: int | None) -> tuple[int, int]:
    """[lo, hi): the kv index range outside which no query of the request sees any key."""
    any_visible: Tensor | None = None
    if seq.mask is not None:
        any_visible = seq.mask.any(0)
    if chunk_size is not None:
        q_chunks = torch.unique(seq.q_positions // chunk_size)
        in_chunk = torch.isin(seq.kv_positions // chunk_size, q_chunks)
        any_visible = in_chunk if any_visible is None else any_visible & in_chunk
    if any_visible is None:
        return 0, seq.kv_len
    idx = any_visible.nonzero()
    if idx.numel() == 0:
        return 0, 0
    return int(idx[0]), int(idx[-1]) + 1


@dataclass(frozen=True)
class TritonAttnPlan:
    """Device-side metadata of one forward for one chunk setting and GQA group size."""

    seq_info: Tensor  # [B, NUM_FIELDS] int32
    kv_slots: Tensor  # [sum kv_len] int64
    kv_pos: Tensor  # [sum kv_len] int32
    q_pos: Tensor  # [T] int32
    mask_bits: Tensor  # [num_words] int32 (at least one element)
    work: Tensor  # [W, 2] int32: (request, first query) of each extend query block
    num_seqs: int
    group: int
    block_m: int
    max_kv_span: int  # longest [kv_lo, kv_hi) range
    is_decode: bool  # every request has one query row
    has_mask: bool
    chunk_size: int | None


def extend_block_m(max_q_len: int, group: int, cap: int = 64) -> int:
    """Rows per extend program (queries x heads of one group): at most `cap`, at least 16
    (tl.dot) and at least one whole group."""
    return max(16, triton.next_power_of_2(group), min(cap, triton.next_power_of_2(max_q_len * group)))


def cuda_arch(device: torch.device | str) -> int:
    """Compute capability as 80, 90, ... (80 off CUDA: the interpreter ignores block shapes)."""
    return _cuda_arch(str(device))


@functools.cache
def _cuda_arch(device: str) -> int:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 80
    major, minor = torch.cuda.get_device_capability(dev)
    return 10 * major + minor


def extend_config(dtype: torch.dtype, head_dim: int, arch: int = 80) -> tuple[int, int, int]:
    """(max BLOCK_M, BLOCK_N, num_warps) of the extend kernel. Chosen with `ptxas -v`
    (`triton_compile_check`, GROUP 4, mask + chunk on): no register spills at D = 64 and
    128 on sm_80 and sm_90, fp32 included. Not timed on any GPU."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        if arch >= 90:
            return 32, 32, 4
        return 32, 32, 8 if block_d >= 128 else 4
    if block_d >= 256:
        return 64, 32, 8
    if arch >= 90:
        return 64, 32 if block_d >= 128 else 64, 8
    return 64, 64, 8 if block_d >= 128 else 4


def decode_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the decode kernel: no spills at D = 64 and 128 on sm_80 and
    sm_90 (`ptxas -v`)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = block_d > 128 or (dtype == torch.float32 and block_d >= 128)
    return 32, 8 if wide else 4


def build_plan(
    meta: AttentionMeta,
    chunk_size: int | None,
    group: int,
    device: torch.device | str,
    max_block_m: int = 64,
) -> TritonAttnPlan:
    """Per-request table, flattened slots/positions, bit-packed masks and the extend work
    list (one item per block of `block_m // group` queries of a request)."""
    seqs = meta.seqs
    info = torch.zeros(len(seqs), NUM_FIELDS, dtype=torch.int64)
    mask_chunks: list[Tensor] = []
    mask_words_total = 0
    kv_start = 0
    max_span = 0
    max_q_len = max((s.q_len for s in seqs), default=0)
    block_m = extend_block_m(max_q_len, group, max_block_m)
    qpb = block_m // group
    work: list[tuple[int, int]] = []
    for b, seq in enumerate(seqs):
        lo, hi = _kv_bounds(seq, chunk_size)
        max_span = max(max_span, hi - lo)
        row = info[b]
        row[F_Q_START], row[F_Q_LEN] = seq.q_start, seq.q_len
        row[F_KV_START], row[F_KV_LEN] = kv_start, seq.kv_len
        row[F_KV_LO], row[F_KV_HI] = lo, hi
        row[F_MASK_START], row[F_MASK_OFF], row[F_MASK_WORDS] = seq.kv_len, 0, 0
        if seq.mask is None:
            row[F_CAUSAL_OFF] = seq.kv_len - seq.q_len
        else:
            row[F_CAUSAL_OFF] = seq.kv_len  # no causal limit: the mask decides
            start, words = pack_mask_bits(seq.mask)
            if words.numel():
                row[F_MASK_START], row[F_MASK_OFF], row[F_MASK_WORDS] = (
                    start, mask_words_total, words.shape[1])
                mask_chunks.append(words.flatten())
                mask_words_total += words.numel()
        kv_start += seq.kv_len
        work.extend((b, q0) for q0 in range(0, seq.q_len, qpb))
    assert kv_start < 1 << 31, "too many keys in one forward for int32 offsets"

    def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        parts = [p.to(dtype) for p in parts if p.numel()]
        t = torch.cat(parts) if parts else torch.zeros(1, dtype=dtype)
        return t.to(device, non_blocking=True)

    return TritonAttnPlan(
        seq_info=info.to(torch.int32).to(device),
        kv_slots=cat([s.kv_slots for s in seqs], torch.int64),
        kv_pos=cat([s.kv_positions for s in seqs], torch.int32),
        q_pos=cat([s.q_positions for s in seqs], torch.int32),
        mask_bits=cat(mask_chunks, torch.int32),
        work=torch.tensor(work if work else [(0, 0)], dtype=torch.int32).reshape(-1, 2).to(device),
        num_seqs=len(seqs),
        group=group,
        block_m=block_m,
        max_kv_span=max_span,
        is_decode=all(s.q_len == 1 for s in seqs),
        has_mask=mask_words_total > 0,
        chunk_size=chunk_size,
    )


# ---- host side: launchers ----------------------------------------------------------------------


def _flags(q: Tensor, kernel: object) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC) for q's dtype: interpreter bf16 runs in fp32; fp32 dots are IEEE."""
    upcast = q.dtype == torch.bfloat16 and _is_interpreted(kernel)
    fp32 = upcast or q.dtype == torch.float32
    return upcast, "ieee" if fp32 else "tf32"


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: TritonAttnPlan) -> tuple[int, int, int]:
    _, H, D = q.shape
    hkv = k_cache.shape[1]
    assert H == hkv * plan.group, (H, hkv, plan.group)
    assert k_cache.shape[1:] == (hkv, D) and v_cache.shape == k_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return H, hkv, D


def extend_attention(
    q: Tensor,  # [T, H, D]
    k_cache: Tensor,  # [num_slots, Hkv, D]
    v_cache: Tensor,
    plan: TritonAttnPlan,
    scale: float,
    out: Tensor | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Attention of every request's query rows over its visible keys (any q_len)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    _, hkv, D = _check(q, k_cache, v_cache, plan)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if q.shape[0] == 0:
        return out
    upcast, prec = _flags(q, _extend_attn_kernel)
    _, default_n, warps = extend_config(q.dtype, D, cuda_arch(q.device))
    grid = (plan.work.shape[0], hkv)
    _extend_attn_kernel[grid](
        q, k_cache, v_cache, out,
        plan.seq_info, plan.work, plan.kv_slots, plan.kv_pos, plan.q_pos, plan.mask_bits,
        scale * LOG2E, plan.chunk_size or 1,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEAD_DIM=D, GROUP=plan.group, QPB=plan.block_m // plan.group, NUM_FIELDS=NUM_FIELDS,
        BLOCK_M=plan.block_m, BLOCK_N=block_n or default_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_CHUNK=plan.chunk_size is not None, HAS_MASK=plan.has_mask,
        UPCAST=upcast, DOT_PREC=prec,
        num_warps=warps, num_stages=2,
    )
    return out


def default_kv_splits(num_seqs: int, num_kv_heads: int, max_kv_span: int) -> int:
    """Enough programs to fill a GPU (~128) for small batches, at least 256 keys per split."""
    by_len = max(1, triton.cdiv(max_kv_span, 256))
    by_occupancy = max(1, triton.cdiv(128, max(1, num_seqs * num_kv_heads)))
    return min(16, by_len, by_occupancy)


def decode_attention(
    q: Tensor,  # [T, H, D], one row per request
    k_cache: Tensor,
    v_cache: Tensor,
    plan: TritonAttnPlan,
    scale: float,
    out: Tensor | None = None,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Paged decode: one query per request over its visible keys, split-KV + merge."""
    assert plan.is_decode, "decode_attention needs q_len == 1 for every request"
    q = q if q.stride(-1) == 1 else q.contiguous()
    H, hkv, D = _check(q, k_cache, v_cache, plan)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    B = plan.num_seqs
    if B == 0:
        return out
    splits = num_kv_splits or default_kv_splits(B, hkv, plan.max_kv_span)
    block_d = max(16, triton.next_power_of_2(D))
    if splits > 1:
        mid_o = torch.empty(B, H, splits, block_d, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_l = out  # unused
    upcast, prec = _flags(q, _decode_attn_kernel)
    default_n, warps = decode_config(q.dtype, D)
    _decode_attn_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, out, mid_o, mid_l,
        plan.seq_info, plan.kv_slots, plan.kv_pos, plan.q_pos, plan.mask_bits,
        scale * LOG2E, plan.chunk_size or 1,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEAD_DIM=D, GROUP=plan.group, NUM_SPLITS=splits, NUM_FIELDS=NUM_FIELDS,
        BLOCK_H=max(16, triton.next_power_of_2(plan.group)), BLOCK_N=block_n or default_n,
        BLOCK_D=block_d,
        HAS_CHUNK=plan.chunk_size is not None, HAS_MASK=plan.has_mask,
        UPCAST=upcast, DOT_PREC=prec,
        num_warps=warps, num_stages=2,
    )
    if splits > 1:
        _decode_merge_kernel[(B, H)](
            out, mid_o, mid_l, plan.seq_info,
            out.stride(0), out.stride(1),
            HEAD_DIM=D, NUM_SPLITS=splits, NUM_FIELDS=NUM_FIELDS,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            num_warps=1,
        )
    return out


# ---- torch references ---------------------------------------------------------------------------


def attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMeta,
    scale: float,
    chunk_size: int | None,
) -> Tensor:
    """Reference of `extend_attention` and `decode_attention`: the torch backend's gather +
    SDPA per request (without its K/V store)."""
    out = torch.zeros_like(q)
    for seq in meta.seqs:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        out[rows] = TorchAttentionBackend._one(q[rows], k_cache, v_cache, seq, scale, chunk_size)
    return out


# ---- backend -----------------------------------------------------------------------------------


class TritonAttentionBackend(AttentionBackend):
    """Triton KV store + decode / extend kernels; metadata is planned once per forward."""

    name = "triton"

    def __init__(self, num_kv_splits: int | None = None) -> None:
        self.num_kv_splits = num_kv_splits
        self._meta: AttentionMeta | None = None
        self._plans: dict[tuple[int | None, int, str, int], TritonAttnPlan] = {}
        self._out_slots: dict[str, Tensor] = {}

    @staticmethod
    def interpreted() -> bool:
        """True when the kernels were built for Triton's CPU interpreter."""
        return _is_interpreted(_extend_attn_kernel)

    def plan(self, meta: AttentionMeta, chunk_size: int | None, group: int,
             device: torch.device, max_block_m: int) -> TritonAttnPlan:
        if meta is not self._meta:  # a new forward: drop the previous one's metadata
            self._meta, self._plans, self._out_slots = meta, {}, {}
        key = (chunk_size, group, str(device), max_block_m)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(meta, chunk_size, group, device, max_block_m)
        return plan

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
        max_block_m = extend_config(q.dtype, q.shape[2], cuda_arch(q.device))[0]
        plan = self.plan(meta, chunk_size, q.shape[1] // k.shape[1], q.device, max_block_m)
        dev = str(k_cache.device)
        slots = self._out_slots.get(dev)
        if slots is None:
            slots = self._out_slots[dev] = meta.out_slots.to(k_cache.device, torch.int64)
        if k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            # fp8 KV: torch's round-to-nearest-even cast (Triton's interpreter rounds fp8 its own
            # way; on a GPU this is one index_put per layer, as SGLang's set_kv_buffer does)
            store_kv_ref(k, v, k_cache, v_cache, slots)
        else:
            store_kv(k, v, k_cache, v_cache, slots)
        if plan.is_decode:
            return decode_attention(q, k_cache, v_cache, plan, scale, num_kv_splits=self.num_kv_splits)
        return extend_attention(q, k_cache, v_cache, plan, scale)
