from __future__ import annotations

import random
import subprocess
import sys

import pytest

from specdec.page_allocator import (
    PageAllocator,
    PageTable,
    available_memory_bytes,
)


def test_allocate_free_reuse_lifo() -> None:
    alloc = PageAllocator(num_pages=8, page_size=4)
    assert alloc.num_free_pages == 8
    assert alloc.num_used_pages == 0
    a = alloc.allocate(3)
    assert a == [0, 1, 2]
    b = alloc.allocate(2)
    assert b == [3, 4]
    assert alloc.num_free_pages == 3
    assert alloc.num_used_pages == 5
    alloc.check_invariants()

    alloc.free(a)
    assert alloc.num_free_pages == 6
    # Recently freed pages come back first, in the order they were freed.
    assert alloc.allocate(3) == [0, 1, 2]
    alloc.check_invariants()


def test_allocate_zero_and_negative() -> None:
    alloc = PageAllocator(num_pages=2, page_size=1)
    assert alloc.allocate(0) == []
    assert alloc.can_allocate(0)
    assert not alloc.can_allocate(-1)
    with pytest.raises(ValueError):
        alloc.allocate(-1)


def test_out_of_pages_returns_none_without_partial_allocation() -> None:
    alloc = PageAllocator(num_pages=4, page_size=16)
    first = alloc.allocate(3)
    assert first is not None
    assert not alloc.can_allocate(2)
    assert alloc.allocate(2) is None
    assert alloc.num_free_pages == 1
    assert alloc.num_used_pages == 3
    alloc.check_invariants()
    assert alloc.allocate(1) == [3]
    assert alloc.allocate(1) is None


def test_double_free_raises_and_names_page() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    pages = alloc.allocate(2)
    assert pages is not None
    alloc.free(pages)
    with pytest.raises(ValueError, match="page 0"):
        alloc.free([0])
    # Freeing the same page twice in one call is also a double free, and atomic.
    (p,) = alloc.allocate(1) or []
    with pytest.raises(ValueError, match=f"page {p}"):
        alloc.free([p, p])
    assert alloc.refcount(p) == 1
    with pytest.raises(ValueError, match="out of range"):
        alloc.free([99])
    alloc.check_invariants()


def test_incref_keeps_page_until_last_holder_frees() -> None:
    alloc = PageAllocator(num_pages=2, page_size=4)
    pages = alloc.allocate(1)
    assert pages == [0]
    alloc.incref(pages)
    assert alloc.refcount(0) == 2
    alloc.free(pages)
    assert alloc.num_free_pages == 1
    alloc.free(pages)
    assert alloc.num_free_pages == 2
    with pytest.raises(ValueError, match="page 1"):
        alloc.incref([1])
    alloc.check_invariants()


def test_check_invariants_detects_corruption() -> None:
    alloc = PageAllocator(num_pages=4, page_size=1)
    alloc.allocate(2)
    alloc._free.append(0)  # page 0 is owned and now also free
    with pytest.raises(AssertionError, match="page 0"):
        alloc.check_invariants()

    alloc = PageAllocator(num_pages=4, page_size=1)
    alloc._free.append(alloc._free[0])
    with pytest.raises(AssertionError, match="twice"):
        alloc.check_invariants()

    alloc = PageAllocator(num_pages=4, page_size=1)
    alloc._free.pop()  # a page with no holders vanished from the free list
    with pytest.raises(AssertionError):
        alloc.check_invariants()


