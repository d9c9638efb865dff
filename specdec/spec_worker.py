"""The speculative half of the model worker: draft each request's tree, verify every tree
in one target forward, commit the accepted path's K/V, and hand the draft the new features.

One decode step of requests with c committed tokens each (specdec/model_worker.py calls it):

1. `draft`: the shape of each request's tree (the configured one, or under adaptive
   speculation the chooser's pick from this machine's step costs, the request's acceptance
   statistics and the batch as it is: specdec/tree_chooser.py), then the proposer's trees.
   `NO_SPEC` is the root alone, a plain decode step, and skips the draft. With
   `--speculative-ngram-merge`, adaptive speculation may also pick a copy shape: the request's
   copy chain alone (what followed the latest earlier occurrence of its final n-gram), verified
   without any draft forward, its acceptance estimated by `CopyStats`.
2. `verify`: one target forward over all trees; each request's accepted path [0, n_1, .., n_a]
   (n_j >= j, strictly increasing) is compacted to positions c, .., c + a; copying in path
   order never overwrites a source still needed (every later n_j' > j).
3. the accepted path's target features go to the draft at once (`record`), so the draft's K/V
   of committed positions is final when the step ends (the prefix cache and n > 1 siblings
   share it); a request that did not speculate keeps them pending until it speculates again.

The step's K/V slots past the committed prefix: the draft's scratch slots, the tree's N, the
accepted path's (`extra_slots_for` says how many); the scheduler reserves them and frees what
the step did not commit afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from specdec.draft.ngram_merge import request_chain
from specdec.draft.proposer import Proposer
from specdec.kernels.cpu_kernels import argmax_rows

from .accept_stats import AcceptStats, expected_accepted
from .copy_stats import CopyStats
from .grammar import apply_bitmask
from .model_runner import ModelRunner
from .request import Req
from .sampler import apply_penalties, processed_probs, sample
from .spec_config import SpecConfig
from .spec_state import PendingFeatures
from .step_batch import ReqOutput, SpecOutcome
from .tree import DraftTree, depths, path_to, prune_tree
from .tree_chooser import OnlineCosts, choose_shapes
from .tree_shape import NO_SPEC, TreeShape, candidate_shapes, copy_shapes
from .verify import VerifyResult, verify_greedy, verify_stochastic

RECHOOSE_EVERY = 4  # steps an unchanged batch keeps its chosen shapes
# ... when none of its requests speculates: their acceptance estimates cannot move (no drafts,
# no evidence), only the learnt host costs can, so the chooser's ~1 ms is spent less often
RECHOOSE_IDLE = 16


class VerifyRecord(NamedTuple):
    """One request's verify step, recorded only while `SpecWorker.trace` is a list."""

    rid: str
    position: int  # output tokens before this step
    accepted: int  # draft tokens accepted (the depth the accepted path reached)
    emitted: int  # tokens emitted by the step (accepted + 1)
    depth: int  # depth of the verified tree
    shape: str = ""  # the tree's shape label (adaptive speculation picks it per step)


