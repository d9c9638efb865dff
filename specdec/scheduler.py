"""Continuous batching over the paged KV cache.

Each `step()` is `schedule()`, the model worker's `run()`, then `postprocess()`
(specdec/step_batch.py). A step is either an extend step (admit waiting requests whose whole
uncached sequence fits in free pages and in the prefill token budget, and feed them together;
or one request's next prefill chunk) or a decode step (new tokens for every running request:
one, or under speculation what its verified tree gives). A decode step that cannot get its
slots preempts the most recently admitted request: its pages are freed and it goes back to
the front of the queue, to be recomputed from prompt + output later (SGLang's "retract").
Requests therefore wait when KV is full; they never fail because of it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .detokenizer import IncrementalDetokenizer
from .metrics import EngineMetrics
from .page_allocator import PageAllocator
from .prefix_cache import PrefixCache, cursor_after
from .request import LogprobEntry, Req
from .step_batch import ReqOutput, ScheduledBatch, StepKind, StepResult
from .stop_strings import first_stop
from .swa_table import RELEASED

log = logging.getLogger(__name__)

TokenText = Callable[[int], str]


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_running_requests: int
    max_prefill_tokens: int
    context_length: int
    chunked_prefill_size: int = -1  # tokens of one prompt per forward; -1: the whole prompt


class Worker(Protocol):
    """What the scheduler needs of a model worker (specdec/model_worker.py; tests use fakes)."""

    @property
    def chunk_size(self) -> int | None: ...  # hybrid KV: the chunked layers' chunk, else None

    @property
    def draft_has_kv(self) -> bool: ...  # the draft's K/V must cover positions before they are shared

    def slots_needed(self, req: Req) -> int: ...  # positions [0, n) the request's next decode step writes

    def run(self, batch: ScheduledBatch) -> StepResult: ...


class Scheduler:
    """Owns the waiting queue and the running batch; called from one thread only."""

    def __init__(
        self,
        worker: Worker,
        allocator: PageAllocator,
        limits: SchedulerLimits,
        eos_token_ids: Sequence[int],
        detokenize: Callable[[list[int], bool], str] | None,
        metrics: EngineMetrics | None = None,
        prefix_cache: PrefixCache | None = None,
        swa_allocator: PageAllocator | None = None,
        swa_cache: PrefixCache | None = None,
    ) -> None:
        self.worker = worker
        self.metrics = metrics or EngineMetrics()
        self.allocator = allocator
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenize = detokenize
        self.prefix_cache = prefix_cache
        # hybrid KV: the chunked layers' pool and its prefix cache (keyed like the full pool's)
        self.swa_allocator = swa_allocator
        self.swa_cache = swa_cache
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._chunk_turn = True  # whether a pending prefill chunk goes before other work next step
        self._failed: list[Req] = []  # failed while being scheduled: answered with this step's
        self._admitted = False  # the scheduled extend step admits requests (not a chunk's)

    # ---- queue management ---------------------------------------------------------------------
    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted") -> Req | None:
        """Remove a request wherever it is and free its KV; returns it (finished) or None."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    req.release_kv()
                    req.finish_reason = {"type": "abort", "message": message}
                    req.finished_at = time.perf_counter()
                    self.metrics.requests_aborted += 1
                    self._update_gauges()
                    return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[Req]:
        """Schedule, run and postprocess one step; returns the requests that received tokens or
        finished (failed ones included)."""
        batch = self.schedule()
        result: StepResult | None = None
        if batch is not None:
            try:
                result = self.worker.run(batch)
            except Exception as e:  # the step's requests fail; waiting ones stay queued
                log.exception("an engine step failed; failing its %d request(s)", len(batch.reqs))
                for req in batch.reqs:
                    if not req.finished:
                        self.fail(req, e)
        touched = self._failed + ([] if batch is None else self.postprocess(batch, result))
        self._failed = []
        self.running = [r for r in self.running if not r.finished]
        self._update_gauges()
        return touched

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, its KV slots reserved, or None when there is nothing to run.

        Chunked prefill: a prompt longer than `chunked_prefill_size` is fed a chunk per forward;
        the request sits in `running` meanwhile (its KV reserved whole at admission) and its
        chunks alternate with the steps of everything else, so a long prompt neither blocks
        the other requests' decoding nor needs its whole length of activations at once."""
        chunk = self._next_chunk()
        self._admitted = False
        if chunk is not None:
            self._chunk_turn = False
            try:  # (a window that cannot be had fails this request alone)
                self._reserve_window(chunk)
            except Exception as e:
                log.exception("request %s: no window for its next prefill chunk", chunk.rid)
                self.fail(chunk, e)
                self._failed.append(chunk)
                return None
            return ScheduledBatch(StepKind.EXTEND, (chunk,), (tuple(self._feed(chunk)),))
        batch = self._admit()
        if batch:
            self.running.extend(batch)
            self._admitted = True
            return ScheduledBatch(StepKind.EXTEND, tuple(batch), tuple(tuple(self._feed(r)) for r in batch))
        self._chunk_turn = True
        if not self.running:
            return None
        self._reserve_decode_slots()
        decoding = tuple(r for r in self.running if not self._mid_prefill(r))
        return ScheduledBatch(StepKind.DECODE, decoding) if decoding else None

    def postprocess(self, batch: ScheduledBatch, result: StepResult | None) -> list[Req]:
        """Apply a step's result: committed positions, prompt logprobs, new tokens (stops
        checked), speculative figures, then each request's pages: what the step did not commit
        freed, a prompt's final pages offered to the prefix cache. `result` None: the step failed."""
        if result is not None:
            for req, out in zip(batch.reqs, result.outputs, strict=True):
                if req.finished:  # failed earlier in this step
                    continue
                if out.error is not None:
                    self.fail(req, out.error)
                    continue
                self._apply(req, out)
        if batch.kind is StepKind.EXTEND:
            for req, feed in zip(batch.reqs, batch.feeds, strict=True):
                if len(feed) > 1 and not req.finished:  # a prompt's pages are final: others may share them
                    self._cache_pages(req)
            if self._admitted:
                # a new long prompt that just had its first chunk waits a turn like any other chunk
                self._chunk_turn = not any(self._mid_prefill(r) for r in batch.reqs)
        return list(batch.reqs)

    def _apply(self, req: Req, out: ReqOutput) -> None:
        req.num_cached = out.num_cached
        lps = out.prompt_logprobs
        if lps is not None:
            req.input_logprobs_done = True
            if not self._guard(req, lambda: self._prompt_logprobs(req, out.prompt_logprob_start, lps)):
                return
        if out.spec is not None:
            self._record_spec(req, out)
        for j, token in enumerate(out.tokens):
            self._append(req, token, None if out.logprobs is None else out.logprobs[j])
            if req.finished:
                return
        if not self._mid_prefill(req):  # free the tree's and the draft's slots the step did not commit
            req.truncate_kv(req.num_cached)

    def _record_spec(self, req: Req, out: ReqOutput) -> None:
        """SGLang's per-request and engine-wide figures of a speculative step."""
        assert out.spec is not None
        shape, accepted, depth = out.spec.shape, out.spec.accepted, out.spec.depth
        req.spec_shape_counts[shape.label] = req.spec_shape_counts.get(shape.label, 0) + 1
        self.metrics.record_shape(shape.label)
        if shape.speculates:  # (NO_SPEC: a plain decode step)
            req.spec_verify_ct += 1
            req.spec_num_correct_drafts += accepted
            req.spec_num_proposed_drafts += depth
            req.spec_emitted_tokens += len(out.tokens)
            self.metrics.record_verify(accepted, len(out.tokens), depth)

    @staticmethod
    def _mid_prefill(req: Req) -> bool:
        """Its prompt is not all fed yet (a decoding request has one uncached token)."""
        return req.seq_len - req.num_cached > 1

    def _next_chunk(self) -> Req | None:
        """The request whose next prefill chunk runs now: on every other step, or whenever
        nothing else could run."""
        pending = [r for r in self.running if self._mid_prefill(r)]
        if not pending:
            return None
        others = self.waiting or len(pending) < len(self.running)
        return pending[0] if self._chunk_turn or not others else None

    def _feed(self, req: Req) -> list[int]:
        """The tokens `req`'s next forward feeds: its uncached ones, at most one chunk of them
        (not for a request that wants prompt logprobs: they come from a whole-prompt forward)."""
        ids = req.uncached_ids()
        size = self.limits.chunked_prefill_size
        if 0 < size < len(ids) and not self._wants_prompt_logprobs(req):
            return ids[:size]
        return ids

    def _guard(self, req: Req, work: Callable[[], object]) -> bool:
        """Run this request's own work (its logprobs, its token's text); if it raises, the
        request fails alone. True when it went through."""
        try:
            work()
            return True
        except Exception as e:
            log.exception("request %s failed", req.rid)
            self.fail(req, e)
            return False

    def fail(self, req: Req, error: BaseException) -> None:
        """Finish `req` with an internal error (finish reason abort, the error in its message)
        and free its KV; it stays wherever it is until the step's bookkeeping drops it."""
        req.finish_reason = {"type": "abort", "message": f"internal error: {type(error).__name__}: {error}"}
        req.finished_at = time.perf_counter()
        req.release_kv()
        self.metrics.requests_aborted += 1

    def _update_gauges(self) -> None:
        m = self.metrics
        m.num_running = len(self.running)
        m.num_waiting = len(self.waiting)
        m.kv_used_tokens = self.allocator.num_used_pages * self.allocator.page_size
        m.kv_cached_free_tokens = self.allocator.num_cached_free_pages * self.allocator.page_size
        m.kv_total_tokens = self.allocator.num_pages * self.allocator.page_size
        if self.swa_allocator is not None:
            m.swa_used_tokens = self.swa_allocator.num_used_pages * self.swa_allocator.page_size
            m.swa_total_tokens = self.swa_allocator.num_pages * self.swa_allocator.page_size

    def _window_end(self, req: Req) -> int:
        """Hybrid KV: the end of the positions `req`'s next prefill forward feeds (the window
        pool holds those of its chunk so far; a decode step's are `Worker.slots_needed`)."""
        return min(req.seq_len, req.num_cached + len(self._feed(req)))

    def _reserve_window(self, req: Req) -> None:
        """Hybrid KV: window pages for `req`'s next prefill chunk (its full-pool slots were
        reserved at admission); the newest other request is preempted while the pool lacks
        them (the start-up check makes one request's window always fit)."""
        if req.swa_table is None:
            return
        while not req.reserve_kv(req.page_table.num_tokens, self._window_end(req)):
            victim = next((r for r in reversed(self.running) if r is not req), None)
            if victim is None:
                raise RuntimeError("the chunked layers' KV pool cannot hold one request's window; "
                                   "raise --swa-full-tokens-ratio")
            self._preempt(victim)

    def _admit(self) -> list[Req]:
        batch: list[Req] = []
        budget = self.limits.max_prefill_tokens
        while self.waiting and len(self.running) + len(batch) < self.limits.max_running_requests:
            req = self.waiting[0]
            src = req.prefix_source
            if src is not None and req.num_cached == 0:
                if any(r is src for r in batch):
                    break  # its sibling computes the shared prompt in this step: wait one step
                self._share_prefix(req, src)
            if req.num_cached == 0:
                self._take_cached_prefix(req)
            need = len(self._feed(req))
            if batch and need > budget:
                req.release_kv()  # (a shared prefix is taken again when it is admitted)
                break
            if not req.reserve_kv(req.seq_len, self._window_end(req)):
                req.release_kv()
                break  # out of pages: wait until running requests free some
            self.waiting.popleft()
            batch.append(req)
            budget -= need
            if self.prefix_cache is not None and not self._wants_prompt_logprobs(req):
                self.metrics.cache_query_tokens += req.seq_len
                self.metrics.cache_hit_tokens += req.cached_tokens
        return batch

    def _share_prefix(self, req: Req, src: Req) -> None:
        """Start `req` on the whole KV pages of the prompt it shares with `src` (n > 1 /
        best_of siblings), if `src` has computed them: target and draft K/V of a prompt
        position depend on the prompt alone, except the draft's at its last position (it pairs
        with the first sampled token), so the pages before that one are shared and `req`
        prefills only the rest. The draft's K/V must be there: positions the draft has not
        consumed yet (adaptive speculation skipped it) are not shared (`_final_positions`)."""
        req.cached_tokens = 0
        if src.finished or src.prompt_key_ids != req.prompt_key_ids or src.num_cached < src.prompt_len:
            return
        if self._wants_prompt_logprobs(req):  # they are computed from a prefill of the whole prompt
            return
        page_size = self.allocator.page_size
        # positions whose K/V depend on the prompt alone, and are final in src
        limit = min(req.prompt_len - 1, self._final_positions(src))
        pages = min(limit, src.page_table.num_tokens) // page_size
        swa = src.swa_table
        if swa is not None:  # and the window pages of a start there
            pages = self._window_fit(pages, lambda k: swa.page_at(k) != RELEASED)
        if pages == 0:
            return
        req.page_table.share_prefix(src.page_table, pages)
        if swa is not None and req.swa_table is not None:
            first = self._window_first_page(pages)
            req.swa_table.adopt(first, swa.pages[first:pages], shared=True)
        req.num_cached = req.cached_tokens = pages * page_size

    def _take_cached_prefix(self, req: Req) -> None:
        """Start `req` on the cached pages of its longest page-aligned prefix (target and draft
        K/V alike; specdec/prefix_cache.py)."""
        req.cached_tokens = 0
        if self.prefix_cache is None or self._wants_prompt_logprobs(req):
            return
        chain = self.prefix_cache.match_chain(req.cache_ids)
        swa_cache = self.swa_cache
        if req.swa_table is not None and swa_cache is not None:  # the window pages must be cached too
            chain = chain[: self._window_fit(len(chain), lambda k: swa_cache.get(chain[k][0]) is not None)]
        if chain:
            req.page_table.adopt_cached([p for _, p in chain])
            if req.swa_table is not None and swa_cache is not None:
                first = self._window_first_page(len(chain))
                req.swa_table.adopt(first, [swa_cache.get(key) for key, _ in chain[first:]],  # type: ignore[misc]
                                    shared=False)
            req.num_cached = req.cached_tokens = len(chain) * self.allocator.page_size
            req.cache_cursor = cursor_after(chain)

    def _window_first_page(self, pages: int) -> int:
        """Hybrid KV: the first window page a request starting at `pages` whole pages needs."""
        pos = pages * self.allocator.page_size
        chunk = self.worker.chunk_size
        assert chunk is not None
        return (pos - pos % chunk) // self.allocator.page_size

    def _window_fit(self, pages: int, have: Callable[[int], bool]) -> int:
        """Hybrid KV: the most leading whole pages (<= `pages`) a request can start on: the
        window pages of a start there must all be available (`have(page index)`). A start on
        a chunk boundary needs none."""
        while pages > 0 and not all(have(k) for k in range(self._window_first_page(pages), pages)):
            pages -= 1
        return pages

    def _cache_pages(self, req: Req) -> None:
        """Offer `req`'s final pages to the prefix cache: committed positions whose draft K/V
        (under EAGLE3/EAGLE) is written from target features."""
        if self.prefix_cache is None or not req.page_table.pages:
            return
        swa, swa_cache = req.swa_table, self.swa_cache
        on_page = None
        if swa is not None and swa_cache is not None:  # window pages too, under the same keys

            def on_page(k: int, key: bytes) -> None:
                page = swa.page_at(k)
                if page != RELEASED:
                    swa_cache.put(key, page)

        req.cache_cursor = self.prefix_cache.insert(req.cache_ids, req.page_table.pages,
                                                    self._final_positions(req), req.cache_cursor, on_page)

    def _final_positions(self, req: Req) -> int:
        """Leading positions of `req` whose K/V no later step rewrites and (under EAGLE3/EAGLE,
        a draft with K/V of its own) whose draft K/V is written from target features: what
        siblings and the prefix cache may share."""
        if self.worker.draft_has_kv:
            return min(req.num_cached, req.draft_kv_len)
        return req.num_cached

    @staticmethod
    def _wants_prompt_logprobs(req: Req) -> bool:
        return req.return_logprob and req.logprob_start_len >= 0 and not req.input_logprobs_done

    def _reserve_decode_slots(self) -> None:
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if self._mid_prefill(req):  # not in this step (its full-pool slots are reserved; its window per chunk)
                i += 1
                continue
            if req.reserve_kv(self.worker.slots_needed(req)):
                i += 1
                continue
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:
                raise RuntimeError(
                    "KV cache too small for a single request; raise --max-total-tokens"
                )
            self._preempt(victim)
            if victim is req:
                continue

    def _preempt(self, req: Req) -> None:
        self.running.remove(req)
        self._cache_pages(req)  # (its re-admission finds them unless they were reused meanwhile)
        req.release_kv()
        req.num_preemptions += 1
        self.metrics.preemptions += 1
        self.waiting.appendleft(req)
        log.info("KV cache full: preempted request %s (it will be recomputed)", req.rid)

    # ---- output ----------------------------------------------------------------------------------
    def _token_text(self, token: int) -> str | None:
        return None if self.detokenize is None else self.detokenize([token], False)

    def _entries(self, logprobs: Tensor, token: int, top_n: int) -> tuple[LogprobEntry, list[LogprobEntry]]:
        entry: LogprobEntry = (float(logprobs[token]), token, self._token_text(token))
        top: list[LogprobEntry] = []
        if top_n > 0:
            vals, ids = torch.topk(logprobs, top_n)
            top = [(float(v), int(t), self._token_text(int(t))) for v, t in zip(vals, ids)]
        return entry, top

    def _prompt_logprobs(self, req: Req, first: int, lps: Tensor) -> None:
        """Prompt logprob entries from the rows scoring prompt tokens first, first + 1, ..."""
        if req.logprob_start_len == 0:  # the first prompt token has none
            req.input_token_logprobs.append((None, req.prompt_ids[0], self._token_text(req.prompt_ids[0])))
            req.input_top_logprobs.append(None)
        for j in range(int(lps.shape[0])):
            entry, top = self._entries(lps[j], req.prompt_ids[first + j], req.top_logprobs_num)
            req.input_token_logprobs.append(entry)
            req.input_top_logprobs.append(top if req.top_logprobs_num else None)

    def _append(self, req: Req, token: int, logprobs: Tensor | None) -> None:
        """Emit one token (and its logprobs) and check for a finish; an error in this request's
        own work fails it alone."""
        if not req.finished:  # (failed earlier in this step)
            self._guard(req, lambda: self._emit(req, token, logprobs))

    def _emit(self, req: Req, token: int, logprobs: Tensor | None) -> None:
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
        if req.params.max_new_tokens == 0:
            self._finish(req, {"type": "length", "length": 0}, now)
            return
        if req.grammar is not None and not req.grammar.accept(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
        req.output_ids.append(token)
        new_len = 0
        if self.detokenize is not None:  # the request's text, grown by what this token made final
            if req.detok is None:
                detokenize, skip = self.detokenize, req.params.skip_special_tokens
                req.detok = IncrementalDetokenizer(lambda ids: detokenize(ids, skip))
            new_len = len(req.detok.push(token))
        if req.return_logprob and logprobs is not None:
            entry, top = self._entries(logprobs, token, req.top_logprobs_num)
            req.output_token_logprobs.append(entry)
            req.output_top_logprobs.append(top)
        self._check_finished(req, token, new_len, now)

    def _check_finished(self, req: Req, token: int, new_len: int, now: float) -> None:
        p = req.params
        if req.grammar is not None and req.grammar.terminated:  # the grammar took its stop token
            return self._finish(req, {"type": "stop", "matched": token}, now)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(req, {"type": "stop", "matched": token}, now)
        if token in p.stop_token_ids:
            return self._finish(req, {"type": "stop", "matched": token}, now)
        if p.stop and req.detok is not None:
            matched = first_stop(req.detok.text, new_len, p.stop)
            if matched is not None:
                return self._finish(req, {"type": "stop", "matched": matched}, now)
        if req.output_len >= p.max_new_tokens:
            return self._finish(req, {"type": "length", "length": p.max_new_tokens}, now)
        if req.seq_len >= self.limits.context_length:
            return self._finish(req, {"type": "length", "length": req.output_len}, now)
        return None

    def _finish(self, req: Req, reason: dict[str, object], now: float) -> None:
        req.finish_reason = reason
        req.finished_at = now
        self._cache_pages(req)
        req.release_kv()
        req.prefix_source = None
        self.metrics.requests_finished += 1
        self.metrics.prompt_tokens += req.prompt_len
        self.metrics.generation_tokens += req.output_len

