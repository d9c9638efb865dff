"""The scheduler on a fake model worker: admission, preemption, aborts, chunked prefill and
speculative slot reservation, with no model at all (specdec/step_batch.py is the contract).

The fake "model" continues every sequence with (last token + 1) % VOCAB, so a request's output
is known from its prompt alone, whatever the batching, preemption or speculation did. Every
step checks that the slots the step writes were reserved.
"""

from __future__ import annotations

import pytest

from specdec.page_allocator import PageAllocator, PageTable
from specdec.request import Req
from specdec.sampling_params import SamplingParams
from specdec.scheduler import Scheduler, SchedulerLimits
from specdec.step_batch import ReqOutput, ScheduledBatch, StepKind, StepResult

VOCAB = 50
PAGE = 4


def expected(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = (last + 1) % VOCAB
        out.append(last)
    return out


class FakeWorker:
    """Emits the next `accept` tokens per decode step (a speculative step accepting accept - 1
    drafts) and needs `extra` slots past the committed prefix for it (0: plain decoding)."""

    chunk_size = None
    draft_has_kv = False

    def __init__(self, extra: int = 0, accept: int = 1, fail_rids: frozenset[str] = frozenset()) -> None:
        assert (extra == 0 and accept == 1) or accept <= extra
        self.extra, self.accept = extra, accept
        self.fail_rids = fail_rids  # requests whose own work fails (ReqOutput.error)
        self.raise_next = False  # the next step's forward raises
        self.steps: list[tuple[StepKind, tuple[str, ...], tuple[int, ...]]] = []

    def slots_needed(self, req: Req) -> int:
        return req.seq_len if self.extra == 0 else req.num_cached + self.extra

    def run(self, batch: ScheduledBatch) -> StepResult:
        self.steps.append((batch.kind, tuple(r.rid for r in batch.reqs), tuple(len(f) for f in batch.feeds)))
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("the forward broke")
        outs = []
        for i, req in enumerate(batch.reqs):
            c = req.num_cached
            if batch.kind is StepKind.EXTEND:
                end = c + len(batch.feeds[i])
                assert list(batch.feeds[i]) == req.all_ids[c:end]
                writes = end
                n = 1 if end == req.seq_len else 0
            else:
                assert req.seq_len == c + 1, "a decode step feeds one uncached token"
                writes = c + max(self.extra, 1)
                n = self.accept
                end = c + n
            assert req.page_table.num_tokens >= writes, f"{req.rid}: slots [0, {writes}) not reserved"
            if req.rid in self.fail_rids:
                outs.append(ReqOutput(end, error=ValueError("its own work broke")))
                continue
            outs.append(ReqOutput(end, tuple(expected(req.all_ids, n))))
        return StepResult(tuple(outs))


def make(worker: FakeWorker, pages: int, max_running: int = 8, max_prefill: int = 1000,
         chunk: int = -1) -> Scheduler:
    return Scheduler(worker, PageAllocator(pages, PAGE), SchedulerLimits(max_running, max_prefill, 10_000, chunk),
                     eos_token_ids=(), detokenize=None)


def request(sched: Scheduler, rid: str, prompt_len: int, max_new: int, first: int = 0) -> Req:
    prompt = [(first + i) % VOCAB for i in range(prompt_len)]
    req = Req(rid=rid, prompt_ids=prompt, params=SamplingParams(max_new_tokens=max_new, ignore_eos=True),
              page_table=PageTable(sched.allocator), generator=None)
    sched.add(req)
    return req


def drain(sched: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if not sched.has_work():
            return
        sched.step()
    raise AssertionError("the scheduler did not finish its requests")


def test_admission_respects_the_running_and_prefill_token_limits() -> None:
    worker = FakeWorker()
    sched = make(worker, pages=64, max_running=2, max_prefill=10)
    reqs = [request(sched, f"r{i}", 6, 3, first=i) for i in range(3)]
    sched.step()
    # 6 + 6 tokens exceed the prefill budget of 10: the first is admitted alone
    assert worker.steps[0] == (StepKind.EXTEND, ("r0",), (6,))
    sched.step()
    assert worker.steps[1] == (StepKind.EXTEND, ("r1",), (6,))
    assert len(sched.running) == 2 and list(sched.waiting) == [reqs[2]]  # max_running_requests = 2
    drain(sched)
    for r in reqs:
        assert r.output_ids == expected(r.prompt_ids, 3) and r.finish_reason == {"type": "length", "length": 3}
    assert sched.allocator.num_used_pages == 0
    sched.allocator.check_invariants()


def test_a_full_cache_preempts_the_newest_request_and_recomputes_it() -> None:
    worker = FakeWorker()
    sched = make(worker, pages=6)  # 24 slots; two requests of 8 + 8 tokens need 32
    a = request(sched, "a", 8, 8)
    b = request(sched, "b", 8, 8, first=20)
    drain(sched)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0 and sched.metrics.preemptions >= 1
    # b came back with its prompt and the output it had, fed again in one extend
    recompute = [s for s in worker.steps if s[0] is StepKind.EXTEND and s[1] == ("b",) and s[2][0] > 8]
    assert recompute
    assert a.output_ids == expected(a.prompt_ids, 8) and b.output_ids == expected(b.prompt_ids, 8)
    assert sched.allocator.num_used_pages == 0


def test_a_request_too_large_for_the_cache_alone_is_refused_with_a_clear_error() -> None:
    sched = make(FakeWorker(), pages=2)
    request(sched, "big", 7, 4)
    sched.step()  # the prefill fits (7 slots); its decode steps soon do not
    with pytest.raises(RuntimeError, match="KV cache too small for a single request"):
        drain(sched)


def test_aborts_free_the_kv_of_waiting_and_running_requests() -> None:
    sched = make(FakeWorker(), pages=64, max_running=1)
    run = request(sched, "run", 5, 10)
    wait = request(sched, "wait", 5, 10)
    sched.step()
    assert sched.running == [run] and list(sched.waiting) == [wait]
    assert sched.abort("nobody") is None
    assert sched.abort("wait", "client gone") is wait and wait.finish_reason == {"type": "abort",
                                                                                "message": "client gone"}
    assert sched.abort("run") is run and run.finished
    assert not sched.has_work() and sched.allocator.num_used_pages == 0
    assert sched.metrics.requests_aborted == 2 and sched.metrics.kv_used_tokens == 0


@pytest.mark.parametrize(("extra", "accept"), [(5, 1), (5, 3), (8, 8)])
def test_speculative_steps_reserve_their_slots_and_free_what_they_did_not_commit(extra: int, accept: int) -> None:
    worker = FakeWorker(extra=extra, accept=accept)
    sched = make(worker, pages=64)
    reqs = [request(sched, f"s{i}", 5 + i, 17, first=3 * i) for i in range(3)]
    sched.step()  # the prefill reserves only what it feeds
    assert all(r.page_table.num_tokens == r.prompt_len for r in reqs)
    while sched.has_work():
        sched.step()  # (the worker asserts num_cached + extra slots were reserved)
        for r in sched.running:  # after the step, slots past the committed prefix are gone
            assert r.page_table.num_tokens == r.num_cached
            assert r.page_table.capacity < r.num_cached + PAGE
    for r in reqs:  # the last step's surplus tokens are dropped at max_new_tokens
        assert r.output_ids == expected(r.prompt_ids, 17)
    assert sched.allocator.num_used_pages == 0


def test_speculative_reservation_preempts_like_plain_decoding() -> None:
    worker = FakeWorker(extra=6, accept=2)
    sched = make(worker, pages=7)  # 28 slots: two requests of 6 + 12 cannot both grow with 6 spare
    a = request(sched, "a", 6, 12)
    b = request(sched, "b", 6, 12, first=30)
    drain(sched)
    assert b.num_preemptions >= 1
    assert a.output_ids == expected(a.prompt_ids, 12) and b.output_ids == expected(b.prompt_ids, 12)
    assert sched.allocator.num_used_pages == 0


def test_chunks_alternate_with_the_other_requests_decode_steps() -> None:
    worker = FakeWorker()
    sched = make(worker, pages=64, chunk=4)
    short = request(sched, "short", 3, 6)
    sched.step()  # short's prefill
    long = request(sched, "long", 14, 2, first=9)
    drain(sched)
    kinds = [(k.value, rids) for k, rids, _ in worker.steps[1:7]]
    assert kinds == [("extend", ("long",)), ("decode", ("short",)), ("extend", ("long",)),
                     ("decode", ("short",)), ("extend", ("long",)), ("decode", ("short",))]
    assert [s[2] for s in worker.steps if s[1] == ("long",) and s[0] is StepKind.EXTEND] == [(4,), (4,), (4,), (2,)]
    assert short.output_ids == expected(short.prompt_ids, 6) and long.output_ids == expected(long.prompt_ids, 2)


def test_a_failed_forward_fails_its_batch_and_a_failed_request_fails_alone() -> None:
    worker = FakeWorker(fail_rids=frozenset({"bad"}))
    sched = make(worker, pages=64, max_prefill=6)
    ok = request(sched, "ok", 5, 4)
    bad = request(sched, "bad", 5, 4, first=7)
    touched = sched.step()  # ok alone (the budget)
    assert touched == [ok]
    touched = sched.step()  # bad's prefill: its own work fails, nothing else does
    assert touched == [bad] and bad.finish_reason["type"] == "abort" and "its own work broke" in bad.finish_reason["message"]
    later = request(sched, "later", 5, 4, first=13)
    worker.raise_next = True  # later's prefill forward raises: later fails, ok goes on
    touched = sched.step()
    assert touched == [later] and later.finished and "the forward broke" in later.finish_reason["message"]
    drain(sched)
    assert ok.output_ids == expected(ok.prompt_ids, 4) and ok.finish_reason["type"] == "length"
    assert sched.allocator.num_used_pages == 0 and sched.metrics.requests_aborted == 2


def test_a_batch_must_say_what_each_request_feeds() -> None:
    with pytest.raises(ValueError, match="tokens every request feeds"):
        ScheduledBatch(StepKind.EXTEND, (), ((1,),))
    with pytest.raises(ValueError, match="one logprob row per token"):
        import torch

        ReqOutput(3, (1, 2), torch.zeros(1, VOCAB))
