"""EAGLE3 tree drafting over the shared paged KV.

The draft's K/V live in their own pool over the *same* slot space as the target's, indexed
through the request's page table. Committed draft positions [0, c) mirror the target's
cached prefix. While drafting, the node forwarded t-th in the current tree writes its K/V at
scratch position c + t, and attends to the committed prefix plus the scratch slots of its
own ancestors (true tree ancestry; SGLang's draft phase does not do this, sglang#7523).

Draft positions: the forward at a node of depth d >= 1 takes that node's token with the
hidden state of its parent's forward, at draft position c - 1 + d (the root's "forward" is
the last row of `extend`, at draft position c - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.distributed import TPGroup
from specdec.kernels.backend import AttentionBackend, AttentionMeta, ForwardBatch, SeqAttnMeta
from specdec.kernels.kv_pool import KVPool
from specdec.multimodal import merge_embeds
from specdec.request import Req
from specdec.sampler import processed_probs
from specdec.spec_config import SpecConfig
from specdec.spec_state import DraftRoot, PendingFeatures
from specdec.tree import DraftTree, static_rank_tree, tree_from_candidates
from specdec.tree_shape import TreeShape

from .eagle3 import DraftOutput, Eagle3Draft
from .ngram_merge import MIN_SAMPLED_COPY_MATCH, attach_chain, merge_greedy, request_chain
from .proposer import Proposer
from .tree_builders import GreedyTreeBuilder, SampledTreeBuilder, top_children


@dataclass
class _NodeJob:
    """One node forwarded in a drafting step."""

    req: int  # index into the request batch
    node: int  # builder-specific node id
    token: int
    feature: Tensor  # [H] hidden of the parent's forward
    depth: int
    scratch: int  # scratch index t (position c + t)
    ancestors: list[int]  # scratch indices of ancestors with depth >= 1


class Eagle3Proposer(Proposer):
    name = "EAGLE3"

    def __init__(
        self,
        draft: Eagle3Draft,
        pool: KVPool,
        backend: AttentionBackend,
        spec: SpecConfig,
        target_num_layers: int,
        target_vocab_size: int,
        tp: TPGroup | None = None,
    ) -> None:
        """`tp`: the head is split over the --tp ranks (draft/eagle3_tp.py); each draft call is
        broadcast to the worker ranks before it runs here (None: the head is whole on this rank)."""
        self.draft = draft
        self.tp = tp if tp is not None and tp.world > 1 else None
        self.pool = pool
        self.backend = backend
        self.spec = spec
        self.vocab_size = target_vocab_size
        self.capture_layers = draft.cfg.capture_layers(target_num_layers)
        self.temp_slots = eagle3_temp_slots(spec)
        self.device = pool.k[0].device
        hot = torch.arange(draft.cfg.draft_vocab_size, device=self.device)
        self.hot_ids = draft.to_target_ids(hot).cpu()  # [Vd]; tree building runs on the CPU
        self._hot_bits: tuple[Tensor, Tensor] | None = None  # structured outputs: (word, bit) per draft id

    # ---- the draft's calls: with a split head each is broadcast first (the ranks meet inside) --------
    def features(self, aux: list[Tensor]) -> Tensor:  # per aux layer [T, H_t] -> [T, H]
        if self.tp is not None:
            self.tp.broadcast(("draft_features", [a.cpu() for a in aux]))
        return self.draft.project_features(aux)

    def forward(self, ids: Tensor, feats: Tensor, positions: Tensor, seqs: list[SeqAttnMeta],
                out_slots: list[Tensor], embeds: Tensor | None = None) -> DraftOutput:
        """One draft forward over `seqs` (host metadata), K/V written at `out_slots`."""
        meta = AttentionMeta(out_slots=torch.cat(out_slots), seqs=tuple(seqs))
        if self.tp is not None:
            self.tp.broadcast(("draft_forward", ids.cpu(), feats.cpu(), positions.cpu(), meta,
                               None if embeds is None else embeds.cpu()))
        return draft_forward(self.draft, self.pool, self.backend, ids, feats, positions, meta, embeds)

    def logits(self, hidden: Tensor) -> Tensor:  # [N, H] -> [N, draft vocab] fp32, on the CPU
        if self.tp is not None:
            self.tp.broadcast(("draft_logits", hidden.cpu()))
        return self.draft.draft_logits(hidden).cpu()

    # ---- extend: commit draft K/V for new positions ----------------------------------------------
    @torch.inference_mode()
    def extend(self, reqs: Sequence[Req], pending: Sequence[PendingFeatures]) -> None:
        ids: list[int] = []
        feats: list[Tensor] = []
        positions: list[Tensor] = []
        seqs: list[SeqAttnMeta] = []
        out_slots: list[Tensor] = []
        last_rows: list[int] = []
        row = 0
        for req, p in zip(reqs, pending, strict=True):
            m = p.features.shape[0]
            start, end = p.start, p.start + m
            ids.extend(p.ids)  # shifted by one: h_p pairs with x_{p+1}
            feats.append(p.features)
            slots = req.kv_slots(end)
            kv_pos = torch.arange(end)
            seqs.append(SeqAttnMeta(row, m, slots, kv_pos[start:], kv_pos, None))
            out_slots.append(slots[start:])
            positions.append(kv_pos[start:])
            row += m
            last_rows.append(row - 1)
        x = self.features(list(torch.cat(feats).split(self.draft.cfg.target_hidden_size, dim=-1)))
        id_t = torch.tensor(ids, device=self.device)
        out = self.forward(id_t, x, torch.cat(positions), seqs, out_slots, self._image_embeds(reqs, pending, id_t))
        rows = torch.tensor(last_rows)
        logits = self.logits(out.logits_hidden[rows])  # [B, Vd]
        for i, req in enumerate(reqs):
            req.spec.root = DraftRoot(out.hidden[last_rows[i]], logits[i])

    def _image_embeds(self, reqs: Sequence[Req], pending: Sequence[PendingFeatures], ids: Tensor) -> Tensor | None:
        """The draft's input embeddings with the target's image rows at <|patch|> positions (the
        draft sees position p + 1's token beside p's features), as vLLM and SGLang feed EAGLE3
        with images; None when no request's span holds one (or the widths differ)."""
        spans = []
        row = 0
        for req, p in zip(reqs, pending, strict=True):
            m = p.features.shape[0]
            if req.mm is not None and req.mm.embeds is not None and req.mm.overlaps(p.start + 1, p.start + 1 + m):
                spans.append((row, req.mm, p.start + 1, p.start + 1 + m))
            row += m
        if not spans:
            return None
        x = self.draft.embed(ids)
        if spans[0][1].embeds.shape[-1] != x.shape[-1]:  # type: ignore[union-attr]
            return None
        return merge_embeds(x, spans)

    # ---- propose: grow one tree per request ------------------------------------------------------
    def _target_probs(self, req: Req, draft_logits: Tensor) -> Tensor:
        """The request's processed distribution over *target* ids from draft logits [Vd]."""
        # processing only the draft vocabulary gives the same distribution as processing the
        # full vocabulary with -inf elsewhere (temperature, top-k/p, min-p keep zeros at zero)
        full = torch.zeros(self.vocab_size)
        full[self.hot_ids] = processed_probs(draft_logits[None], [req.params])[0]
        return full

    def _grammar_masked(self, req: Req, path: list[int], draft_logits: Tensor) -> Tensor:
        """Draft logits [Vd] after the root plus `path`, with the tokens the request's grammar
        refuses there at -inf (unchanged without a grammar, or where it allows no draft token:
        such a node's children are refused in verification anyway)."""
        if req.grammar is None:
            return draft_logits
        mask = req.grammar.bitmask_after(path)
        if mask is None:
            return draft_logits
        if self._hot_bits is None:  # where each draft token's target id sits in a bitmask
            self._hot_bits = (self.hot_ids >> 5, (self.hot_ids & 31).to(torch.int32))
        words, bits = self._hot_bits
        allowed = ((mask[0, words] >> bits) & 1).bool()  # [Vd]
        if not bool(allowed.any()):
            return draft_logits
        return draft_logits.masked_fill(~allowed, float("-inf"))

    def _copy_chain(self, req: Req, budget: int) -> tuple[list[int], int]:
        """`--speculative-ngram-merge`: the continuation of the request's final n-gram found
        earlier in its own prompt and output (up to `budget` tokens), and the matched n."""
        if not self.spec.ngram_merge:
            return [], 0
        return request_chain(req, self.spec.ngram_min_match, self.spec.ngram_max_match, budget)

    @torch.inference_mode()
    def propose(self, reqs: Sequence[Req], shapes: Sequence[TreeShape]) -> list[DraftTree]:
        chains = [self._copy_chain(r, sh.num_draft_tokens - 1) for r, sh in zip(reqs, shapes, strict=True)]
        builders: list[GreedyTreeBuilder | SampledTreeBuilder] = []
        # per request: node id -> (hidden of its forward, scratch index, ancestor scratch list)
        hidden: list[dict[int, Tensor]] = []
        scratch: list[dict[int, tuple[int, list[int]]]] = []
        frontier: list[list[int]] = []
        greedy = [r.params.is_greedy for r in reqs]
        constrained = any(r.grammar is not None for r in reqs)
        # the roots' children of every greedy request in one log-softmax + top-k
        kmax = max((sh.topk for sh, g in zip(shapes, greedy, strict=True) if g), default=0)
        states = [_root(r) for r in reqs]
        roots = [self._grammar_masked(r, [], st.logits) for r, st, g in zip(reqs, states, greedy, strict=True) if g]
        root_kids = iter(zip(*top_children(torch.stack(roots), kmax, self.hot_ids), strict=True)) if roots else None
        for req, shape, is_greedy, (chain, n), state in zip(reqs, shapes, greedy, chains, states, strict=True):
            assert shape.drafts and shape.fits(self.spec.envelope), shape
            root = req.all_ids[-1]
            if is_greedy:
                assert root_kids is not None
                gb = GreedyTreeBuilder(root, shape.topk, shape.num_draft_tokens - 1)
                frontier.append(gb.add_children(-1, *next(root_kids)))
                builders.append(gb)
            else:
                # copied tokens take part of the budget, decided from the context alone (a
                # sampled tree's shape never depends on the sampled values)
                reserve = min(len(chain), (shape.num_draft_tokens - 1) // 2) if n >= MIN_SAMPLED_COPY_MATCH else 0
                sb = SampledTreeBuilder(root, shape.num_steps, shape.topk, shape.num_draft_tokens - 1 - reserve,
                                        self.vocab_size, req.generator)
                sb.add_children(0, self._target_probs(req, self._grammar_masked(req, [], state.logits)))
                builders.append(sb)
                frontier.append(sb.expandable(1))
            hidden.append({-1 if is_greedy else 0: state.hidden})  # the root's key
            scratch.append({})
        for _step in range(2, max(s.num_steps for s in shapes) + 1):
            # a request drafts nodes of depth _step only while its shape is that deep
            frontier = [f if _step <= shape.num_steps else [] for f, shape in zip(frontier, shapes, strict=True)]
            jobs = self._jobs(reqs, builders, frontier, hidden, scratch)
            if not jobs:
                break
            out_hidden, logits = self._forward_nodes(reqs, jobs)
            for j, job in enumerate(jobs if constrained else ()):  # structured outputs: draft only
                if reqs[job.req].grammar is not None:  # what the grammar allows
                    logits[j] = self._grammar_masked(reqs[job.req], _path_tokens(builders[job.req], job.node),
                                                     logits[j])
            rows = [j for j, job in enumerate(jobs) if greedy[job.req]]
            kids = iter(zip(*top_children(logits[rows], kmax, self.hot_ids), strict=True)) if rows else None
            per_req_new: list[list[int]] = [[] for _ in reqs]
            for j, job in enumerate(jobs):
                b = builders[job.req]
                hidden[job.req][job.node] = out_hidden[j]
                if isinstance(b, GreedyTreeBuilder):
                    assert kids is not None
                    per_req_new[job.req] += b.add_children(job.node, *next(kids))
                else:
                    b.add_children(job.node, self._target_probs(reqs[job.req], logits[j]))
            frontier = [b.best(per_req_new[r]) if isinstance(b, GreedyTreeBuilder) else b.expandable(_step)
                        for r, b in enumerate(builders)]
        return [self._finish(b, chain, n, shape.num_draft_tokens - 1)
                for b, (chain, n), shape in zip(builders, chains, shapes, strict=True)]

    @staticmethod
    def _finish(b: GreedyTreeBuilder | SampledTreeBuilder, chain: list[int], n: int, budget: int) -> DraftTree:
        if not chain:
            return b.finish()
        if isinstance(b, GreedyTreeBuilder):
            cands, _ = merge_greedy(b.root_token, b.cands, chain, n, budget)
            return tree_from_candidates(b.root_token, cands, min(budget, len(cands)))
        if n < MIN_SAMPLED_COPY_MATCH:
            return b.finish()
        return attach_chain(b.finish(), chain, budget)

    def _jobs(
        self,
        reqs: Sequence[Req],
        builders: list[GreedyTreeBuilder | SampledTreeBuilder],
        frontier: list[list[int]],
        hidden: list[dict[int, Tensor]],
        scratch: list[dict[int, tuple[int, list[int]]]],
    ) -> list[_NodeJob]:
        jobs = []
        for r, b in enumerate(builders):
            for node in frontier[r]:
                if isinstance(b, GreedyTreeBuilder):
                    parent = b.cands[node].parent
                    token, depth = b.cands[node].token, b.depth[node]
                else:
                    parent = b.parents[node]
                    token, depth = b.tokens[node], b.depth[node]
                # ancestors with scratch K/V: the parent's plus the parent itself (depth >= 2)
                anc = [] if depth == 1 else [*scratch[r][parent][1], scratch[r][parent][0]]
                t = len(scratch[r])
                scratch[r][node] = (t, anc)
                jobs.append(_NodeJob(r, node, token, hidden[r][parent], depth, t, anc))
        return jobs

    def _forward_nodes(self, reqs: Sequence[Req], jobs: list[_NodeJob]) -> tuple[Tensor, Tensor]:
        """One draft forward over every job (jobs come grouped by request, in request order);
        returns hidden [J, H] and draft logits [J, Vd] in job order."""
        seqs: list[SeqAttnMeta] = []
        out_slots: list[Tensor] = []
        row = 0
        while row < len(jobs):
            r = jobs[row].req
            end = row
            while end < len(jobs) and jobs[end].req == r:
                end += 1
            rjobs = jobs[row:end]
            c = reqs[r].num_cached
            t_end = max(j.scratch for j in rjobs) + 1
            slots = reqs[r].kv_slots(c + t_end)  # committed prefix + scratch so far
            # visible: the committed prefix, the node's scratch ancestors and itself
            tail = [[False] * t_end for _ in rjobs]
            for q, job in enumerate(rjobs):
                for a in (*job.ancestors, job.scratch):
                    tail[q][a] = True
            mask = torch.cat((torch.ones(len(rjobs), c, dtype=torch.bool), torch.tensor(tail)), dim=1)
            scratch_pos = torch.tensor([c + j.scratch for j in rjobs])
            q_pos = torch.tensor([c - 1 + j.depth for j in rjobs])
            kv_pos = torch.arange(c + t_end)  # unused without chunking; mask decides
            seqs.append(SeqAttnMeta(row, len(rjobs), slots, q_pos, kv_pos, mask))
            out_slots.append(slots[scratch_pos])
            row = end
        ids = torch.tensor([j.token for j in jobs])
        feats = torch.stack([j.feature for j in jobs])
        positions = torch.cat([s.q_positions for s in seqs])
        out = self.forward(ids, feats, positions, seqs, out_slots)
        return out.hidden, self.logits(out.logits_hidden)


def draft_forward(draft: Eagle3Draft, pool: KVPool, backend: AttentionBackend, ids: Tensor, feats: Tensor,
                  positions: Tensor, meta: AttentionMeta, embeds: Tensor | None) -> DraftOutput:
    """One draft forward on this rank's pool (rank 0's proposer and, with a split head, every worker)."""
    dev = pool.k[0].device
    batch = ForwardBatch(meta.to(dev), pool.k, pool.v, backend)
    return draft(ids.to(dev), feats.to(dev), positions.to(dev), batch, None if embeds is None else embeds.to(dev))


def _root(req: Req) -> DraftRoot:
    root = req.spec.root
    if root is None:
        raise RuntimeError(f"request {req.rid}: the draft has not seen its last committed position")
    return root


def _path_tokens(b: GreedyTreeBuilder | SampledTreeBuilder, node: int) -> list[int]:
    """The draft tokens from below the root down to `node`, both builders' bookkeeping."""
    path: list[int] = []
    if isinstance(b, GreedyTreeBuilder):
        while node != -1:
            path.append(b.cands[node].token)
            node = b.cands[node].parent
    else:
        while node > 0:
            path.append(b.tokens[node])
            node = b.parents[node]
    return path[::-1]


def eagle3_temp_slots(spec: SpecConfig) -> int:
    """Scratch KV slots an EAGLE3 proposer needs beyond the committed prefix: one per draft
    forward, or the sampled tree's nodes when that is more."""
    sampled_nodes = len(static_rank_tree(spec.num_steps, spec.topk, spec.num_draft_tokens - 1))
    return max(spec.max_draft_forwards, sampled_nodes)
