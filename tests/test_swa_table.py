"""The hybrid KV cache's bookkeeping without torch: window tables over the chunked layers'
pool beside full page tables, one allocator contract for both, and the pool sizing."""

from __future__ import annotations

import random

import pytest

from specdec.kv_budget import KVLayout, plan_kv, static_kv_budget
from specdec.page_allocator import PageAllocator, PageTable
from specdec.swa_table import RELEASED, WindowPageTable, window_pages_needed


def test_window_keeps_only_the_pages_of_the_current_chunk() -> None:
    alloc = PageAllocator(num_pages=6, page_size=4)
    t = WindowPageTable(alloc, chunk_size=8)
    assert t.reserve(6, pos=0) and t.pages == [0, 1] and t.first_position == 0
    assert t.slots(0, 6) == [0, 1, 2, 3, 4, 5]
    # the next query sits at 9: its chunk starts at 8, pages 0-1 are dead
    assert t.reserve(12, pos=9) and t.first_position == 8
    assert t.pages[:2] == [RELEASED, RELEASED] and t.held_pages == [t.pages[2]]
    assert alloc.num_used_pages == 1
    with pytest.raises(IndexError):
        t.slots(7, 9)  # position 7 is gone
    # a forward from 14 crossing into the next chunk keeps chunk [8, 16) for its first queries
    assert t.reserve(20, pos=14) and t.first_position == 8 and len(t.held_pages) == 3
    assert t.pages_needed(24, pos=16) == 1  # page 5 (positions 20-23); pages 2-3 would be released
    t.truncate(15)
    assert len(t.held_pages) == 2 and t.num_tokens == 15
    t.release()
    assert alloc.num_free_pages == 6
    alloc.check_invariants()


def test_chunk_not_a_multiple_of_the_page_keeps_the_page_holding_the_chunk_start() -> None:
    alloc = PageAllocator(num_pages=8, page_size=4)
    t = WindowPageTable(alloc, chunk_size=6)
    assert t.reserve(14, pos=13)  # chunk [12, 18): page 3 on
    assert t.first_position == 12 and t.pages_needed(14, 13) == 0
    assert t.reserve(20, pos=19)  # chunk [18, 24) starts inside page 4
    assert t.first_position == 16 and t.slots(18, 20) == [t.pages[4] * 4 + 2, t.pages[4] * 4 + 3]
    t.release()
    alloc.check_invariants()


def test_a_failed_reservation_allocates_nothing() -> None:
    alloc = PageAllocator(num_pages=3, page_size=4)
    t = WindowPageTable(alloc, chunk_size=8)
    assert t.reserve(8, 0)
    other = WindowPageTable(alloc, chunk_size=8)
    assert not other.reserve(8, 0) and alloc.num_used_pages == 2 and other.pages == []
    assert other.reserve(4, 0)
    t.release()
    other.release()
    assert alloc.num_free_pages == 3


def test_adopt_shared_and_cached_pages() -> None:
    alloc = PageAllocator(num_pages=8, page_size=4)
    src = WindowPageTable(alloc, chunk_size=8)
    assert src.reserve(22, 17)  # window from 16: pages 4, 5 held
    dst = WindowPageTable(alloc, chunk_size=8)
    dst.adopt(4, src.pages[4:5], shared=True)
    assert dst.num_tokens == 20 and dst.first_position == 16 and alloc.refcount(src.pages[4]) == 2
    assert dst.reserve(23, 20) and dst.slots(16, 20) == src.slots(16, 20)
    with pytest.raises(ValueError, match="empty"):
        dst.adopt(4, [], shared=True)
    cached = src.pages[5]
    alloc.mark_cached(cached)
    src.release()
    dst.release()
    assert alloc.num_cached_free_pages == 1
    again = WindowPageTable(alloc, chunk_size=8)
    again.adopt(5, [cached], shared=False)  # a prefix-cache hit reclaims it
    assert alloc.num_cached_free_pages == 0 and again.slots(20, 24) == [cached * 4 + i for i in range(4)]
    again.release()
    alloc.check_invariants()


