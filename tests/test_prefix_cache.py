"""The prefix cache (specdec/prefix_cache.py) and the allocator's cached free list: pages found
again by their tokens (and the token after them), kept after their requests end, reused least
recently freed first only when no uncached page is free; a chat's second turn reuses the first
turn's K/V, target and EAGLE3 draft alike, and generates what an uncached run does."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import specdec
from specdec.draft.heads import shipped_head_for_embedded
from specdec.page_allocator import PageAllocator, PageTable
from specdec.prefix_cache import PrefixCache
from specdec.sampling_params import SamplingParams
from specdec.server.chat_template import load_chat_template


def test_cached_pages_wait_on_their_own_free_list_and_are_reused_last() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    evicted: list[int] = []
    alloc.on_evict = evicted.append
    pages = alloc.allocate(2)
    assert pages is not None
    alloc.mark_cached(pages[0])
    alloc.free(pages)
    assert alloc.num_free_pages == 4 and alloc.num_cached_free_pages == 1
    alloc.reclaim([pages[0]])  # a hit takes it back with its contents
    assert alloc.refcount(pages[0]) == 1 and alloc.num_cached_free_pages == 0
    alloc.free([pages[0]])
    got = alloc.allocate(3)  # the three uncached pages first
    assert got is not None and pages[0] not in got and not evicted
    assert alloc.allocate(1) == [pages[0]] and evicted == [pages[0]]  # then the cached one, evicted
    with pytest.raises(ValueError, match="not cached"):
        alloc.reclaim([pages[0]])
    alloc.check_invariants()


def _table(alloc: PageAllocator, n: int) -> PageTable:
    t = PageTable(alloc)
    assert t.reserve(n)
    return t


def test_pages_match_by_their_tokens_and_the_token_after() -> None:
    alloc = PageAllocator(num_pages=16, page_size=4)
    cache = PrefixCache(alloc)
    ids = list(range(100, 114))  # 14 tokens: 3 whole pages, the third's next token known
    t = _table(alloc, len(ids))
    cursor = cache.insert(ids, t.pages, valid=12)
    assert cursor[0] == 3 and cache.num_cached_pages == 3
    assert cache.insert(ids, t.pages, valid=14, cursor=cursor)[0] == 3  # page 4 is not whole
    assert cache.match(ids)[0] == t.pages[:3]
    assert cache.match(ids[:12])[0] == t.pages[:2]  # a page needs the token after it (and one to feed)
    other = [*ids[:9], 999, *ids[10:]]  # differs inside page 3
    assert cache.match(other)[0] == t.pages[:2]
    shifted = [*ids[:5], 777, *ids[6:]]  # differs in page 2: page 3's chain no longer matches
    assert cache.match(shifted)[0] == t.pages[:1]
    assert cache.match([*ids[:8], 0, *ids[9:]])[0] == t.pages[:1]  # page 2's next token differs
    nxt = [*ids[:4], 555, *ids[5:]]
    assert cache.match(ids[:4] + [ids[4]] + [1] * 9)[0] == t.pages[:1]  # page 1's next token is ids[4]
    assert cache.match(nxt)[0] == []  # page 1 saw ids[4] after it, not 555
    t.release()
    assert alloc.num_free_pages == 16 and alloc.num_cached_free_pages == 3
    u = PageTable(alloc)
    pages, _ = cache.match(ids)
    u.adopt_cached(pages)
    assert u.num_tokens == 12 and alloc.num_cached_free_pages == 0
    u.release()
    assert _table(alloc, 16 * 4).pages  # everything handed out again: the cached pages evicted
    assert cache.num_cached_pages == 0 and cache.match(ids)[0] == []
    alloc.check_invariants()


def test_insert_stops_at_the_valid_positions() -> None:
    alloc = PageAllocator(num_pages=8, page_size=4)
    cache = PrefixCache(alloc)
    ids = list(range(20))
    t = _table(alloc, 20)
    cache.insert(ids, t.pages, valid=7)  # e.g. the draft has consumed 7 positions
    assert cache.num_cached_pages == 1


# ---- the engine -----------------------------------------------------------------------------------


def _eagle(**kw: Any) -> Any:
    head = shipped_head_for_embedded()
    assert head is not None
    return specdec.Engine(dtype="float32", max_total_tokens=8192, log_level="warning",
                          speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head),
                          speculative_num_steps=5, speculative_eagle_topk=4, speculative_num_draft_tokens=8,
                          speculative_adaptive="off", **kw)


@pytest.mark.slow
def test_a_second_chat_turn_reuses_the_first_turns_kv_for_target_and_draft() -> None:
    cached, uncached = _eagle(), _eagle(disable_radix_cache=True)
    template = load_chat_template(None, cached.model_path)
    turn1 = [{"role": "user", "content": "Give me three tips for staying healthy."}]
    greedy = {"temperature": 0, "max_new_tokens": 48}
    ids1 = cached.encode(template.render(turn1))
    first = cached.generate(input_ids=ids1, sampling_params=greedy)
    assert first["meta_info"]["cached_tokens"] == 0
    # the next turn's prompt starts with the first turn's prompt and answer
    ids2 = ids1 + first["output_ids"] + cached.encode("\n<|im_start|>user\nAnd one more?<|im_end|>\n"
                                                       "<|im_start|>assistant\n")
    second = cached.generate(input_ids=ids2, sampling_params=greedy)
    ref = uncached.generate(input_ids=ids2, sampling_params=greedy)
    page = cached.allocator.page_size
    shared = len(ids1) + len(first["output_ids"]) - 1  # committed positions of turn 1
    # all but what the last verify step committed (the draft had not consumed it yet)
    assert second["meta_info"]["cached_tokens"] >= (shared - 6) // page * page > 0, second["meta_info"]["cached_tokens"]
    assert second["output_ids"] == ref["output_ids"]
    assert second["meta_info"]["spec_accept_length"] == ref["meta_info"]["spec_accept_length"]
    assert cached.metrics.cache_hit_rate > 0
    # the cached draft K/V over the shared prefix is what an uncached prefill writes
    n = second["meta_info"]["cached_tokens"]
    keys = []
    for engine in (cached, uncached):
        req = engine.make_request(ids2, SamplingParams(temperature=0, max_new_tokens=2))
        engine.scheduler.add(req)
        while req.output_len == 0:
            engine.scheduler.step()
        assert req.cached_tokens >= n if engine is cached else req.cached_tokens == 0
        slots = req.kv_slots(n)
        keys.append(engine.spec.proposer.pool.k[0][slots].clone())
        engine.scheduler.abort(req.rid)
    torch.testing.assert_close(keys[0], keys[1], atol=1e-4, rtol=1e-4)
    for engine in (cached, uncached):
        assert engine.allocator.num_free_pages == engine.allocator.num_pages


@pytest.mark.slow
def test_a_full_cache_evicts_and_nothing_leaks() -> None:
    """A KV cache of 40 pages and prompts that need most of it: cached pages are reused for
    new requests, every request finishes, every page is free at the end."""
    engine = specdec.Engine(dtype="float32", max_total_tokens=640, log_level="warning")
    prompts = [engine.encode(f"Story {i}: " + "once upon a time there was a king who " * 12) for i in range(6)]
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
    again = engine.generate(input_ids=prompts[-1], sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == outs[-1]["output_ids"]
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    engine.allocator.check_invariants()


@pytest.mark.slow
def test_positions_whose_draft_kv_is_not_written_are_not_cached() -> None:
    """Under EAGLE3 a page is cached only once the draft's K/V over it is written from target
    features (a request that finishes right after a verify step has not fed the draft yet)."""
    engine = _eagle()
    page = engine.allocator.page_size
    cache, engine.scheduler.prefix_cache = engine.scheduler.prefix_cache, None
    ids = engine.encode("Explain in a few sentences why the sky is blue, and why sunsets are red. " * 3)
    req = engine.make_request(ids, SamplingParams(temperature=0, max_new_tokens=4))
    engine.scheduler.add(req)
    engine.scheduler.step()  # the prefill, nothing cached
    engine.scheduler.prefix_cache = cache
    assert cache is not None and cache.num_cached_pages == 0 and req.draft_kv_len == len(ids)
    req.draft_kv_len = page + 3  # as if the draft had stopped there
    engine.scheduler._cache_pages(req)
    assert cache.num_cached_pages == 1
    req.draft_kv_len = len(ids)
    engine.scheduler._cache_pages(req)
    assert cache.num_cached_pages == len(ids) // page
    engine.scheduler.abort(req.rid)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
