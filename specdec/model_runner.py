"""Packs requests into one forward over the paged KV cache.

`extend` is the single primitive behind prefill and decode: each request feeds the tokens
after its cached prefix, at positions [num_cached, num_cached + n), writing K/V into the
slots its page table reserved, attending causally over everything cached before.

Hybrid KV (`--swa-full-tokens-ratio`): the chunked-attention layers keep their K/V in a pool
of their own (`swa_pool`) indexed by each request's window table; their metadata lists only the
keys from the chunk of the request's first fed position on (`ForwardBatch.swa_attn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from specdec.kernels.backend import (
    AttentionBackend,
    AttentionMeta,
    ForwardBatch,
    SeqAttnMeta,
)
from specdec.kernels.kv_pool import KVPool
from specdec.target.llama4 import Llama4ForCausalLM, ModelOutput
from specdec.target.vision import VisionTower

from .distributed import TPGroup
from .multimodal import merge_embeds
from .request import Req
from .tree import DraftTree, tree_mask
from .tree import positions as tree_positions


class ExtendOutput(NamedTuple):
    hidden: Tensor  # [T, hidden]
    aux_hidden: list[Tensor]  # per captured layer [T, hidden]
    q_starts: list[int]  # first row of each request in `hidden`
    q_lens: list[int]

    def last_rows(self) -> Tensor:  # [B] row index of each request's last token
        return torch.tensor([s + n - 1 for s, n in zip(self.q_starts, self.q_lens)])


class ModelRunner:
    """Owns one model, its KV pool (over the shared slot space) and an attention backend; with
    hybrid KV, also the chunked layers' pool (`swa_pool`, over the window tables' slots)."""

    def __init__(self, model: Llama4ForCausalLM, pool: KVPool, backend: AttentionBackend,
                 swa_pool: KVPool | None = None, vision: VisionTower | None = None,
                 tp: TPGroup | None = None) -> None:
        self.model = model
        # --tp: rank 0's runner tells the worker ranks each forward, logits call and K/V copy
        # before running it on its own shard (specdec/tp_worker.py runs them there)
        self.tp = tp if tp is not None and tp.world > 1 else None
        self.vision = vision  # --enable-multimodal: image embeddings for requests' <|patch|> positions
        self.pool = pool
        self.swa_pool = swa_pool
        self.backend = backend
        self.device = (pool.k or (swa_pool.k if swa_pool is not None else []))[0].device  # model, pools, inputs
        # per model layer: its K/V tensors (the full pool holds the full layers, in order, and
        # with hybrid KV the window pool the chunked ones)
        chunked = [model.cfg.chunk_size(i) is not None for i in range(model.cfg.num_layers)]
        self.swa_layers = tuple(chunked) if swa_pool is not None else (False,) * len(chunked)
        full_iter, swa_iter = iter(range(len(pool.k))), iter(range(0 if swa_pool is None else len(swa_pool.k)))
        self.kv_k: list[Tensor] = []
        self.kv_v: list[Tensor] = []
        for is_swa in self.swa_layers:
            src, j = (swa_pool, next(swa_iter)) if is_swa and swa_pool is not None else (pool, next(full_iter))
            self.kv_k.append(src.k[j])
            self.kv_v.append(src.v[j])
        self.chunk_size = model.cfg.attention_chunk_size if swa_pool is not None else None

    @torch.inference_mode()
    def extend(
        self,
        reqs: Sequence[Req],
        tokens: Sequence[Sequence[int]],
        capture_layers: tuple[int, ...] = (),
    ) -> ExtendOutput:
        """Feed `tokens[i]` after `reqs[i].num_cached` cached tokens (slots must be reserved)."""
        seqs: list[SeqAttnMeta] = []
        out_slots: list[Tensor] = []
        positions: list[Tensor] = []
        q_starts: list[int] = []
        q_lens: list[int] = []
        start = 0
        swa: list[SeqAttnMeta] = []
        swa_out: list[Tensor] = []
        for req, toks in zip(reqs, tokens, strict=True):
            n = len(toks)
            c = req.num_cached
            end = c + n
            slots = req.kv_slots(end)  # [end]
            kv_pos = torch.arange(end)
            q_pos = kv_pos[c:]
            seqs.append(SeqAttnMeta(start, n, slots, q_pos, kv_pos, None))
            out_slots.append(slots[c:])
            if self.chunk_size is not None:  # the window: from the chunk of position c on
                w = c - c % self.chunk_size
                wslots = req.swa_slots(w, end)  # [end - w]
                swa.append(SeqAttnMeta(start, n, wslots, q_pos, kv_pos[w:], None))
                swa_out.append(wslots[c - w:])
            positions.append(q_pos)
            q_starts.append(start)
            q_lens.append(n)
            start += n
        ids = torch.tensor([t for toks in tokens for t in toks], dtype=torch.long)
        decode = len(seqs) > 1 and all(n == 1 for n in q_lens)
        swa_meta = None if not swa else AttentionMeta(torch.cat(swa_out), tuple(swa), decode)
        embeds = self._image_embeds(reqs, ids, q_starts, q_lens)
        return self._forward(ids, positions, seqs, out_slots, capture_layers, q_starts, q_lens, decode, swa_meta,
                             embeds)

    def _image_embeds(self, reqs: Sequence[Req], ids: Tensor, q_starts: list[int], q_lens: list[int]) -> Tensor | None:
        """Input embeddings [T, hidden] with the image rows at the fed <|patch|> positions, when
        a request of the batch feeds some; else None (the model embeds the ids itself)."""
        spans = [(row, req.mm, req.num_cached, req.num_cached + n)
                 for req, row, n in zip(reqs, q_starts, q_lens, strict=True)
                 if req.mm is not None and req.mm.overlaps(req.num_cached, req.num_cached + n)]
        if not spans:
            return None
        if self.vision is None:
            raise RuntimeError("a request with images reached an engine without the vision tower")
        for _, mm, _, _ in spans:
            assert mm is not None
            mm.ensure_embeds(self.vision)
        return merge_embeds(self.model.embed(ids.to(self.device)), spans)

    @torch.inference_mode()
    def verify_trees(
        self, reqs: Sequence[Req], trees: Sequence[DraftTree], capture_layers: tuple[int, ...] = ()
    ) -> ExtendOutput:
        """One forward over every tree's nodes: node i of a request with c cached tokens sits
        at position c + depth(i), in slot c + i, and sees the prefix plus its ancestors.
        Root-only trees everywhere (no request speculates) are a plain decode step: `extend`."""
        if all(t.size == 1 for t in trees):
            return self.extend(reqs, [list(t.tokens) for t in trees], capture_layers)
        seqs: list[SeqAttnMeta] = []
        out_slots: list[Tensor] = []
        positions: list[Tensor] = []
        q_starts: list[int] = []
        q_lens: list[int] = []
        start = 0
        swa: list[SeqAttnMeta] = []
        swa_out: list[Tensor] = []
        for req, tree in zip(reqs, trees, strict=True):
            c, n = req.num_cached, tree.size
            slots = req.kv_slots(c + n)
            q_pos = tree_positions(tree, c)  # [N]
            kv_pos = torch.cat((torch.arange(c), q_pos))
            mask = torch.ones(n, c + n, dtype=torch.bool)
            mask[:, c:] = tree_mask(tree)
            seqs.append(SeqAttnMeta(start, n, slots, q_pos, kv_pos, mask))
            out_slots.append(slots[c:])
            if self.chunk_size is not None:  # nodes past a chunk boundary see only their chunk
                w = c - c % self.chunk_size
                wslots = req.swa_slots(w, c + n)  # [c - w + N]
                swa.append(SeqAttnMeta(start, n, wslots, q_pos, kv_pos[w:], mask[:, w:]))
                swa_out.append(wslots[c - w:])
            positions.append(q_pos)
            q_starts.append(start)
            q_lens.append(n)
            start += n
        ids = torch.tensor([t for tree in trees for t in tree.tokens], dtype=torch.long)
        swa_meta = AttentionMeta(torch.cat(swa_out), tuple(swa)) if swa else None
        return self._forward(ids, positions, seqs, out_slots, capture_layers, q_starts, q_lens, swa_meta=swa_meta)

    def _forward(
        self,
        ids: Tensor,
        positions: list[Tensor],
        seqs: list[SeqAttnMeta],
        out_slots: list[Tensor],
        capture_layers: tuple[int, ...],
        q_starts: list[int],
        q_lens: list[int],
        decode: bool = False,  # a plain decode batch (AttentionMeta.decode)
        swa_meta: AttentionMeta | None = None,
        embeds: Tensor | None = None,  # [T, hidden] input embeddings (images), else the ids' own
    ) -> ExtendOutput:
        meta = AttentionMeta(out_slots=torch.cat(out_slots), seqs=tuple(seqs), decode=decode)
        pos = torch.cat(positions)
        if self.tp is not None:
            self.tp.broadcast(("forward", ids, pos, meta, swa_meta, capture_layers, embeds))
        out = self.forward_local(ids, pos, meta, swa_meta, capture_layers, embeds)
        return ExtendOutput(out.hidden, out.aux_hidden, q_starts, q_lens)

    def forward_local(self, ids: Tensor, positions: Tensor, meta: AttentionMeta, swa_meta: AttentionMeta | None,
                      capture_layers: tuple[int, ...], embeds: Tensor | None) -> ModelOutput:
        """One forward of this rank's model over its pools (`meta` on the host)."""
        batch = ForwardBatch(meta.to(self.device), self.kv_k, self.kv_v, self.backend, capture_layers,
                             None if swa_meta is None else swa_meta.to(self.device))
        pos = positions.to(self.device)
        if embeds is not None:
            return self.model(None, pos, batch, input_embeds=embeds.to(self.device))
        return self.model(ids.to(self.device), pos, batch)

    def commit_moves(self, req: Req, moves: list[tuple[int, int]]) -> None:
        """Copy K/V of positions src -> dst (pairs of `moves`) in every pool: the accepted path
        of a verified tree, compacted (specdec/spec_decoder.py)."""
        end = max(max(s, d) for s, d in moves) + 1
        slots = req.kv_slots(end)
        full = (slots[[s for s, _ in moves]], slots[[d for _, d in moves]])
        window = None
        if self.swa_pool is not None:
            w = min(min(s, d) for s, d in moves)
            wslots = req.swa_slots(w, end)
            window = (wslots[[s - w for s, _ in moves]], wslots[[d - w for _, d in moves]])
        if self.tp is not None:
            self.tp.broadcast(("copy", full, window))
        self.copy_local(full, window)

    def copy_local(self, full: tuple[Tensor, Tensor], window: tuple[Tensor, Tensor] | None) -> None:
        """K/V of slots src -> dst in this rank's full pool and (hybrid KV) its window pool."""
        self.pool.copy_slots(*full)
        if window is not None:
            assert self.swa_pool is not None
            self.swa_pool.copy_slots(*window)

    def logits(self, hidden: Tensor) -> Tensor:  # [N, hidden] -> [N, vocab] fp32, on the CPU
        """Sampling and verification run on the CPU; on a GPU only the logits come back."""
        if self.tp is not None:
            self.tp.broadcast(("logits", hidden.cpu()))
        with torch.inference_mode():
            return self.model.compute_logits(hidden).cpu()
