"""Tensor parallelism: what one rank of `--tp N` holds of the Llama 4 text model, and the slice
of each checkpoint tensor it loads.

Megatron's split, as SGLang and vLLM shard Llama 4:

    attention   q heads H/N per rank; KV heads Hkv/N, or one replicated head per rank when
                Hkv < N (rank r takes head r * Hkv // N); o_proj takes the rank's heads'
                columns: its outputs are partial sums (all-reduced)
    dense MLP   gate/up rows and down columns by I_mlp / N (partial sums)
    MoE         tensor-parallel experts (--ep-size 1): every expert's gate/up rows and down
                columns by I / N; expert-parallel (--ep-size P, P dividing N): the ranks form P
                groups of N / P, group g holds experts [g E / P, (g + 1) E / P) and splits
                each of them by I / (N / P) (P = N: whole experts, no expert is split); the
                shared expert's gate/up rows and down columns by I / N either way; the router
                is replicated and tokens routed elsewhere add nothing; one all-reduce of the
                routed and shared sums
    embedding   vocabulary rows V/N per rank, the other ranks' ids give zeros (all-reduced)
    lm_head     vocabulary rows V/N per rank (logits all-gathered)
    norms       replicated

A row-parallel bias (o_proj's, dense Llama with attention_bias) is added by rank 0 alone.
Sizes that do not divide by N are refused with a ConfigError naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig


class ExpertPart(NamedTuple):
    """The routed experts an MoE layer of one rank holds: global ids [lo, hi), each of
    intermediate width `inter`."""

    lo: int
    hi: int
    inter: int


@dataclass(frozen=True, slots=True)
class TPShard:
    rank: int
    world: int
    heads: tuple[int, int]  # [lo, hi) of the q heads
    kv_heads: tuple[int, int]  # [lo, hi) of the KV heads (one replicated head when Hkv < N)
    inter: tuple[int, int]  # [lo, hi) of the shared expert's intermediate dim
    inter_mlp: tuple[int, int]  # [lo, hi) of the dense MLP's intermediate dim
    vocab: tuple[int, int]  # [lo, hi) of the vocabulary (embedding and lm_head rows)
    experts: tuple[int, int] = (0, 0)  # [lo, hi) of the routed experts held (all of them at --ep-size 1)
    expert_inter: tuple[int, int] = (0, 0)  # [lo, hi) of each held expert's intermediate dim

    @property
    def expert_part(self) -> ExpertPart:
        return ExpertPart(self.experts[0], self.experts[1], self.expert_inter[1] - self.expert_inter[0])

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The rank's model: its heads and intermediate sizes (the vocabulary stays whole in
        the config; the embedding and lm_head take `vocab`)."""
        return replace(cfg, num_heads=self.heads[1] - self.heads[0], num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                       intermediate_size=self.inter[1] - self.inter[0],
                       intermediate_size_mlp=self.inter_mlp[1] - self.inter_mlp[0])


def _split(total: int, rank: int, world: int, name: str, flag: str = "--tp") -> tuple[int, int]:
    if total % world:
        raise ConfigError(f"{name} = {total} does not divide by {flag} {world}")
    part = total // world
    return rank * part, (rank + 1) * part


def plan_shard(cfg: ModelConfig, rank: int, world: int, ep: int = 1) -> TPShard:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of --tp {world}")
    if ep < 1 or world % ep:
        raise ConfigError(f"--ep-size {ep} must divide --tp {world}")
    if ep > 1 and not cfg.moe_layers:
        raise ConfigError(f"--ep-size {ep}: {cfg.architecture} has no MoE layers (no experts to place)")
    heads = _split(cfg.num_heads, rank, world, "num_attention_heads")
    hkv = cfg.num_kv_heads
    if hkv % world == 0:
        kv = _split(hkv, rank, world, "num_key_value_heads")
    elif world % hkv == 0:
        kv_head = rank * hkv // world  # replicated: world / hkv ranks share each KV head
        kv = (kv_head, kv_head + 1)
    else:
        raise ConfigError(f"num_key_value_heads = {hkv} neither divides by nor divides --tp {world}")
    inter = _split(cfg.intermediate_size, rank, world, "intermediate_size") if cfg.moe_layers else (0, 0)
    mlp_layers = cfg.num_layers - len(set(cfg.moe_layers))
    inter_mlp = _split(cfg.intermediate_size_mlp, rank, world, "intermediate_size_mlp") if mlp_layers else (0, 0)
    vocab = _split(cfg.vocab_size, rank, world, "vocab_size")
    experts, expert_inter = (0, 0), (0, 0)
    if cfg.moe_layers:
        group = world // ep  # the ranks sharing one expert group, each with a width slice
        experts = _split(cfg.num_experts, rank // group, ep, "num_local_experts", "--ep-size")
        expert_inter = _split(cfg.intermediate_size, rank % group, group, "intermediate_size",
                              f"--tp / --ep-size = {world} / {ep} =")
    return TPShard(rank, world, heads, kv, inter, inter_mlp, vocab, experts, expert_inter)


_LAYER = re.compile(r"layers\.\d+\.(.+)")


class TensorSlice(NamedTuple):
    """A rank's part of a tensor: the ranges of one dim, concatenated; `zero`: the rank holds
    zeros of that shape (a row-parallel bias is added by rank 0 alone)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    zero: bool = False
    experts: tuple[int, int] | None = None  # and of dim 0 (stacked experts) only these


def tensor_slice(shard: TPShard, cfg: ModelConfig, param: str, part: int | None, is_bias: bool) -> TensorSlice | None:
    """Which part of parameter `param`'s checkpoint tensor (after its load transform; unit
    `part` of a stacked Linear: 0/1/2 = q/k/v, 0/1 = gate/up) this rank loads; None: all of it."""
    if shard.world == 1:
        return None
    D = cfg.head_dim
    if param in ("embed_tokens.weight", "lm_head.weight"):
        return TensorSlice(0, (shard.vocab,))
    m = _LAYER.fullmatch(param)
    if m is None:
        return None  # the final norm
    rest = m.group(1)
    if rest.startswith("attn.qkv."):
        lo, hi = shard.heads if part == 0 else shard.kv_heads
        return TensorSlice(0, ((lo * D, hi * D),))
    if rest == "attn.o_proj.weight":
        return TensorSlice(1, ((shard.heads[0] * D, shard.heads[1] * D),))
    if rest == "attn.o_proj.bias":
        return None if shard.rank == 0 else TensorSlice(0, (), zero=True)
    if rest.endswith(("experts.w13", "experts.w2")):  # [E, 2I, H] gate rows first; [E, H, I]
        lo, hi = shard.expert_inter
        inter = cfg.intermediate_size
        if rest.endswith("w13"):
            return TensorSlice(1, ((lo, hi), (inter + lo, inter + hi)), experts=shard.experts)
        return TensorSlice(2, ((lo, hi),), experts=shard.experts)
    lo, hi = shard.inter if "shared_expert" in rest else shard.inter_mlp
    if rest.endswith("gate_up.weight"):
        return TensorSlice(0, ((lo, hi),))
    if rest.endswith("down.weight"):
        return TensorSlice(1, ((lo, hi),))
    return None  # norms, the router


def apply_slice(value: Tensor, sl: TensorSlice | None) -> Tensor:
    if sl is None:
        return value
    if sl.zero:
        return torch.zeros_like(value)
    if sl.experts is not None:
        value = value[sl.experts[0]:sl.experts[1]]
    return torch.cat([value.narrow(sl.dim, lo, hi - lo) for lo, hi in sl.ranges], dim=sl.dim)