def test_two_pools_random_requests_never_share_a_page_and_return_everything() -> None:
    """Full tables and window tables of the same requests, driven like the scheduler drives
    them (reserve for a forward from num_cached, commit, truncate the tree's tail, release)."""
    rng = random.Random(0)
    page, chunk = 4, 10
    full = PageAllocator(num_pages=64, page_size=page)
    swa = PageAllocator(num_pages=24, page_size=page)
    live: list[tuple[PageTable, WindowPageTable, list[int]]] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.15 and len(live) < 6:
            live.append((PageTable(full), WindowPageTable(swa, chunk), [0]))
        elif op < 0.25 and live:
            ft, wt, _ = live.pop(rng.randrange(len(live)))
            ft.release()
            wt.release()
        elif live:
            ft, wt, cached = live[rng.randrange(len(live))]
            c = cached[0]
            feed = rng.randint(1, 7)
            if not ft.reserve(c + feed):
                continue
            if not wt.reserve(c + feed, c):
                continue
            assert wt.first_position <= c - c % chunk
            wt.slots(c - c % chunk, c + feed)  # every key a query of this forward may see
            accepted = rng.randint(1, feed)
            cached[0] = c + accepted
            ft.truncate(c + accepted)
            wt.truncate(c + accepted)
        for alloc, tables in ((full, [t[0].pages for t in live]), (swa, [t[1].held_pages for t in live])):
            owned = [p for pages in tables for p in pages]
            assert len(owned) == len(set(owned)), "a page is held by two tables"
            assert len(owned) == alloc.num_used_pages
            alloc.check_invariants()
        for _, wt, _ in live:  # only the window: at most its chunk plus the last forward
            assert len(wt.held_pages) <= window_pages_needed(chunk, page, 7)
    for ft, wt, _ in live:
        ft.release()
        wt.release()
    assert full.num_free_pages == 64 and swa.num_free_pages == 24


def test_plan_kv_hybrid_reaches_3x_the_context_and_fp8_doubles_it() -> None:
    # 4 layers, 3 chunked, fp32 K/V of 2 heads x 8: 128 bytes per layer and position
    layer = 2 * 2 * 8 * 4
    budget = 1 << 20
    one = plan_kv(KVLayout(4 * layer, 0, 16), 0.8, budget_bytes=budget)
    assert one.full_tokens == budget // (4 * layer) // 16 * 16 and one.swa_tokens == 0
    window = 16 * window_pages_needed(32, 16, 64)
    hybrid = plan_kv(KVLayout(layer, 3 * layer, 16, window), 0.05, budget_bytes=budget)
    assert hybrid.full_tokens >= 3 * one.full_tokens and hybrid.swa_tokens >= window
    full_b, swa_b = hybrid.bytes(KVLayout(layer, 3 * layer, 16, window))
    assert full_b + swa_b <= budget
    fp8 = plan_kv(KVLayout(layer // 4, 3 * layer // 4, 16, window), 0.05, budget_bytes=budget)
    assert fp8.full_tokens >= 2 * hybrid.full_tokens
    # SGLang's default ratio: the window pool is 0.8 x the full pool
    default = plan_kv(KVLayout(layer, 3 * layer, 16, window), 0.8, budget_bytes=budget)
    assert default.swa_tokens == int(0.8 * default.full_tokens) // 16 * 16


def test_plan_kv_raises_the_window_pool_to_one_window() -> None:
    layout = KVLayout(100, 300, 16, window_tokens=160)
    by_tokens = plan_kv(layout, 0.1, max_total_tokens=320)
    assert by_tokens.full_tokens == 320 and by_tokens.swa_tokens == 160 and by_tokens.raised_swa
    by_budget = plan_kv(layout, 0.01, budget_bytes=100_000)
    assert by_budget.swa_tokens == 160 and by_budget.full_tokens == (100_000 - 160 * 300) // 100 // 16 * 16
    with pytest.raises(ValueError, match="attention window"):
        plan_kv(layout, 0.01, budget_bytes=160 * 300)
    with pytest.raises(ValueError, match="one page"):
        plan_kv(layout, 0.8, max_total_tokens=8)


def test_static_kv_budget_is_sglangs_rule() -> None:
    gib = 1 << 30
    # 24 GiB device, 20 free after the weights, 0.9: keep 2.4 back -> 17.6 for the KV
    assert static_kv_budget(0.9, 24 * gib, 20 * gib) == 20 * gib - int(24 * gib * 0.1)
    with pytest.raises(ValueError, match="leaves no memory"):
        static_kv_budget(0.5, 24 * gib, 10 * gib)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        static_kv_budget(1.0, 24 * gib, 10 * gib)