class SpecWorker:
    def __init__(
        self, spec: SpecConfig, proposer: Proposer, runner: ModelRunner) -> None:
        self.spec = spec
        self.proposer = proposer
        self.runner = runner
        # set to a list to record every verify step (bench/accept_analysis.py); None costs nothing
        self.trace: list[VerifyRecord] | None = None
        envelope = spec.envelope
        self.shapes = candidate_shapes(envelope) if spec.adaptive else (envelope,)
        # copy chains verified without a draft forward, where copies are merged at all
        self.copy_shapes = copy_shapes(envelope) if spec.adaptive and spec.ngram_merge else ()
        self.copy_stats = CopyStats()
        # adaptive speculation: this machine's measured step costs (set by the engine; until
        # then every step takes the envelope) and the engine-wide acceptance, every request's prior
        self.costs: OnlineCosts | None = None
        self.global_stats = AcceptStats(envelope.num_steps, envelope.topk)
        # tests may replace the chooser: (reqs, batch_size) -> one shape per request
        self.choose = self._choose
        self._last_key: tuple[tuple[int, ...], int] | None = None
        self._reuse = 0
        self._expected: list[list[float]] = []  # the last fresh choice's, per request over self.shapes

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.proposer.capture_layers

    @property
    def extra_slots(self) -> int:
        """Slots a decode step needs beyond the request's committed prefix (`extra_slots_for`)."""
        return extra_slots_for(self.spec, self.proposer.temp_slots)

    # ---- drafting -------------------------------------------------------------------------------
    def _choose(self, reqs: Sequence[Req], batch_size: int) -> list[TreeShape]:
        """Each request's shape: the envelope, or the adaptive chooser's pick for a step of
        `batch_size` requests (the others counted as plain steps)."""
        if not self.spec.adaptive or self.costs is None:
            return [self.spec.envelope] * len(reqs)
        # a request's copy chain changes every step: where any has one, the chooser runs again
        chains = [self._chain(r) for r in reqs] if self.copy_shapes else []
        copying = any(chain for chain, _ in chains)
        # the acceptance estimates move slowly: the same batch keeps its drafted requests'
        # expectations (and, without copies, its shapes) for RECHOOSE_EVERY steps
        key = (tuple(id(r) for r in reqs), batch_size)
        fresh = not (key == self._last_key and self._reuse > 0 and all(r.spec.shape is not None for r in reqs))
        if fresh:
            self._expected = [self._expected_of(r) for r in reqs]
        else:
            self._reuse -= 1
            if not copying and not any(r.spec.shape.copy for r in reqs):  # type: ignore[union-attr]
                return [r.spec.shape for r in reqs]  # type: ignore[misc]
        shapes, expected = self.shapes, self._expected
        if copying:
            shapes = self.shapes + self.copy_shapes
            expected = [self._with_copies(r, e, *c) for r, e, c in zip(reqs, expected, chains, strict=True)]
        padding = [[0.0] * len(shapes)] * max(0, batch_size - len(reqs))
        chosen = list(choose_shapes(self.costs.costs, shapes, expected + padding).shapes[: len(reqs)])
        if fresh:
            idle = not any(s.drafts for s in chosen)
            self._last_key, self._reuse = key, (RECHOOSE_IDLE if idle else RECHOOSE_EVERY) - 1
        return chosen

    def _expected_of(self, req: Req) -> list[float]:
        """The request's expected accepted draft tokens for each of self.shapes, from its own
        statistics shrunk toward the engine's; computed again only when either has changed
        (a batch where nobody drafts keeps every estimate)."""
        own = req.spec.accept
        key = (-1 if own is None else own.version, self.global_stats.version)
        if req.spec.expected is None or req.spec.expected[0] != key:
            q = (own or self.global_stats).q(self.global_stats)
            req.spec.expected = (key, expected_accepted(q, self.shapes))
        return req.spec.expected[1]

    def _chain(self, req: Req, budget: int | None = None) -> tuple[list[int], int]:
        """The request's copy chain (up to `budget` tokens, the envelope's by default) and the
        matched n-gram length."""
        s = self.spec
        return request_chain(req, s.ngram_min_match, s.ngram_max_match,
                             s.num_draft_tokens - 1 if budget is None else budget)

    def _with_copies(self, req: Req, expected: list[float], chain: list[int], n: int) -> list[float]:
        """`expected` (over self.shapes) extended by the copy shapes' expected accepted copies;
        a greedy request's drafted trees hold its chain too (merged under the same budget), so
        they expect at least what the chain alone within their budget would."""
        greedy, own = req.params.is_greedy, req.spec.copies
        if greedy and chain:
            lengths = [min(len(chain), s.num_draft_tokens - 1) for s in self.shapes]
            alone = own.expected(True, n, lengths, self.copy_stats)
            expected = [max(e, a) if s.drafts else e for e, a, s in zip(expected, alone, self.shapes, strict=True)]
        lengths = [min(len(chain), s.num_draft_tokens - 1) for s in self.copy_shapes]
        return expected + own.expected(greedy, n, lengths, self.copy_stats)

    def draft(self, reqs: Sequence[Req], batch_size: int) -> list[DraftTree]:
        """Each request's tree for this step, of the shape chosen for it (its root alone where
        it does not speculate, its copy chain for a copy shape); a request that drafts again
        first gives the draft the features it skipped."""
        shapes = list(self.choose(reqs, batch_size))
        trees: list[DraftTree] = []
        drafted: list[Req] = []
        for i, (req, shape) in enumerate(zip(reqs, shapes, strict=True)):
            if req.spec.accept is None:
                req.spec.accept = AcceptStats(self.spec.num_steps, self.spec.topk)
            root = req.all_ids[-1]
            tree = DraftTree((root,), (-1,))
            if shape.copy:
                chain, n = self._chain(req, shape.num_draft_tokens - 1)
                if not chain:
                    shape = NO_SPEC  # (a chooser that picked a copy shape for a request without one)
                else:
                    tree = DraftTree((root, *chain), tuple(range(-1, len(chain))))
                    req.spec.copy_match = n
                shapes[i] = shape
            req.spec.shape = shape
            trees.append(tree)
            if shape.drafts:
                drafted.append(req)
        self._consume([r for r in drafted if r.spec.pending])
        if drafted:
            proposed = iter(self.proposer.propose(drafted, [r.spec.shape for r in drafted]))  # type: ignore[misc]
            trees = [next(proposed) if shape.drafts else tree for tree, shape in zip(trees, shapes, strict=True)]
        return trees

    def record(self, reqs: Sequence[Req], pending: Sequence[PendingFeatures]) -> None:
        """Newly committed positions' target features: the draft takes them now, unless the
        request's last step did not draft (a plain or copy step: they wait in its pending list
        until it drafts again)."""
        for req, feats in zip(reqs, pending, strict=True):
            req.spec.pending.append(feats)
        self._consume([r for r in reqs if r.spec.shape is None or r.spec.shape.drafts])

    def _consume(self, reqs: Sequence[Req]) -> None:
        """Extend the draft over each request's pending features (one batched forward)."""
        if not reqs:
            return
        merged = []
        for req in reqs:
            p = req.spec.pending
            merged.append(p[0] if len(p) == 1 else PendingFeatures(
                p[0].start, torch.cat([f.features for f in p]), tuple(t for f in p for t in f.ids)))
            req.spec.pending = []
        self.proposer.extend(reqs, merged)
        for req, m in zip(reqs, merged, strict=True):  # the draft's K/V now covers these positions
            req.draft_kv_len = m.start + int(m.features.shape[0])

    @staticmethod
    def rows_of(x: Tensor, q0: int, path: list[int]) -> Tensor:
        """x[q0 + path] for a path of increasing node indices from the root: a view where they
        are consecutive (plain steps, accepted chains), a gather otherwise."""
        if path[-1] == len(path) - 1:
            return x.narrow(0, q0, len(path))
        return x[torch.tensor(path) + q0]

    # ---- verification ---------------------------------------------------------------------------
    def step(self, reqs: Sequence[Req], batch_size: int) -> list[ReqOutput]:
        """Draft, verify and commit one step of `reqs` (slots reserved); one output each."""
        t0 = time.perf_counter()
        trees = self.draft(reqs, batch_size)
        shapes = [r.spec.shape or self.spec.envelope for r in reqs]
        outputs = self.verify(reqs, trees)
        if self.costs is not None:  # learn the host's share of a step from its wall time
            accepted = sum(o.spec.accepted for o in outputs if o.spec is not None)
            self.costs.observe(shapes, shapes, float(accepted), 1000.0 * (time.perf_counter() - t0))
        return outputs

    def verify(self, reqs: Sequence[Req], trees: Sequence[DraftTree]) -> list[ReqOutput]:
        masks: list[Tensor | None] = []  # constrained requests: the grammar's mask at every node
        pruned: list[DraftTree] = []
        for r, t in zip(reqs, trees, strict=True):
            tree, mask = constrain_tree(r, t)
            pruned.append(tree)
            masks.append(mask)
        out = self.runner.verify_trees(reqs, pruned, self.capture_layers)
        logits = self.runner.logits(out.hidden)  # [sum N, vocab]
        want_lp = any(r.return_logprob for r in reqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        # the target's choice at every node of every greedy tree in one argmax (penalties aside)
        argmax = argmax_rows(logits).tolist() if any(_plain_greedy(r) for r in reqs) else None
        # every node's features once; each request keeps its accepted path's rows
        all_feats = torch.cat(out.aux_hidden, dim=-1) if out.aux_hidden else None
        outputs: list[ReqOutput] = []
        pending: list[PendingFeatures] = []
        others = [i for i, r in enumerate(reqs) if argmax is None or not _plain_greedy(r)]
        results = verify_others([reqs[i] for i in others], [pruned[i] for i in others], [masks[i] for i in others],
                                [logits[out.q_starts[i]:out.q_starts[i] + pruned[i].size] for i in others],
                                self.spec.accept_threshold_single, self.spec.accept_threshold_acc)
        result_of = dict(zip(others, results, strict=True))
        for i, (req, tree, q0) in enumerate(zip(reqs, pruned, out.q_starts, strict=True)):
            rows = slice(q0, q0 + tree.size)
            if i in result_of:
                result = result_of[i]
            else:
                assert argmax is not None
                result = verify_greedy(tree, argmax[rows])
            path = [0, *result.accepted]
            c = req.num_cached
            self._commit_kv(req, c, path)
            emitted = (*(tree.tokens[n] for n in result.accepted), result.next_token)
            depth = max(depths(tree))
            shape = req.spec.shape or self.spec.envelope
            if shape.drafts:
                if req.spec.accept is not None:
                    req.spec.accept.observe(tree, result.accepted)
                self.global_stats.observe(tree, result.accepted)
            elif shape.copy:
                for stats in (self.copy_stats, req.spec.copies):
                    stats.observe(req.params.is_greedy, req.spec.copy_match, tree.size - 1, len(result.accepted))
            if shape.speculates:  # NO_SPEC: the root alone, a plain decode step
                if self.trace is not None:
                    self.trace.append(VerifyRecord(req.rid, req.output_len, len(result.accepted), len(emitted),
                                                   depth, shape.label))
            lp = None if logprobs is None else self.rows_of(logprobs, q0, path)
            outputs.append(ReqOutput(c + len(path), emitted, lp, spec=SpecOutcome(shape, len(result.accepted), depth)))
            if all_feats is not None:
                pending.append(PendingFeatures(c, self.rows_of(all_feats, q0, path), emitted))
        if all_feats is not None:
            self.record(reqs, pending)
        return outputs

    def _commit_kv(self, req: Req, c: int, path: list[int]) -> None:
        moves = [(c + n, c + j) for j, n in enumerate(path) if n != j]
        if moves:
            self.runner.commit_moves(req, moves)


def verify_others(reqs: Sequence[Req], trees: Sequence[DraftTree], masks: Sequence[Tensor | None],
                  logits: Sequence[Tensor], threshold_single: float = 1.0,
                  threshold_acc: float = 1.0) -> list[VerifyResult]:
    """Verification of the requests that are not plain greedy (sampled, penalised or
    constrained), each with its tree's target logits [N, vocab] and grammar mask [N, W] (or
    None): penalties and masks per request, then every sampled request's distributions in one
    `processed_probs` call over all their rows. A sampled request drafting nothing this step
    (its root alone) is one draw, all of them in one `sample` call, as a plain decode step draws
    them; the others are `verify_stochastic` on their rows. Each request's result is what it
    gets verified alone (its rows, its generator)."""
    adjusted = [_adjusted(r, t, lg, m) for r, t, lg, m in zip(reqs, trees, logits, masks, strict=True)]
    results: list[VerifyResult | None] = [
        verify_greedy(t, argmax_rows(lg).tolist()) if r.params.is_greedy else None
        for r, t, lg in zip(reqs, trees, adjusted, strict=True)]
    sampled = [i for i, res in enumerate(results) if res is None]
    if sampled:
        probs = processed_probs(torch.cat([adjusted[i] for i in sampled]),
                                [reqs[i].params for i in sampled for _ in range(trees[i].size)])
        starts = [0]
        for i in sampled:
            starts.append(starts[-1] + trees[i].size)
        roots = [j for j, i in enumerate(sampled) if trees[i].size == 1]
        if roots:
            drawn = sample(probs[[starts[j] for j in roots]], [reqs[sampled[j]].generator for j in roots]).tolist()
            for j, token in zip(roots, drawn, strict=True):
                results[sampled[j]] = VerifyResult([], int(token))
        for j, i in enumerate(sampled):
            if results[i] is None:
                results[i] = verify_stochastic(trees[i], probs[starts[j]:starts[j + 1]], reqs[i].generator,
                                               threshold_single, threshold_acc)
    return [res for res in results if res is not None]


def _adjusted(req: Req, tree: DraftTree, logits: Tensor, mask: Tensor | None) -> Tensor:
    """The tree's target logits after the request's penalties (each node's own path counts as
    output) and its grammar's mask."""
    p = req.params
    if p.adjusts_logits:
        outs = [req.output_ids + [tree.tokens[n] for n in path_to(tree, i)[1:]] for i in range(tree.size)]
        logits = apply_penalties(logits, [p] * tree.size, [req.prompt_ids] * tree.size, outs)
    if mask is not None:
        logits = apply_bitmask(logits, mask)
    return logits


def extra_slots_for(spec: SpecConfig, temp_slots: int) -> int:
    """`SpecWorker.extra_slots` for a proposer needing `temp_slots` scratch slots: a decode step
    drafts into the draft pool's scratch slots [c, c + temp_slots), verifies the tree in the
    target's slots [c, c + N), then writes the accepted path's draft K/V over the scratch ones."""
    # a tree is at most num_steps deep, unless copied text extends it (--speculative-ngram-merge:
    # a copy chain may take the whole budget, num_draft_tokens - 1 deep)
    deepest = spec.num_draft_tokens - 1 if spec.ngram_merge else spec.num_steps
    return max(spec.num_draft_tokens, deepest + 1, temp_slots)


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

