"""One speculative step for a batch: verify every request's tree in one target forward,
commit the accepted path's K/V, emit tokens, then let the proposer draft the next trees.

K/V commit: tree node i was written at slot position c + i. The accepted path
[0, n_1, ..., n_a] (n_j >= j, strictly increasing) is compacted to positions c, ..., c + a;
copying in path order never overwrites a source still needed (every later n_j' > j).
Positions past c + a + 1 are freed after drafting (the draft's scratch slots live there).

Tree shapes: every request's next tree takes the configured shape, or, under adaptive
speculation, the shape the chooser picks for it from this machine's step costs, its own
acceptance statistics and the batch (specdec/tree_chooser.py). A step without speculation
(`NO_SPEC`) verifies the root alone, which is a plain decode step; the draft is then skipped
and the target features it did not see wait in `req.draft_pending` until the request
speculates again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from specdec.draft.proposer import Proposer

from .accept_stats import AcceptStats, expected_accepted
from .grammar import apply_bitmask
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .request import Req
from .sampler import apply_penalties, processed_probs
from .spec_config import SpecConfig
from .tree import DraftTree, depths, path_to, prune_tree
from .tree_chooser import OnlineCosts, choose_shapes
from .tree_shape import TreeShape, candidate_shapes
from .verify import VerifyResult, verify_greedy, verify_stochastic

RECHOOSE_EVERY = 4  # steps an unchanged batch keeps its chosen shapes
# ... when none of its requests speculates: their acceptance estimates cannot move (no drafts,
# no evidence), only the learnt host costs can, so the chooser's ~1 ms is spent less often
RECHOOSE_IDLE = 16

# append(req, token, raw logprobs row or None) emits one token and checks for a finish
AppendFn = Callable[[Req, int, Tensor | None], None]


class VerifyRecord(NamedTuple):
    """One request's verify step, recorded only while `SpecDecoder.trace` is a list."""

    rid: str
    position: int  # output tokens before this step
    accepted: int  # draft tokens accepted (the depth the accepted path reached)
    emitted: int  # tokens emitted by the step (accepted + 1)
    depth: int  # depth of the verified tree
    shape: str = ""  # the tree's shape label (adaptive speculation picks it per step)