@pytest.mark.parametrize("page_size", [1, 16, 5])
def test_page_table_reserve_truncate_slots(page_size: int) -> None:
    alloc = PageAllocator(num_pages=10, page_size=page_size)
    table = PageTable(alloc)
    assert table.capacity == 0 and table.num_tokens == 0

    n = 2 * page_size + 1  # spills one token into a third page
    assert table.reserve(n)
    assert table.num_tokens == n
    assert len(table.pages) == 3
    assert table.capacity == 3 * page_size
    expected = [table.pages[i // page_size] * page_size + i % page_size for i in range(n)]
    assert table.slots(0, n) == expected
    assert [table.slot(i) for i in range(n)] == expected
    assert table.slots(1, 1) == []
    assert len(set(expected)) == n

    with pytest.raises(IndexError):
        table.slot(n)
    with pytest.raises(IndexError):
        table.slot(-1)
    with pytest.raises(IndexError):
        table.slots(0, n + 1)

    # Reserving less than held changes nothing; growing within the page too.
    assert table.reserve(1)
    assert table.num_tokens == n and len(table.pages) == 3

    table.truncate(page_size)
    assert table.num_tokens == page_size
    assert len(table.pages) == 1
    assert alloc.num_used_pages == 1
    assert table.slots(0, page_size) == expected[:page_size]
    with pytest.raises(ValueError):
        table.truncate(page_size + 1)

    table.truncate(0)
    assert table.pages == [] and alloc.num_used_pages == 0
    alloc.check_invariants()


def test_page_table_reserve_fails_cleanly_when_out_of_pages() -> None:
    alloc = PageAllocator(num_pages=3, page_size=5)
    a, b = PageTable(alloc), PageTable(alloc)
    assert a.reserve(7)  # 2 pages
    assert not b.reserve(11)  # needs 3, only 1 free
    assert b.pages == [] and b.num_tokens == 0
    assert b.reserve(5)
    assert not a.reserve(11)  # needs one more page, none free
    assert a.num_tokens == 7 and len(a.pages) == 2
    assert a.reserve(10)  # still fits in its two pages
    alloc.check_invariants()


def test_page_table_release_is_idempotent() -> None:
    alloc = PageAllocator(num_pages=4, page_size=2)
    table = PageTable(alloc)
    assert table.reserve(7)
    table.release()
    table.release()
    assert table.pages == [] and table.num_tokens == 0 and table.capacity == 0
    assert alloc.num_free_pages == 4
    alloc.check_invariants()


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_random_stress(page_size: int) -> None:
    rng = random.Random(1234 + page_size)
    alloc = PageAllocator(num_pages=40, page_size=page_size)
    tables = [PageTable(alloc) for _ in range(6)]
    max_tokens = 12 * page_size

    for _ in range(1500):
        table = rng.choice(tables)
        op = rng.random()
        if op < 0.55:
            target = rng.randrange(max_tokens + 1)
            before_pages, before_tokens = list(table.pages), table.num_tokens
            free_before = alloc.num_free_pages
            ok = table.reserve(target)
            needed = max(0, -(-target // page_size) - len(before_pages))
            assert ok == (needed <= free_before)
            if ok:
                assert table.num_tokens == max(before_tokens, target)
                assert table.pages[: len(before_pages)] == before_pages
            else:
                assert table.pages == before_pages and table.num_tokens == before_tokens
        elif op < 0.9:
            table.truncate(rng.randrange(table.num_tokens + 1))
        else:
            table.release()

        alloc.check_invariants()
        owned = [p for t in tables for p in t.pages]
        assert len(owned) == len(set(owned)), "a page is owned by two tables"
        assert len(owned) == alloc.num_used_pages
        for t in tables:
            assert t.capacity >= t.num_tokens > t.capacity - page_size or t.num_tokens == 0
            if t.num_tokens:
                slots = t.slots(0, t.num_tokens)
                assert len(set(slots)) == len(slots)

    for t in tables:
        t.release()
    alloc.check_invariants()
    assert alloc.num_free_pages == alloc.num_pages


def test_available_memory_bytes() -> None:
    assert available_memory_bytes() > 0


def test_import_does_not_pull_in_torch() -> None:
    code = (
        "import sys\n"
        "import specdec.page_allocator, specdec.swa_table, specdec.kv_budget, specdec.prefix_cache\n"
        "assert 'torch' not in sys.modules, 'the KV bookkeeping imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_share_prefix_counts_each_owner_and_frees_with_the_last() -> None:
    alloc = PageAllocator(num_pages=8, page_size=4)
    src = PageTable(alloc)
    assert src.reserve(10)  # 3 pages
    dst = PageTable(alloc)
    dst.share_prefix(src, 2)
    assert dst.pages == src.pages[:2] and dst.num_tokens == 8 and alloc.num_used_pages == 3
    assert [alloc.refcount(p) for p in src.pages] == [2, 2, 1]
    assert dst.reserve(13) and dst.slots(0, 8) == src.slots(0, 8) and dst.pages[2] not in src.pages
    with pytest.raises(ValueError, match="empty"):
        dst.share_prefix(src, 1)
    with pytest.raises(ValueError, match="cannot share"):
        PageTable(alloc).share_prefix(src, 4)
    src.release()
    assert alloc.num_used_pages == 4  # dst's two shared pages and its own two
    dst.release()
    assert alloc.num_free_pages == 8
    alloc.check_invariants()
