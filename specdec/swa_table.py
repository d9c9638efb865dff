"""Page tables of the hybrid KV cache's chunked-attention pool (`--swa-full-tokens-ratio`).

Llama 4's RoPE layers (3 of every 4) attend only within their query's chunk of
`attention_chunk_size` positions: a query at position p sees keys in
[window_start(p), p], window_start(p) = p - p % chunk. With the hybrid KV cache (SGLang's
"SWA" memory) those layers get a pool of their own, and a request's table there holds only the
pages of its current window; the full layers (the NoPE ones, and the EAGLE3 draft's layer)
keep every position in the full pool's `PageTable`.

The allocator contract is the same for both pools (one `PageAllocator` class, two instances):
pages are reference-counted, handed out by `allocate`, returned by `free`, and may be kept by a
prefix cache (`mark_cached` / `reclaim` / `on_evict`). A `WindowPageTable` differs from a
`PageTable` in one rule: pages wholly before the window of its request's next query are
released (`advance`), so `pages[k]` is `RELEASED` for those, and slots exist only for
positions from `first_position` on. Every reservation is made for a forward that will feed
positions [pos, end): `reserve(end, pos)` first releases what no query at pos or later can see,
then allocates the pages of [window_start(pos), end) it lacks. A forward whose positions cross a
chunk boundary (a prefill chunk, a verified tree) still needs the keys of the older chunk for
its earlier queries: the window starts at the chunk of its *first* query, and the chunk mask
hides the older keys from the later queries.

Pure Python (no torch), like the allocator.
"""

from __future__ import annotations

from .page_allocator import PageAllocator

__all__ = ["RELEASED", "WindowPageTable", "window_pages_needed"]

RELEASED = -1  # pages[k] of a page before the window (or never held)


def window_pages_needed(chunk_size: int, page_size: int, max_feed: int) -> int:
    """Pages one request's window can need at once: the keys of its current chunk before the
    forward (up to chunk_size - 1, starting anywhere in a page) plus the `max_feed` positions one
    forward writes (a prefill chunk, or a tree and the draft's scratch)."""
    return -(-(chunk_size - 1 + max_feed) // page_size) + 1


class WindowPageTable:
    """One request's map from positions to slots of the chunked-attention pool, holding only the
    pages from its current window on (see the module docstring)."""

    __slots__ = ("_first", "_num_tokens", "allocator", "chunk_size", "pages")

    def __init__(self, allocator: PageAllocator, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.allocator = allocator
        self.chunk_size = chunk_size
        self.pages: list[int] = []  # page index -> page, RELEASED before `_first`
        self._first = 0  # index of the first page that may be held
        self._num_tokens = 0

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    @property
    def num_tokens(self) -> int:
        """Positions [0, num_tokens) are reserved; slots exist from `first_position` on."""
        return self._num_tokens

    @property
    def first_position(self) -> int:
        """The first position whose slot this table still holds (a page boundary)."""
        return self._first * self.page_size

    @property
    def held_pages(self) -> list[int]:
        return [p for p in self.pages[self._first:] if p != RELEASED]

    def window_start(self, pos: int) -> int:
        """The first position a query at `pos` sees: the start of its chunk."""
        return pos - pos % self.chunk_size

    def page_at(self, k: int) -> int:
        """The page holding page index `k`, or RELEASED."""
        return self.pages[k] if k < len(self.pages) else RELEASED

    def _first_needed(self, pos: int) -> int:
        return self.window_start(pos) // self.page_size

    def pages_needed(self, num_tokens: int, pos: int) -> int:
        """Pages `reserve(num_tokens, pos)` would allocate (after releasing what it releases)."""
        first = max(self._first, self._first_needed(pos))
        end = -(-num_tokens // self.page_size)
        return sum(1 for k in range(first, end) if self.page_at(k) == RELEASED)

    def advance(self, pos: int) -> None:
        """The next query is at `pos` or later: release the pages before its window."""
        first = self._first_needed(pos)
        if first <= self._first:
            return
        dropped = [p for p in self.pages[self._first : first] if p != RELEASED]
        if len(self.pages) < first:
            self.pages.extend([RELEASED] * (first - len(self.pages)))
        for k in range(self._first, first):
            self.pages[k] = RELEASED
        self._first = first
        if dropped:
            self.allocator.free(dropped)

    def reserve(self, num_tokens: int, pos: int) -> bool:
        """Slots for positions [window_start(pos), num_tokens), for a forward whose first query
        is at `pos` (pages before that window are released first). Returns False and allocates
        nothing when the pool lacks pages (the release stands: those pages are dead anyway)."""
        if num_tokens < 0 or pos < 0:
            raise ValueError(f"reserve({num_tokens}, {pos}): negative position")
        self.advance(pos)
        end = -(-num_tokens // self.page_size)
        missing = [k for k in range(self._first, end) if self.page_at(k) == RELEASED]
        new = self.allocator.allocate(len(missing))
        if new is None:
            return False
        if len(self.pages) < end:
            self.pages.extend([RELEASED] * (end - len(self.pages)))
        for k, page in zip(missing, new, strict=True):
            self.pages[k] = page
        self._num_tokens = max(self._num_tokens, num_tokens)
        return True

    def adopt(self, first_page: int, pages: list[int], shared: bool) -> None:
        """Start this (empty) table on page indices [first_page, first_page + len(pages)): cached
        pages (`shared=False`: a prefix-cache hit, reclaimed) or another live table's
        (`shared=True`: a sibling's prompt, incref'd)."""
        if self.pages or self._num_tokens:
            raise ValueError("adopt needs an empty window table")
        (self.allocator.incref if shared else self.allocator.reclaim)(pages)
        self.pages = [RELEASED] * first_page + list(pages)
        self._first = first_page
        self._num_tokens = len(self.pages) * self.page_size

    def truncate(self, num_tokens: int) -> None:
        """Shrink to positions [0, num_tokens), freeing held pages beyond."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: table holds {self._num_tokens}")
        keep = -(-num_tokens // self.page_size)
        if keep < len(self.pages):
            dropped = [p for p in self.pages[max(keep, self._first):] if p != RELEASED]
            del self.pages[keep:]
            if dropped:
                self.allocator.free(dropped)
        self._num_tokens = num_tokens

    def slots(self, start: int, end: int) -> list[int]:
        """Slots of positions [start, end), all held."""
        if not self.first_position <= start <= end <= self._num_tokens:
            raise IndexError(f"range [{start}, {end}) is outside the held range "
                             f"[{self.first_position}, {self._num_tokens})")
        ps = self.page_size
        pages = self.pages
        out = [pages[i // ps] * ps + i % ps for i in range(start, end)]
        if any(pages[k] == RELEASED for k in range(start // ps, -(-end // ps))):
            raise IndexError(f"range [{start}, {end}) touches a released page")
        return out

    def release(self) -> None:
        """Free every held page and empty the table (safe to call repeatedly)."""
        held = self.held_pages
        self.pages = []
        self._first = 0
        self._num_tokens = 0
        if held:
            self.allocator.free(held)
