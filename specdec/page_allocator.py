"""Paged KV-cache bookkeeping: which cache slots belong to which request.

Concepts
--------
* A **slot** is one token position in a KV-cache tensor pool: the pool has shape
  ``[num_pages * page_size, ...]`` along its token axis, and slot ``s`` holds the
  key/value vectors of exactly one token of one request.
* A **page** is a run of ``page_size`` consecutive slots; page ``p`` owns slots
  ``[p * page_size, (p + 1) * page_size)``. Pages are the unit of allocation.
* The **PageAllocator** hands out pages from a free list and reference-counts
  them, so a page can be shared (e.g. a common prompt prefix) and only returns
  to the free list when its last owner frees it.
* Pages whose K/V a prefix cache keeps (``specdec/prefix_cache.py``) are **cached**: when
  their last holder frees them they go to a second free list, least recently freed first,
  with their contents intact; a cache hit takes one back (:meth:`PageAllocator.reclaim`), and
  only when no uncached page is free does :meth:`allocate` hand one out, telling the cache
  (``on_evict``) that its contents are gone. Cached free pages count as free.
* A **PageTable** maps one request's logical token positions ``0, 1, 2, ...`` to
  slots: position ``i`` lives in slot
  ``pages[i // page_size] * page_size + i % page_size``.

The target model and the draft model keep separate tensor pools but index them
with the same slots, so a single allocator and a single page table per request
serve both.

This module is pure Python on purpose (it must not import torch): the scheduler
uses it for admission decisions without touching tensors.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable

__all__ = [
    "PageAllocator",
    "PageTable",
    "available_memory_bytes",
    "total_memory_bytes",
]


class PageAllocator:
    """Reference-counted allocator of fixed-size KV-cache pages.

    The free list is a LIFO stack: the most recently freed pages are handed out
    first, so the set of pool memory actually touched stays small. Running out of
    pages is not an error: :meth:`allocate` returns ``None`` (and allocates
    nothing), which is the signal the scheduler acts on (wait, preempt, ...).
    """

    __slots__ = ("_cached", "_cached_free", "_free", "_refcount", "num_pages", "on_evict", "page_size")

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Stack top is the end of the list; reversed so page 0 is handed out first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refcount: list[int] = [0] * num_pages
        self._cached: set[int] = set()  # pages whose contents a prefix cache keeps
        self._cached_free: dict[int, None] = {}  # free cached pages, least recently freed first
        self.on_evict: Callable[[int], None] | None = None  # told when a cached page is reused

    @property
    def num_free_pages(self) -> int:
        """Pages no request holds (cached ones included: they are handed out when needed)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_pages(self) -> int:
        """Free pages whose contents a prefix cache still keeps."""
        return len(self._cached_free)

    @property
    def num_used_pages(self) -> int:
        """Pages currently owned by at least one holder."""
        return self.num_pages - self.num_free_pages

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed right now."""
        return 0 <= n <= self.num_free_pages

    def mark_cached(self, page: int) -> None:
        """A prefix cache keeps `page`'s contents (it must be owned)."""
        self._check_range(page)
        if self._refcount[page] == 0:
            raise ValueError(f"cannot cache page {page}: it is free")
        self._cached.add(page)

    def reclaim(self, pages: Iterable[int]) -> None:
        """Add one holder to each cached page, taking it off the cached free list if no one
        held it (a prefix-cache hit)."""
        pages = list(pages)
        for page in pages:
            self._check_range(page)
            if page not in self._cached:
                raise ValueError(f"cannot reclaim page {page}: it is not cached")
        for page in pages:
            if self._refcount[page] == 0:
                del self._cached_free[page]
            self._refcount[page] += 1

    def refcount(self, page: int) -> int:
        """Number of holders of ``page`` (0 when it is free)."""
        self._check_range(page)
        return self._refcount[page]

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` pages off the free list, each with reference count 1.

        Returns ``None`` without allocating anything when fewer than ``n`` pages
        are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self.num_free_pages:
            return None
        pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:  # uncached pages ran out: reuse the least recently freed cached one
            page = next(iter(self._cached_free))
            del self._cached_free[page]
            self._cached.discard(page)
            if self.on_evict is not None:
                self.on_evict(page)
            pages.append(page)
        for page in pages:
            self._refcount[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one holder to each page (each must already be owned)."""
        pages = list(pages)
        for page in pages:
            self._check_range(page)
            if self._refcount[page] == 0:
                raise ValueError(f"cannot incref page {page}: it is free (not owned)")
        for page in pages:
            self._refcount[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one holder from each page; a page whose count reaches 0 is freed.

        The call is atomic: if any page is not owned (or is listed more times than
        it has holders) a ``ValueError`` naming it is raised and nothing changes.
        """
        pages = list(pages)
        for page, times in Counter(pages).items():
            self._check_range(page)
            if self._refcount[page] < times:
                if self._refcount[page] == 0:
                    raise ValueError(f"cannot free page {page}: it is not owned (double free?)")
                raise ValueError(
                    f"cannot free page {page} {times} times: it has only "
                    f"{self._refcount[page]} holder(s)"
                )
        # Push in reverse so a later allocate() pops them back in the given order.
        for page in reversed(pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._cached:
                    self._cached_free[page] = None
                else:
                    self._free.append(page)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent.

        Checked: free-list entries are valid and unique, no page is both free and
        owned, every page with no holders is on the free list, and the free and
        used counts add up to ``num_pages``.
        """
        seen: set[int] = set()
        for page in [*self._free, *self._cached_free]:
            if not 0 <= page < self.num_pages:
                raise AssertionError(f"free list holds out-of-range page {page}")
            if page in seen:
                raise AssertionError(f"page {page} appears twice in the free list")
            seen.add(page)
            if self._refcount[page] != 0:
                raise AssertionError(
                    f"page {page} is both free and owned (refcount {self._refcount[page]})"
                )
        owned = 0
        for page, count in enumerate(self._refcount):
            if count < 0:
                raise AssertionError(f"page {page} has negative refcount {count}")
            if count == 0 and page not in seen:
                raise AssertionError(f"page {page} has no holders but is not on the free list")
            if count > 0:
                owned += 1
        if owned + self.num_free_pages != self.num_pages:
            raise AssertionError(
                f"{owned} owned + {self.num_free_pages} free pages != {self.num_pages} total"
            )
        if any(p not in self._cached for p in self._cached_free) or any(p in self._cached for p in self._free):
            raise AssertionError("a page's cached state disagrees with its free list")

    def _check_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is out of range [0, {self.num_pages})")


class PageTable:
    """One request's map from token positions to KV-cache slots.

    ``num_tokens`` positions ``[0, num_tokens)`` have slots reserved; ``pages``
    holds the request's pages in logical order, and ``capacity`` counts the slots
    they provide (the last page may be partially used).
    """

    __slots__ = ("_num_tokens", "allocator", "pages")

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.pages: list[int] = []
        self._num_tokens = 0

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    @property
    def capacity(self) -> int:
        """Slots provided by the pages held (>= ``num_tokens``)."""
        return len(self.pages) * self.allocator.page_size

    @property
    def num_tokens(self) -> int:
        """Number of leading positions whose slots are reserved."""
        return self._num_tokens

    def pages_needed(self, num_tokens: int) -> int:
        """Additional pages ``reserve(num_tokens)`` would allocate."""
        needed = -(-num_tokens // self.allocator.page_size)
        return max(0, needed - len(self.pages))

    def reserve(self, num_tokens: int) -> bool:
        """Ensure slots exist for positions ``[0, num_tokens)``.

        Allocates pages as needed. Returns ``False`` and changes nothing when the
        allocator does not have enough free pages. Never shrinks the table.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if num_tokens <= self._num_tokens:
            return True
        new_pages = self.allocator.allocate(self.pages_needed(num_tokens))
        if new_pages is None:
            return False
        self.pages.extend(new_pages)
        self._num_tokens = num_tokens
        return True

    def adopt_cached(self, pages: list[int]) -> None:
        """Start this (empty) table on cached pages (a prefix-cache hit): one holder more each."""
        if self.pages or self._num_tokens:
            raise ValueError("adopt_cached needs an empty page table")
        self.allocator.reclaim(pages)
        self.pages = list(pages)
        self._num_tokens = len(pages) * self.page_size

    def share_prefix(self, source: PageTable, num_pages: int) -> None:
        """Start this (empty) table with the first `num_pages` pages of `source`, shared (their
        reference counts go up; each owner frees its reference). Only whole pages that no owner
        writes again may be shared: the caller shares a prompt's full pages, never the page a
        request goes on writing."""
        if self.pages or self._num_tokens:
            raise ValueError("share_prefix needs an empty page table")
        if not 0 <= num_pages <= len(source.pages) or num_pages * self.page_size > source.num_tokens:
            raise ValueError(f"cannot share {num_pages} pages of a table holding {len(source.pages)}")
        pages = source.pages[:num_pages]
        self.allocator.incref(pages)
        self.pages = list(pages)
        self._num_tokens = num_pages * self.page_size

    def truncate(self, num_tokens: int) -> None:
        """Shrink to positions ``[0, num_tokens)``, freeing pages no longer needed."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(
                f"cannot truncate to {num_tokens} tokens: table holds {self._num_tokens}"
            )
        keep = -(-num_tokens // self.allocator.page_size)
        if keep < len(self.pages):
            dropped = self.pages[keep:]
            self.allocator.free(dropped)
            del self.pages[keep:]
        self._num_tokens = num_tokens

    def slot(self, i: int) -> int:
        """Cache slot of token position ``i``."""
        if not 0 <= i < self._num_tokens:
            raise IndexError(f"position {i} is outside the reserved range [0, {self._num_tokens})")
        page_size = self.allocator.page_size
        return self.pages[i // page_size] * page_size + i % page_size

    def slots(self, start: int, end: int) -> list[int]:
        """Cache slots of positions ``[start, end)``, in order."""
        if not 0 <= start <= end <= self._num_tokens:
            raise IndexError(
                f"range [{start}, {end}) is outside the reserved range [0, {self._num_tokens})"
            )
        page_size = self.allocator.page_size
        pages = self.pages
        return [pages[i // page_size] * page_size + i % page_size for i in range(start, end)]

    def release(self) -> None:
        """Free every page and empty the table (safe to call repeatedly)."""
        if self.pages:
            pages = self.pages
            self.pages = []
            self.allocator.free(pages)
        self._num_tokens = 0


def total_memory_bytes() -> int:
    """Physical memory in bytes (`MemTotal`; the `--mem-fraction-static` base on the CPU)."""
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def available_memory_bytes() -> int:
    """Memory available to new allocations, in bytes.

    Reads ``MemAvailable`` from ``/proc/meminfo``; where that is unavailable falls
    back to the total physical memory reported by ``os.sysconf``.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    # "MemAvailable:   23500576 kB"
                    multiplier = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                    return int(fields[1]) * multiplier
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
