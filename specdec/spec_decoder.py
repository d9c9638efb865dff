"""One speculative step for a batch: verify every request's tree in one target forward,
commit the accepted path's K/V, emit tokens, then let the proposer draft the next trees.

K/V commit: tree node i was written at slot position c + i. The accepted path
[0, n_1, ..., n_a] (n_j >= j, strictly increasing) is compacted to positions c, ..., c + a;
copying in path order never overwrites a source still needed (every later n_j' > j).
Positions past c + a + 1 are freed after drafting (the draft's scratch slots live there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from specdec.draft.proposer import Proposer

from .metrics import EngineMetrics
from .model_runner import ExtendOutput, ModelRunner
from .request import Req
from .sampler import apply_penalties, processed_probs
from .spec_config import SpecConfig
from .tree import DraftTree, depths, path_to
from .verify import VerifyResult, verify_greedy, verify_stochastic

# append(req, token, raw logprobs row or None) emits one token and checks for a finish
AppendFn = Callable[[Req, int, Tensor | None], None]


class VerifyRecord(NamedTuple):
    """One request's verify step, recorded only while `SpecDecoder.trace` is a list."""

    rid: str
    position: int  # output tokens before this step
    accepted: int  # draft tokens accepted (the depth the accepted path reached)
    emitted: int  # tokens emitted by the step (accepted + 1)
    depth: int  # depth of the verified tree


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

    @property
    def capture_layers(self) -> tuple[int, ...]:
        return self.proposer.capture_layers

    @property
    def extra_slots(self) -> int:
        """Slots a request needs beyond its cached prefix for one speculative step:
        the tree (N nodes), or up to num_steps + 1 newly committed tokens plus the draft's
        scratch slots."""
        return max(self.spec.num_draft_tokens, self.spec.num_steps + 1 + self.proposer.temp_slots)

    # ---- drafting -------------------------------------------------------------------------------
    def draft(self, reqs: Sequence[Req], starts: Sequence[int], features: Sequence[Tensor | None]) -> None:
        """Feed newly committed positions to the proposer and draft each request's next tree."""
        if not reqs:
            return
        self.proposer.extend(reqs, starts, features)
        for req, tree in zip(reqs, self.proposer.propose(reqs), strict=True):
            req.draft_tree = tree

    @staticmethod
    def features(out: ExtendOutput, rows: Tensor) -> Tensor | None:
        """Concatenated aux hidden states [len(rows), 3H] (None when nothing was captured)."""
        if not out.aux_hidden:
            return None
        return torch.cat([a[rows] for a in out.aux_hidden], dim=-1)

    # ---- verification ---------------------------------------------------------------------------
    def step(self, reqs: list[Req], append: AppendFn) -> None:
        trees: list[DraftTree] = []
        for r in reqs:
            assert r.draft_tree is not None, f"request {r.rid} has no draft tree"
            trees.append(r.draft_tree)
        out = self.runner.verify_trees(reqs, trees, self.capture_layers)
        logits = self.runner.logits(out.hidden)  # [sum N, vocab]
        want_lp = any(r.return_logprob for r in reqs)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        next_reqs: list[Req] = []
        starts: list[int] = []
        feats: list[Tensor | None] = []
        for req, tree, q0 in zip(reqs, trees, out.q_starts, strict=True):
            rows = slice(q0, q0 + tree.size)
            result = self._verify_one(req, tree, logits[rows])
            path = [0, *result.accepted]
            c = req.num_cached
            self._commit_kv(req, c, path)
            req.num_cached = c + len(path)
            req.draft_tree = None
            emitted = [tree.tokens[n] for n in result.accepted] + [result.next_token]
            depth = max(depths(tree))
            req.spec_verify_ct += 1
            req.spec_num_correct_drafts += len(result.accepted)
            req.spec_num_proposed_drafts += depth
            req.spec_emitted_tokens += len(emitted)
            self.metrics.record_verify(len(result.accepted), len(emitted), depth)
            if self.trace is not None:
                self.trace.append(VerifyRecord(req.rid, req.output_len, len(result.accepted), len(emitted), depth))
            for j, token in enumerate(emitted):
                append(req, token, None if logprobs is None else logprobs[q0 + path[j]])
                if req.finished:
                    break
            if not req.finished:
                next_reqs.append(req)
                starts.append(c)
                feats.append(self.features(out, torch.tensor(path) + q0))
        self.draft(next_reqs, starts, feats)
        for req in next_reqs:
            req.truncate_kv(req.num_cached)

    def _verify_one(self, req: Req, tree: DraftTree, logits: Tensor) -> VerifyResult:
        """logits [N, vocab]: the target's scores after each tree node."""
        p = req.params
        if p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0:
            # penalties see the output so far plus the node's own path
            outs = [req.output_ids + [tree.tokens[n] for n in path_to(tree, i)[1:]] for i in range(tree.size)]
            logits = apply_penalties(logits, [p] * tree.size, [req.prompt_ids] * tree.size, outs)
        if p.is_greedy:
            return verify_greedy(tree, logits.argmax(dim=-1).tolist())
        probs = processed_probs(logits, [p] * tree.size)
        return verify_stochastic(
            tree, probs, req.generator, self.spec.accept_threshold_single, self.spec.accept_threshold_acc
        )

    def _commit_kv(self, req: Req, c: int, path: list[int]) -> None:
        moves = [(c + n, c + j) for j, n in enumerate(path) if n != j]
        if not moves:
            return
        slots = req.kv_slots(c + path[-1] + 1)
        src = slots[[s for s, _ in moves]]
        dst = slots[[d for _, d in moves]]
        self.runner.pool.copy_slots(src, dst)
