"""Prefix cache: whole KV pages found again by the tokens they hold (`--disable-radix-cache`).

Requests that share a prefix (the turns of a chat, a common system prompt, few-shot examples)
reuse its K/V pages, target and EAGLE3 draft alike (both pools are indexed by the same slots).
A page is keyed by a chain hash, as vLLM's prefix caching keys blocks: sha256 over the parent
page's key, the page's `page_size` tokens and the token after them. The next token is in the
key because the draft's K/V at a page's last position pairs that position's target feature with
the next token (EAGLE3's shift), so a page is only valid before the token its draft K/V saw.

What may be cached (`insert`): pages wholly inside a request's committed positions (K/V that
no later step rewrites) and, under speculation, positions the draft has consumed. Pages stay
cached after their requests finish; the allocator keeps them on a free list of their own and
reuses the least recently freed only when no uncached page is free (`PageAllocator.on_evict`
drops them from here). SGLang keeps a radix tree over tokens; a hash chain over whole pages
finds the same page-aligned prefixes with less code, and pages are the unit of sharing anyway.

Pure Python (no torch), like the allocator.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

from .page_allocator import PageAllocator

_ROOT = b""
Cursor = tuple[int, bytes]  # (pages offered so far, the chain key of the last of them)


class PrefixCache:
    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        allocator.on_evict = self._evicted

    @property
    def num_cached_pages(self) -> int:
        return len(self._key_of)

    def _key(self, parent: bytes, ids: Sequence[int], k: int) -> bytes:
        ps = self.page_size
        block = ids[k * ps : (k + 1) * ps + 1]  # the page's tokens and the one after
        return hashlib.sha256(parent + struct.pack(f"<{len(block)}q", *block)).digest()

    def match_chain(self, ids: Sequence[int]) -> list[tuple[bytes, int]]:
        """(key, cached page) of each page of the longest page-aligned prefix of `ids` that is
        cached, leaving at least one token of `ids` to feed."""
        chain: list[tuple[bytes, int]] = []
        key = _ROOT
        while (len(chain) + 1) * self.page_size < len(ids):
            key = self._key(key, ids, len(chain))
            page = self._page_of.get(key)
            if page is None:
                break
            chain.append((key, page))
        return chain

    def match(self, ids: Sequence[int]) -> tuple[list[int], Cursor]:
        """The cached pages of the longest page-aligned prefix of `ids` (leaving at least one
        token of `ids` to feed), and the cursor after them (for `insert`)."""
        chain = self.match_chain(ids)
        return [p for _, p in chain], cursor_after(chain)

    def get(self, key: bytes) -> int | None:
        """The cached page under `key` (a page's chain key), or None."""
        return self._page_of.get(key)

    def put(self, key: bytes, page: int) -> None:
        """Cache an owned `page` under `key` unless either is cached already. (The hybrid KV
        cache's window pool keys its pages by the full pool's chain keys.)"""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key
            self.allocator.mark_cached(page)

    def insert(self, ids: Sequence[int], pages: Sequence[int], valid: int, cursor: Cursor = (0, _ROOT),
               on_page: Callable[[int, bytes], None] | None = None) -> Cursor:
        """Cache the pages of `ids[:valid]` held in `pages` (a request's page table) whose
        K/V is final: whole pages inside the first `valid` positions, with the token after
        each known. Starts at `cursor` (pages before it were offered already) and returns
        where it stopped, so a request's pages are hashed once each; `on_page(k, key)` is told
        each page index offered and its key."""
        k, key = cursor
        while (k + 1) * self.page_size <= valid and (k + 1) * self.page_size < len(ids) and k < len(pages):
            key = self._key(key, ids, k)
            self.put(key, pages[k])
            if on_page is not None:
                on_page(k, key)
            k += 1
        return k, key

    def _evicted(self, page: int) -> None:  # the allocator reuses a cached page
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]


def cursor_after(chain: Sequence[tuple[bytes, int]]) -> Cursor:
    """The insert cursor after the first len(chain) pages of a match."""
    return (len(chain), chain[-1][0] if chain else _ROOT)
