"""The EAGLE3 head split over the `--tp` ranks the way the target is (target/tp.py):

    fc          input columns 3 H_t / N per rank (each rank has every aux hidden state; its
                slice's products are partial sums, all-reduced)
    attention   q heads H/N per rank; KV heads Hkv/N, or one replicated head per rank when
                Hkv < N (rank r takes head r * Hkv // N); o_proj the rank's heads' columns
                (partial sums, all-reduced); each rank keeps its heads' K/V in its own draft pool
    MLP         gate/up rows and down columns by I / N (partial sums, all-reduced)
    lm_head     draft-vocabulary rows ceil(Vd / N) per rank, zero rows padding the last ones
                (logits all-gathered in rank order, the padding cut off)
    embedding   the target's, vocabulary-parallel (target.embed: the ranks' rows summed); a head
                with its own embedding keeps it whole
    norms, d2t  replicated

Every rank loads the whole head (a head is small next to its target) and keeps its slices; rank
0's proposer (draft/eagle3_proposer.py) broadcasts each draft call (`draft_features`,
`draft_forward`, `draft_logits`) so the ranks meet at the same collectives. A head whose sizes do
not divide by N is not split (`split_problem` says why, from its config alone): it then runs
whole on rank 0, and the workers load none of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from specdec.distributed import TPGroup
from specdec.target.layers import GatedMLP, Linear
from specdec.target.llama4 import Llama4ForCausalLM
from specdec.target.loader import load_full_embeddings

from .eagle3 import Eagle3Draft
from .eagle3_config import Eagle3Config
from .loader import load_eagle3


class DraftSplit(NamedTuple):
    """What one rank holds of the head: [lo, hi) ranges."""

    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    inter: tuple[int, int]
    vocab: tuple[int, int]  # of the draft vocabulary (hi may pass Vd: zero rows to ceil(Vd / N) each)
    fc_in: tuple[int, int]  # of fc's input columns (the concatenated aux hidden states)


def split_problem(cfg: Eagle3Config, world: int) -> str | None:
    """Why the head cannot be split over `world` ranks, or None when it can."""
    sizes = {"num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
             "3 x target_hidden_size": 3 * cfg.target_hidden_size}
    for name, n in sizes.items():
        if n % world:
            return f"the EAGLE3 head's {name} = {n} does not divide by --tp {world}"
    if cfg.num_kv_heads % world and world % cfg.num_kv_heads:
        return f"the EAGLE3 head's num_key_value_heads = {cfg.num_kv_heads} neither divides by nor divides --tp {world}"
    return None


def plan_split(cfg: Eagle3Config, rank: int, world: int) -> DraftSplit:
    problem = split_problem(cfg, world)
    if problem is not None:
        raise ValueError(problem)

    def part(total: int) -> tuple[int, int]:
        n = total // world
        return rank * n, (rank + 1) * n

    hkv = cfg.num_kv_heads
    kv = part(hkv) if hkv % world == 0 else (rank * hkv // world, rank * hkv // world + 1)
    rows = -(-cfg.draft_vocab_size // world)
    return DraftSplit(part(cfg.num_heads), kv, part(cfg.intermediate_size), (rank * rows, (rank + 1) * rows),
                      part(3 * cfg.target_hidden_size))


def _linear(weight: Tensor, out_sizes: tuple[int, ...]) -> Linear:
    lin = Linear(weight.shape[1], out_sizes)
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    return lin


def shard_eagle3(draft: Eagle3Draft, target: Llama4ForCausalLM, tp: TPGroup) -> DraftSplit:
    """Keep this rank's slices of a whole head (before quantisation), in place; the head then
    meets the other ranks at its all-reduces and its logits' all-gather."""
    cfg, D = draft.cfg, draft.cfg.head_dim
    split = plan_split(cfg, tp.rank, tp.world)
    (h0, h1), (k0, k1), (i0, i1), (v0, v1), (f0, f1) = split
    q_size, kv_size = cfg.num_heads * D, cfg.num_kv_heads * D
    qkv = draft.qkv.weight.data
    q = qkv[h0 * D : h1 * D]
    k = qkv[q_size + k0 * D : q_size + k1 * D]
    v = qkv[q_size + kv_size + k0 * D : q_size + kv_size + k1 * D]
    draft.qkv = _linear(torch.cat([q, k, v]), ((h1 - h0) * D, (k1 - k0) * D, (k1 - k0) * D))
    draft.o_proj = _linear(draft.o_proj.weight.data[:, h0 * D : h1 * D], (cfg.hidden_size,))
    gu, down = draft.mlp.gate_up.weight.data, draft.mlp.down.weight.data
    inter = cfg.intermediate_size
    mlp = GatedMLP(cfg.hidden_size, i1 - i0)
    mlp.gate_up = _linear(torch.cat([gu[i0:i1], gu[inter + i0 : inter + i1]]), (i1 - i0, i1 - i0))
    mlp.down = _linear(down[:, i0:i1], (cfg.hidden_size,))
    draft.mlp = mlp
    head = draft.lm_head.weight.data
    rows = head.new_zeros(v1 - v0, head.shape[1])
    mine = head[v0 : min(v1, cfg.draft_vocab_size)]
    rows[: mine.shape[0]] = mine
    draft.lm_head = _linear(rows, (v1 - v0,))
    draft.fc = _linear(draft.fc.weight.data[:, f0:f1], (cfg.hidden_size,))
    draft.num_heads, draft.num_kv_heads = h1 - h0, k1 - k0
    draft.q_size, draft.kv_size = (h1 - h0) * D, (k1 - k0) * D
    draft.tp, draft.fc_cols = tp, (f0, f1)
    if draft.embed_tokens is None:  # the target's embedding, vocabulary-parallel like the target's
        draft.target_embed = target.embed
        draft._shared_embedding = None
    return split


def load_eagle3_for_rank(head: str | Path, model_path: Path, target: Llama4ForCausalLM, dtype: str,
                         tp: TPGroup) -> tuple[Eagle3Draft, str | None]:
    """A --tp rank's EAGLE3 head: loaded whole beside the target's full embedding and lm_head
    (a head may share or copy them), then split (`shard_eagle3`) when its sizes divide by the
    ranks; returns (head, None), or (the whole head, why it was not split)."""
    draft = load_eagle3(head, load_full_embeddings(model_path, target), dtype)
    problem = split_problem(draft.cfg, tp.world)
    if problem is None:
        shard_eagle3(draft, target, tp)
    return draft, problem
