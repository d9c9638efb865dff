"""Parallel sampling (n > 1, best_of): siblings of one prompt share its whole KV pages
(specdec/scheduler.py `_share_prefix`), with and without EAGLE3, and nothing changes in what they
generate: greedy siblings equal plain decoding, pages are freed at the end."""

from __future__ import annotations

from typing import Any

import pytest

import specdec
from specdec.draft.heads import shipped_head_for_embedded
from specdec.sampling_params import SamplingParams
from specdec.server.chat_template import load_chat_template

pytestmark = pytest.mark.slow

QUESTION = "Explain in a few sentences why the sky is blue, and what makes sunsets red. " * 3


@pytest.fixture(scope="module")
def base() -> Any:
    # the prefix cache off: these tests are about siblings sharing (tests/test_prefix_cache.py)
    return specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning", disable_radix_cache=True)


@pytest.fixture(scope="module")
def eagle() -> Any:
    head = shipped_head_for_embedded()
    assert head is not None
    return specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                          speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                          speculative_num_steps=5, speculative_eagle_topk=4, speculative_num_draft_tokens=8,
                          speculative_adaptive="off", disable_radix_cache=True)


def _ids(engine: Any) -> list[int]:
    prompt = load_chat_template(None, engine.model_path).render([{"role": "user", "content": QUESTION}])
    return list(engine.encode(prompt))


def _run_siblings(engine: Any, ids: list[int], params: list[SamplingParams]) -> tuple[list[Any], int]:
    """Siblings sharing the first one's prompt KV, run to the end; returns their results and the
    most KV pages in use at once."""
    reqs = [engine.make_request(ids, p) for p in params]
    for r in reqs[1:]:
        r.prefix_source = reqs[0]
    for r in reqs:
        engine.scheduler.add(r)
    peak = 0
    while engine.scheduler.has_work():
        engine.scheduler.step()
        peak = max(peak, engine.allocator.num_used_pages)
    return [engine.result(r) for r in reqs], peak


@pytest.mark.parametrize("which", ["base", "eagle"])
def test_siblings_share_the_prompt_pages_and_generate_what_one_request_does(
        request: pytest.FixtureRequest, base: Any, which: str) -> None:
    engine = request.getfixturevalue(which)
    ids = _ids(engine)
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    ref = base.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 24})
    results, peak = _run_siblings(engine, ids, [greedy] * 3)
    page = engine.allocator.page_size
    shared = (len(ids) - 1) // page * page
    assert shared >= 2 * page  # the prompt spans several pages
    assert [r["output_ids"] for r in results] == [ref["output_ids"]] * 3
    assert [r["meta_info"]["cached_tokens"] for r in results] == [0, shared, shared]
    # three unshared requests need at least 3 * ceil((prompt + output) / page) pages at their end;
    # sharing saves the shared pages twice (kept a margin of one copy for the tree's slots)
    unshared = 3 * -(-(len(ids) + 24) // page)
    assert peak <= unshared - shared // page, (peak, unshared)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_seeded_siblings_sample_as_single_requests(eagle: Any) -> None:
    ids = _ids(eagle)
    params = [SamplingParams(temperature=0.8, seed=5 + i, max_new_tokens=16) for i in range(3)]
    results, _ = _run_siblings(eagle, ids, params)
    singles = [eagle.generate(input_ids=ids, sampling_params={"temperature": 0.8, "seed": 5 + i,
                                                                "max_new_tokens": 16}) for i in range(3)]
    assert [r["output_ids"] for r in results] == [s["output_ids"] for s in singles]


def test_positions_the_draft_has_not_consumed_are_not_shared(eagle: Any) -> None:
    """Adaptive speculation may skip the draft at a step; its K/V for those positions is not in
    the pages yet, so a sibling must not take them."""
    ids = _ids(eagle)
    page = eagle.allocator.page_size
    src = eagle.make_request(ids, SamplingParams(temperature=0, max_new_tokens=4))
    eagle.scheduler.add(src)
    eagle.scheduler.step()  # the prefill
    src.draft_kv_len = page + 3  # as if the draft had stopped at page + 3
    sib = eagle.make_request(ids, SamplingParams(temperature=0, max_new_tokens=4))
    eagle.scheduler._share_prefix(sib, src)
    assert sib.num_cached == sib.cached_tokens == page
    sib.release_kv()
    eagle.scheduler.abort(src.rid)
    assert eagle.allocator.num_free_pages == eagle.allocator.num_pages