class SpecDecoder:
    def __init__(
        self, spec: SpecConfig, proposer: Proposer, runner: ModelRunner, metrics: EngineMetrics
    ) -> None:
        self.spec = spec
        self.proposer = proposer
        self.runner = runner
        self.metrics = metrics
        # set to a list to record every verify step (bench/accept_analysis.py); None costs nothing
        self.trace: list[VerifyRecord] | None = None
        envelope = spec.envelope
        self.shapes = candidate_shapes(envelope) if spec.adaptive else (envelope,)
        # adaptive speculation: this machine's measured step costs (set by the engine; until
        # then every step takes the envelope) and the engine-wide acceptance, every request's prior
        self.costs: OnlineCosts | None = None
        self.global_stats = AcceptStats(envelope.num_steps, envelope.topk)
        # tests may replace the chooser: (reqs, batch_size) -> one shape per request
        self.choose = self._choose
        self._last_key: tuple[tuple[int, ...], int] | None = None
        self._reuse = 0

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.proposer.capture_layers

    @property
    def extra_slots(self) -> int:
        """Slots a request needs beyond its cached prefix for one speculative step:
        the tree (N nodes), or up to num_steps + 1 newly committed tokens plus the draft's
        scratch slots."""
        return extra_slots_for(self.spec, self.proposer.temp_slots)

    # ---- drafting -------------------------------------------------------------------------------
    def _choose(self, reqs: Sequence[Req], batch_size: int) -> list[TreeShape]:
        """Each request's next shape: the envelope, or the adaptive chooser's pick for a step of
        `batch_size` requests (the others counted as plain steps)."""
        if not self.spec.adaptive or self.costs is None:
            return [self.spec.envelope] * len(reqs)
        # the estimates move slowly: the same batch keeps its shapes for RECHOOSE_EVERY steps
        key = (tuple(id(r) for r in reqs), batch_size)
        if key == self._last_key and self._reuse > 0 and all(r.spec_shape is not None for r in reqs):
            self._reuse -= 1
            return [r.spec_shape for r in reqs]  # type: ignore[misc]
        expected = []
        for r in reqs:
            stats = r.accept_stats or self.global_stats
            expected.append(expected_accepted(stats.q(self.global_stats), self.shapes))
        padding = [[0.0] * len(self.shapes)] * max(0, batch_size - len(reqs))
        chosen = list(choose_shapes(self.costs.costs, self.shapes, expected + padding).shapes[: len(reqs)])
        idle = not any(s.speculates for s in chosen)
        self._last_key, self._reuse = key, (RECHOOSE_IDLE if idle else RECHOOSE_EVERY) - 1
        return chosen

    def draft(self, reqs: Sequence[Req], starts: Sequence[int], features: Sequence[Tensor | None],
              batch_size: int | None = None) -> None:
        """Feed newly committed positions to the proposer and draft each request's next tree,
        of the shape chosen for it (a root-only tree where it does not speculate)."""
        if not reqs:
            return
        shapes = self.choose(reqs, len(reqs) if batch_size is None else batch_size)
        ext_reqs: list[Req] = []
        ext_starts: list[int] = []
        ext_feats: list[Tensor | None] = []
        for req, start, feat, shape in zip(reqs, starts, features, shapes, strict=True):
            if req.accept_stats is None:
                req.accept_stats = AcceptStats(self.spec.num_steps, self.spec.topk)
            req.spec_shape = shape
            if feat is not None:
                req.draft_pending.append((start, feat))
            if not shape.speculates:
                req.draft_tree = DraftTree((req.all_ids[-1],), (-1,))
                continue
            pending = req.draft_pending
            ext_reqs.append(req)
            ext_starts.append(pending[0][0] if pending else start)
            ext_feats.append(torch.cat([f for _, f in pending]) if pending else feat)
            req.draft_pending = []
        if not ext_reqs:
            return
        self.proposer.extend(ext_reqs, ext_starts, ext_feats)
        _record_draft_kv(ext_reqs, ext_starts, ext_feats)
        ext_shapes = [r.spec_shape for r in ext_reqs]
        for req, tree in zip(ext_reqs, self.proposer.propose(ext_reqs, ext_shapes), strict=True):  # type: ignore[arg-type]
            req.draft_tree = tree

    def absorb(self, reqs: Sequence[Req], starts: Sequence[int], features: Sequence[Tensor | None]) -> None:
        """A prefill chunk committed these positions: the draft takes their target features now
        (its K/V stays a chunk behind, and no chunk's features are kept), with none of a tree:
        the prompt is not done."""
        ext_reqs: list[Req] = []
        ext_starts: list[int] = []
        ext_feats: list[Tensor | None] = []
        for req, start, feat in zip(reqs, starts, features, strict=True):
            if feat is None:
                continue
            pending = [*req.draft_pending, (start, feat)]
            req.draft_pending = []
            ext_reqs.append(req)
            ext_starts.append(pending[0][0])
            ext_feats.append(torch.cat([f for _, f in pending]))
        if ext_reqs:
            self.proposer.extend(ext_reqs, ext_starts, ext_feats)
            _record_draft_kv(ext_reqs, ext_starts, ext_feats)

    @staticmethod
    def rows_of(x: Tensor, rows: Tensor) -> Tensor:
        """x[rows] for increasing row indices: a view where they are consecutive (plain steps,
        chains, a prefill), a gather otherwise."""
        n = int(rows.shape[0])
        if n and int(rows[-1]) - int(rows[0]) == n - 1:
            return x.narrow(0, int(rows[0]), n)
        return x[rows]

    # ---- verification ---------------------------------------------------------------------------
    def step(self, reqs: list[Req], append: AppendFn) -> None:
        t0 = time.perf_counter()
        shapes = [r.spec_shape or self.spec.envelope for r in reqs]
        accepted_total = 0
        trees: list[DraftTree] = []
        masks: list[Tensor | None] = []  # constrained requests: the grammar's mask at every node
        for r in reqs:
            assert r.draft_tree is not None, f"request {r.rid} has no draft tree"
            tree, mask = constrain_tree(r, r.draft_tree)
            trees.append(tree)
            masks.append(mask)
        out = self.runner.verify_trees(reqs, trees, self.capture_layers)
        logits = self.runner.logits(out.hidden)  # [sum N, vocab]
        want_lp = any(r.return_logprob for r in reqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        # the target's choice at every node of every greedy tree in one argmax (penalties aside)
        argmax = logits.argmax(dim=-1).tolist() if any(_plain_greedy(r) for r in reqs) else None
        # every node's features once; each request keeps its accepted path's rows
        all_feats = torch.cat(out.aux_hidden, dim=-1) if out.aux_hidden else None
        next_reqs: list[Req] = []
        starts: list[int] = []
        feats: list[Tensor | None] = []
        for req, tree, mask, q0 in zip(reqs, trees, masks, out.q_starts, strict=True):
            rows = slice(q0, q0 + tree.size)
            if argmax is not None and _plain_greedy(req):
                result = verify_greedy(tree, argmax[rows])
            else:
                result = self._verify_one(req, tree, logits[rows], mask)
            path = [0, *result.accepted]
            c = req.num_cached
            self._commit_kv(req, c, path)
            req.num_cached = c + len(path)
            req.draft_tree = None
            emitted = [tree.tokens[n] for n in result.accepted] + [result.next_token]
            accepted_total += len(result.accepted)
            depth = max(depths(tree))
            shape = req.spec_shape or self.spec.envelope
            req.spec_shape_counts[shape.label] = req.spec_shape_counts.get(shape.label, 0) + 1
            self.metrics.record_shape(shape.label)
            if shape.speculates:  # NO_SPEC: the root alone, a plain decode step
                req.spec_verify_ct += 1
                req.spec_num_correct_drafts += len(result.accepted)
                req.spec_num_proposed_drafts += depth
                req.spec_emitted_tokens += len(emitted)
                self.metrics.record_verify(len(result.accepted), len(emitted), depth)
                if req.accept_stats is not None:
                    req.accept_stats.observe(tree, result.accepted)
                self.global_stats.observe(tree, result.accepted)
                if self.trace is not None:
                    self.trace.append(VerifyRecord(req.rid, req.output_len, len(result.accepted), len(emitted),
                                                   depth, shape.label))
            for j, token in enumerate(emitted):
                append(req, token, None if logprobs is None else logprobs[q0 + path[j]])
                if req.finished:
                    break
            if not req.finished:
                next_reqs.append(req)
                starts.append(c)
                feats.append(None if all_feats is None else self.rows_of(all_feats, torch.tensor(path) + q0))
        self.draft(next_reqs, starts, feats, batch_size=len(next_reqs))
        for req in next_reqs:
            req.truncate_kv(req.num_cached)
        if self.costs is not None and next_reqs:  # learn the host's share of a step from its wall time
            drafted = [r.spec_shape or self.spec.envelope for r in next_reqs]
            self.costs.observe(shapes, drafted, float(accepted_total), 1000.0 * (time.perf_counter() - t0))

    def _verify_one(self, req: Req, tree: DraftTree, logits: Tensor, mask: Tensor | None = None) -> VerifyResult:
        """logits [N, vocab]: the target's scores after each tree node; mask [N, W]: the
        grammar's bitmask after each node (constrained requests)."""
        p = req.params
        if p.adjusts_logits:
            # penalties see the output so far plus the node's own path
            outs = [req.output_ids + [tree.tokens[n] for n in path_to(tree, i)[1:]] for i in range(tree.size)]
            logits = apply_penalties(logits, [p] * tree.size, [req.prompt_ids] * tree.size, outs)
        if mask is not None:
            logits = apply_bitmask(logits, mask)
        if p.is_greedy:
            return verify_greedy(tree, logits.argmax(dim=-1).tolist())
        probs = processed_probs(logits, [p] * tree.size)
        return verify_stochastic(
            tree, probs, req.generator, self.spec.accept_threshold_single, self.spec.accept_threshold_acc
        )

    def _commit_kv(self, req: Req, c: int, path: list[int]) -> None:
        moves = [(c + n, c + j) for j, n in enumerate(path) if n != j]
        if moves:
            self.runner.commit_moves(req, moves)


def extra_slots_for(spec: SpecConfig, temp_slots: int) -> int:
    """`SpecDecoder.extra_slots` for a proposer needing `temp_slots` scratch slots."""
    # a tree is at most num_steps deep, unless copied text extends it (--speculative-ngram-merge:
    # a copy chain may take the whole budget, num_draft_tokens - 1 deep)
    deepest = spec.num_draft_tokens - 1 if spec.ngram_merge else spec.num_steps
    return max(spec.num_draft_tokens, deepest + 1 + temp_slots)


def _plain_greedy(req: Req) -> bool:
    """Greedy without penalties or grammar: verification needs only each node's raw argmax."""
    return req.params.is_greedy and not req.params.adjusts_logits and req.grammar is None


def constrain_tree(req: Req, tree: DraftTree) -> tuple[DraftTree, Tensor | None]:
    """A constrained request's tree and the grammar's mask at each of its nodes; nodes the
    grammar refuses are pruned where the children are fixed candidates (see specdec/grammar.py:
    lossless either way, pruning only saves their verify rows)."""
    if req.grammar is None:
        return tree, None
    mask = req.grammar.tree_bitmask(tree)  # [N, W]
    keep = req.grammar.valid_nodes(tree, mask)
    if all(keep) or tree.draft_probs is not None:
        return tree, mask
    kept = [i for i, k in enumerate(keep) if k]
    return prune_tree(tree, keep), mask[kept]


def _record_draft_kv(reqs: Sequence[Req], starts: Sequence[int], features: Sequence[Tensor | None]) -> None:
    """The draft's K/V now covers each request's positions up to the features it was fed."""
    for req, start, feat in zip(reqs, starts, features, strict=True):
        if feat is not None:
            req.draft_kv_len = start + int(feat.shape[0])
