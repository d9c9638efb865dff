"""Top-1 MoE expert GEMMs grouped by expert (Llama 4 routes each token to one expert).

`moe_top1_experts(x, w13, w2, expert, score)` computes, for every token t,

    e = expert[t];  h = silu(g) * u  with  [g | u] = (score[t] * x[t]) @ w13[e]^T
    out[t] = h @ w2[e]^T

which is the routed part of `specdec.target.llama4.MoE.forward` for top_k == 1 (the router
score scales the expert *input*; the GEMM is linear, so the kernel scales the fp32
accumulator instead). `moe_top1_experts_ref` is the torch reference (the model's loop).

How (vLLM/SGLang's fused-MoE layout, top-1): tokens are sorted by expert and each expert's
run is padded to a multiple of BLOCK_M, so every BLOCK_M tile of the sorted order belongs to
one expert (`align_by_expert`, torch ops only, no host sync: the padded length uses the upper
bound T + E * (BLOCK_M - 1)). Kernel 1 gathers a tile's token rows, multiplies by the gate
and up halves of that expert's w13 (two fp32 accumulators, tl.dot) and writes
silu(g) * u in sorted order; kernel 2 multiplies by w2 of the tile's expert and scatters the
rows back to token order. Tiles past the last expert do no work (their K loop is empty).

`MoE.forward` calls it when its `kernel` is "triton": the engine switches every top-1 MoE
layer with unquantised experts to it on a GPU (`Llama4ForCausalLM.use_triton_moe`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.nn import functional as F

from .triton_interpreter import adopt_interpreter, interpreter_enabled

if interpreter_enabled():  # triton may have been imported before TRITON_INTERPRET was set
    adopt_interpreter()


def align_by_expert(expert: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(sorted_ids [P], tile_expert [P // block_m]): token ids grouped by expert, each group
    padded with the sentinel T to a multiple of block_m; the expert of each tile (-1: none)."""
    T = expert.shape[0]
    dev = expert.device
    counts = torch.bincount(expert, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(expert, stable=True)  # tokens sorted by expert
    e_sorted = expert[order]
    rank = torch.arange(T, device=dev) - count_start[e_sorted]
    dest = (padded_end - padded)[e_sorted] + rank
    P = triton.cdiv(T + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((P,), T, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, P, block_m, device=dev)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert


@triton.jit
def _moe_gate_up_kernel(
    X, W13, Inter, Score, sorted_ids, tile_expert,
    T, INTER, HIDDEN,
    s_xt, s_we, s_wn, s_wk, s_it,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid: (tiles, cdiv(INTER, BLOCK_N))
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert + pid_m)
    k_hi = tl.where(e >= 0, HIDDEN, 0)  # padding tiles: no K loop, nothing stored
    e = tl.maximum(e, 0).to(tl.int64)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the sorted order
    tok = tl.load(sorted_ids + p)
    row_ok = tok < T  # padding rows and tiles past the last expert hold the sentinel T
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = W13 + e * s_we
    for k0 in range(0, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        a = tl.load(X + tok.to(tl.int64)[:, None] * s_xt + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + n[None, :] * s_wn + k[:, None] * s_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        wu = tl.load(w_base + (n + INTER)[None, :] * s_wn + k[:, None] * s_wk,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
    s = tl.load(Score + tok, mask=row_ok, other=0.0).to(tl.float32)
    g = acc_g * s[:, None]
    u = acc_u * s[:, None]
    h = g * tl.sigmoid(g) * u
    tl.store(Inter + p.to(tl.int64)[:, None] * s_it + n[None, :], h.to(Inter.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(
    Inter, W2, Out, sorted_ids, tile_expert,
    T, HIDDEN, INTER,
    s_it, s_we, s_wn, s_wk, s_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # grid: (tiles, cdiv(HIDDEN, BLOCK_N)); rows scatter back to token order (top-1: unique)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert + pid_m)
    k_hi = tl.where(e >= 0, INTER, 0)
    e = tl.maximum(e, 0).to(tl.int64)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(sorted_ids + p)
    row_ok = tok < T  # padding rows and tiles past the last expert hold the sentinel T
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < HIDDEN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = W2 + e * s_we
    for k0 in range(0, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        a = tl.load(Inter + p.to(tl.int64)[:, None] * s_it + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[None, :] * s_wn + k[:, None] * s_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    tl.store(Out + tok.to(tl.int64)[:, None] * s_ot + n[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def moe_block_n(dtype: torch.dtype) -> int:
    """BLOCK_N of both GEMMs: 64 for fp16/bf16, 32 for fp32 (two fp32 accumulators spill
    at 64 on sm_80; `ptxas -v`)."""
    return 32 if dtype == torch.float32 else 64


def _interpreted() -> bool:
    return type(_moe_gate_up_kernel).__name__ == "InterpretedFunction"


def moe_top1_experts(
    x: Tensor,  # [T, H]
    w13: Tensor,  # [E, 2I, H] (gate rows first)
    w2: Tensor,  # [E, H, I]
    expert: Tensor,  # [T] int: the chosen expert of each token
    score: Tensor,  # [T]: router score scaling the expert input
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = 32,
) -> Tensor:  # [T, H] routed-expert output
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.empty_like(x)
    if T == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_m = block_m or (16 if T <= 256 else 64)
    block_n = block_n or moe_block_n(x.dtype)
    sorted_ids, tile_expert = align_by_expert(expert.to(torch.int64), E, block_m)
    inter_buf = torch.empty(sorted_ids.shape[0], inter, dtype=x.dtype, device=x.device)
    upcast = x.dtype == torch.bfloat16 and _interpreted()
    prec = "ieee" if (upcast or x.dtype == torch.float32) else "tf32"
    tiles = tile_expert.shape[0]
    _moe_gate_up_kernel[(tiles, triton.cdiv(inter, block_n))](
        x, w13, inter_buf, score.contiguous(), sorted_ids, tile_expert,
        T, inter, H,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), inter_buf.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast, DOT_PREC=prec,
        num_warps=4,
    )
    _moe_down_kernel[(tiles, triton.cdiv(H, block_n))](
        inter_buf, w2, out, sorted_ids, tile_expert,
        T, H, inter,
        inter_buf.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=upcast, DOT_PREC=prec,
        num_warps=4,
    )
    return out


def moe_top1_experts_ref(x: Tensor, w13: Tensor, w2: Tensor, expert: Tensor, score: Tensor) -> Tensor:
    """Torch reference: the routed loop of `MoE.forward` for top_k == 1."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for e in torch.unique(expert).tolist():
        tok = (expert == e).nonzero().squeeze(1)
        routed_in = x[tok] * score[tok, None].to(x.dtype)
        gate, up = F.linear(routed_in, w13[e]).split(inter, dim=-1)
        out[tok] = F.linear(F.silu(gate) * up, w2[e])
    return out
