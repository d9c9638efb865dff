"""Runs a scheduled step on the model: the forward, sampling or verification, the draft.

`ModelWorker.run(batch)` reads the requests of a `ScheduledBatch` (their KV slots reserved by
the scheduler) and returns a typed `StepResult`; it appends no tokens and frees no pages
(`Scheduler.postprocess` does). It does keep the requests' speculative state (`req.spec`) and
writes the K/V of the positions it feeds. Under --tp the runner tells the other ranks each
forward (specdec/tp_worker.py); this object lives on rank 0 beside the scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.kernels.cpu_kernels import argmax_rows

from .grammar import apply_bitmask
from .model_runner import ExtendOutput, ModelRunner
from .request import Req
from .sampler import apply_penalties, processed_probs, sample
from .spec_state import PendingFeatures
from .spec_worker import SpecWorker
from .step_batch import ReqOutput, ScheduledBatch, StepKind, StepResult

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, runner: ModelRunner, spec: SpecWorker | None = None) -> None:
        self.runner = runner
        self.spec = spec

    # ---- what the scheduler needs to know ------------------------------------------------------
    @property
    def chunk_size(self) -> int | None:
        """Hybrid KV: the chunked layers' attention chunk (their window pool's unit), else None."""
        return self.runner.chunk_size

    @property
    def draft_has_kv(self) -> bool:
        """The draft keeps K/V of its own (EAGLE3): positions are final for sharing only once
        the draft has consumed them (`Req.draft_kv_len`)."""
        return self.spec is not None and bool(self.spec.capture_layers)

    def slots_needed(self, req: Req) -> int:
        """Positions [0, n) whose slots the request's next decode step writes: its one uncached
        token, or under speculation the tree and the draft's scratch (specdec/spec_worker.py)."""
        return req.seq_len if self.spec is None else req.num_cached + self.spec.extra_slots

    # ---- one step --------------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch) -> StepResult:
        if batch.kind is StepKind.EXTEND:
            return StepResult(tuple(self._extend(batch.reqs, batch.feeds)))
        if self.spec is not None:
            return StepResult(tuple(self.spec.step(batch.reqs, len(batch.reqs))))
        return StepResult(tuple(self._extend(batch.reqs, [r.uncached_ids() for r in batch.reqs])))

    def _extend(self, reqs: Sequence[Req], feeds: Sequence[Sequence[int]]) -> list[ReqOutput]:
        """Feed each request's tokens (a prefill, a chunk of one, a plain decode step) and
        sample the next token where the prompt is then all fed; under speculation the draft
        takes the fed positions' features."""
        capture = () if self.spec is None else self.spec.capture_layers
        out = self.runner.extend(reqs, feeds, capture)
        ends = [r.num_cached + len(f) for r, f in zip(reqs, feeds, strict=True)]
        prompt = [self._prompt_logprobs(r, out.hidden, q0) for r, q0 in zip(reqs, out.q_starts, strict=True)]
        done = [i for i, r in enumerate(reqs) if ends[i] == r.seq_len and not isinstance(prompt[i], BaseException)]
        tokens: dict[int, int] = {}
        rows: dict[int, Tensor] = {}
        if done:
            ready = [reqs[i] for i in done]
            logits = self.runner.logits(out.hidden[out.last_rows()[done]])  # [D, vocab]
            next_ids = sample_next(ready, logits).tolist()
            logprobs = torch.log_softmax(logits, dim=-1) if any(r.return_logprob for r in ready) else None
            for j, i in enumerate(done):
                tokens[i] = int(next_ids[j])
                if logprobs is not None:
                    rows[i] = logprobs[j : j + 1]
        if self.spec is not None:
            self._record_features(reqs, feeds, out, tokens)
        outputs = []
        for i, p in enumerate(prompt):
            if isinstance(p, BaseException):
                outputs.append(ReqOutput(ends[i], error=p))
                continue
            start, lps = p if p is not None else (0, None)
            outputs.append(ReqOutput(ends[i], (tokens[i],) if i in tokens else (), rows.get(i),
                                     prompt_logprobs=lps, prompt_logprob_start=start))
        return outputs

    def _record_features(self, reqs: Sequence[Req], feeds: Sequence[Sequence[int]], out: ExtendOutput,
                         tokens: dict[int, int]) -> None:
        """Hand the draft the fed positions' target features, each paired with the next token."""
        assert self.spec is not None
        if not out.aux_hidden:
            return
        every = torch.cat(out.aux_hidden, dim=-1)  # [T, 3H], once
        got: list[Req] = []
        pending: list[PendingFeatures] = []
        for i, (req, feed) in enumerate(zip(reqs, feeds, strict=True)):
            start, end = req.num_cached, req.num_cached + len(feed)
            if end < req.seq_len:  # a prefill chunk: the next token is the prompt's
                nxt: tuple[int, ...] = tuple(req.all_ids[start + 1 : end + 1])
            elif i in tokens:
                nxt = (*req.all_ids[start + 1 : end], tokens[i])
            else:  # failed (its prompt logprobs)
                continue
            got.append(req)
            pending.append(PendingFeatures(start, every.narrow(0, out.q_starts[i], out.q_lens[i]), nxt))
        self.spec.record(got, pending)

    def _prompt_logprobs(self, req: Req, hidden: Tensor, q0: int) -> tuple[int, Tensor] | BaseException | None:
        """Prompt logprobs from `logprob_start_len` on, at the request's first prefill: (first
        prompt position scored, rows [n, vocab]); an error fails this request alone."""
        if not req.return_logprob or req.input_logprobs_done or req.logprob_start_len < 0:
            return None
        try:
            first = max(1, min(req.logprob_start_len, req.prompt_len))
            if first >= req.prompt_len:
                return first, torch.empty(0, 0)
            # logits at row p - 1 score prompt token p (the fed tokens start at num_cached = 0)
            lps = torch.log_softmax(self.runner.logits(hidden[q0 + first - 1 : q0 + req.prompt_len - 1]), dim=-1)
            return first, lps
        except Exception as e:  # this request's own work: it fails, the batch goes on
            log.exception("prompt logprobs of request %s failed", req.rid)
            return e


def sample_next(batch: Sequence[Req], logits: Tensor) -> Tensor:  # [B]
    """Each request's next token from its logits row [B, vocab] (grammar, penalties, sampling)."""
    params = [r.params for r in batch]
    logits = grammar_masked(batch, logits)
    adjusts = any(p.adjusts_logits for p in params)
    if all(p.is_greedy for p in params) and not adjusts:
        return argmax_rows(logits)
    if adjusts:
        logits = apply_penalties(logits, params, [r.prompt_ids for r in batch], [r.output_ids for r in batch])
    return sample(processed_probs(logits, params), [r.generator for r in batch])


def grammar_masked(batch: Sequence[Req], logits: Tensor) -> Tensor:
    """`logits` [B, V] with each constrained request's row masked to what its grammar allows
    next (a copy when any row is constrained; the raw logits stay for logprobs)."""
    rows = [i for i, r in enumerate(batch) if r.grammar is not None]
    if not rows:
        return logits
    masks = torch.cat([batch[i].grammar.next_bitmask() for i in rows])  # [R, W]
    out = logits.clone()
    out[rows] = apply_bitmask(logits[rows], masks)
    return out
