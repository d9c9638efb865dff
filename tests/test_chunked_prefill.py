"""Chunked prefill (`--chunked-prefill-size`): a long prompt is fed a chunk per forward, between
the other requests' steps. Greedy output equals the whole-prompt prefill's (plain and EAGLE3,
chunk sizes that cut the prompt anywhere), a decoding request keeps getting tokens while a long
prompt is prefilled, and everything is freed at the end."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import specdec
from specdec.draft.heads import shipped_head_for_embedded
from specdec.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = ("Summarise the following notes in two sentences. " + "The meeting covered budgets, hiring, the "
          "new office, and the product launch in spring; everyone agreed to meet again next week. " * 4)
GREEDY = {"temperature": 0, "max_new_tokens": 20}


def _engine(chunk: int, eagle: bool = False) -> Any:
    kw: dict[str, Any] = {"dtype": "float32", "max_total_tokens": 4096, "log_level": "warning",
                          "chunked_prefill_size": chunk}
    if eagle:
        head = shipped_head_for_embedded()
        assert head is not None
        kw.update(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head), speculative_num_steps=5,
                  speculative_eagle_topk=4, speculative_num_draft_tokens=8, speculative_adaptive="off")
    return specdec.Engine(**kw)


@pytest.fixture(scope="module")
def whole() -> Any:
    return _engine(-1)


@pytest.mark.parametrize("chunk", [7, 16, 33])
def test_chunked_greedy_equals_the_whole_prompt_prefill(whole: Any, chunk: int) -> None:
    ids = whole.encode(PROMPT)
    assert len(ids) > 3 * chunk
    ref = whole.generate(input_ids=ids, sampling_params=GREEDY)
    engine = _engine(chunk)
    steps = []
    orig = engine.runner.extend

    def counting(reqs: Any, tokens: Any, capture: Any = ()) -> Any:
        steps.append(max(len(t) for t in tokens))
        return orig(reqs, tokens, capture)

    engine.runner.extend = counting
    out = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert out["output_ids"] == ref["output_ids"]
    assert max(steps) == chunk  # no forward fed more than a chunk
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def _prefilled_draft_keys(engine: Any, ids: list[int]) -> Any:
    """The draft's K/V over the prompt's positions once the prefill is done (the last position
    pairs with the first sampled token, so it is left out)."""
    req = engine.make_request(ids, SamplingParams(temperature=0, max_new_tokens=8))
    engine.scheduler.add(req)
    while req.output_len == 0:
        engine.scheduler.step()
    slots = req.kv_slots(req.prompt_len - 1)
    pool = engine.spec.proposer.pool
    keys = (pool.k[0][slots].clone(), pool.v[0][slots].clone())
    engine.scheduler.abort(req.rid)
    return keys


def test_chunked_prefill_under_eagle3_is_lossless_and_feeds_the_draft_every_chunk(whole: Any) -> None:
    ids = whole.encode(PROMPT)
    ref = whole.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 40})
    results, keys = {}, {}
    for chunk in (-1, 16):
        with _engine(chunk, eagle=True) as engine:
            results[chunk] = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 40})
            assert engine.allocator.num_free_pages == engine.allocator.num_pages
            keys[chunk] = _prefilled_draft_keys(engine, ids)
    assert results[16]["output_ids"] == results[-1]["output_ids"] == ref["output_ids"]
    # the draft's K/V over the prompt is what a whole prefill writes (fp32: 1e-4)
    for a, b in zip(keys[16], keys[-1], strict=True):
        assert float(b.abs().max()) > 0.1
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_decoding_request_keeps_going_while_a_long_prompt_is_prefilled() -> None:
    engine = _engine(8)
    sched = engine.scheduler
    short = engine.make_request(engine.encode("Count: one, two,"), SamplingParams(temperature=0, max_new_tokens=60,
                                                                                   ignore_eos=True))
    sched.add(short)
    while short.output_len < 2:
        sched.step()
    long = engine.make_request(engine.encode(PROMPT), SamplingParams(temperature=0, max_new_tokens=4))
    sched.add(long)
    steps: list[str] = []  # per step: "chunk" (the long prompt advanced) or "decode" (the short one did)
    while long.output_len == 0:
        fed, got = long.num_cached, short.output_len
        sched.step()
        steps.append("chunk" if long.num_cached > fed else "decode" if short.output_len > got else "other")
    assert steps.count("chunk") >= long.prompt_len // 8  # fed 8 tokens at a time
    # strictly alternating from admission on (admission feeds the first chunk): never two chunks in a row
    assert steps[0] == "chunk" and "other" not in steps
    assert all(a != b for a, b in itertools.pairwise(steps)), steps
    while sched.has_work():
        sched.step()
    assert long.finish_reason is not None and short.finish_reason is not None
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
