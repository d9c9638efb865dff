"""An exception inside an engine step fails only the requests it concerns: each is answered
(finish reason abort, the error in its message) and its KV freed; the other requests of the
batch, and the waiting ones, run to the same tokens as without the failure (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import specdec
from specdec.sampling_params import SamplingParams

from .spec_models import make_random_eagle3
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3)


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draft") / "head"
    make_random_eagle3(path, 32, VOCAB, seed=1)
    return path


def _engines(target: Checkpoint, draft: Path) -> list[Any]:
    return [target.engine(), target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft),
                                           speculative_num_steps=3, speculative_eagle_topk=2,
                                           speculative_num_draft_tokens=4)]


def _run(engine: Any, prompts: list[list[int]], params: list[dict[str, Any]], **kw: Any) -> list[Any]:
    reqs = [engine.make_request(p, SamplingParams.from_dict(q), **kw.get(str(i), {}))
            for i, (p, q) in enumerate(zip(prompts, params, strict=True))]
    for r in reqs:
        engine.scheduler.add(r)
    for _ in range(500):
        if all(r.finished for r in reqs):
            break
        engine.scheduler.step()
    assert all(r.finished for r in reqs), "a request was left unanswered"
    return reqs


@pytest.mark.parametrize("spec", [False, True])
def test_an_error_in_one_requests_logprobs_fails_that_request_alone(
    target: Checkpoint, draft: Path, monkeypatch: pytest.MonkeyPatch, spec: bool
) -> None:
    prompts = random_prompts((5, 9, 7), seed=4)
    engine = _engines(target, draft)[int(spec)]
    alone = [list(engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]) for p in prompts]
    entries = engine.scheduler._entries

    def broken(logprobs: Any, token: int, top_n: int) -> Any:
        if top_n == 3:  # only the request asking for 3 top logprobs hits the bug
            raise RuntimeError("top-k blew up")
        return entries(logprobs, token, top_n)

    monkeypatch.setattr(engine.scheduler, "_entries", broken)
    reqs = _run(engine, prompts, [GREEDY] * 3, **{"1": {"return_logprob": True, "top_logprobs_num": 3}})
    bad = reqs[1]
    assert bad.finish_reason["type"] == "abort" and "top-k blew up" in bad.finish_reason["message"]
    assert [r.output_ids for i, r in enumerate(reqs) if i != 1] == [alone[0], alone[2]]
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("spec", [False, True])
def test_a_failing_forward_fails_its_batch_and_the_queue_goes_on(
    target: Checkpoint, draft: Path, monkeypatch: pytest.MonkeyPatch, spec: bool
) -> None:
    engine = _engines(target, draft)[int(spec)]
    prompts = random_prompts((6, 4, 8), seed=5)
    later = list(engine.generate(input_ids=prompts[2], sampling_params=GREEDY)["output_ids"])
    runner = engine.runner
    calls = {"n": 0}
    real_extend, real_verify = runner.extend, runner.verify_trees

    def flaky(real: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:  # a decode step of the first two requests
                raise RuntimeError("the forward failed")
            return real(*a, **k)
        return call

    monkeypatch.setattr(runner, "extend", flaky(real_extend))
    monkeypatch.setattr(runner, "verify_trees", flaky(real_verify))
    first = _run(engine, prompts[:2], [GREEDY] * 2)
    assert all(r.finish_reason["type"] == "abort" and "the forward failed" in r.finish_reason["message"]
               for r in first)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    # the engine keeps serving: a new request gets the tokens it gets on a healthy engine
    (again,) = _run(engine, prompts[2:], [GREEDY])
    assert again.output_ids == later and again.finish_reason["type"] == "length"
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_top_logprobs_num_is_bounded_by_the_vocabulary(target: Checkpoint) -> None:
    """(The server caps it lower, at 20: test_server.py.)"""
    engine = target.engine()
    with pytest.raises(ValueError, match="top_logprobs_num"):
        engine.make_request([1, 2], SamplingParams.from_dict(GREEDY), True, -1, VOCAB + 1)
    engine.make_request([1, 2], SamplingParams.from_dict(GREEDY), True, -1, VOCAB)


def test_a_context_length_beyond_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        specdec.Engine(dtype="float32", context_length=10**9, max_total_tokens=1024, log_level="warning")
