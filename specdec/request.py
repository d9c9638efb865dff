"""One request's state, with named lengths.

    prompt_len   tokens of the prompt
    output_len   tokens generated so far (the EOS / stop token included, as SGLang counts)
    seq_len      prompt_len + output_len: the token sequence `all_ids`
    num_cached   leading tokens of `all_ids` whose K/V sit in the pool ("committed")

Invariant: num_cached <= seq_len, and the page table reserves at least num_cached slots.
The next forward for a request feeds `all_ids[num_cached:]` (the whole prompt at prefill,
one token at a plain decode step, prompt + output again after a preemption).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .detokenizer import IncrementalDetokenizer
from .multimodal import MultimodalInputs
from .page_allocator import PageTable
from .sampling_params import SamplingParams
from .spec_state import SpecState
from .swa_table import WindowPageTable

# (logprob, token_id, text); logprob is None for the first prompt position.
LogprobEntry = tuple[float | None, int, str | None]


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    page_table: PageTable
    generator: torch.Generator | None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    finish_reason: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    input_logprobs_done: bool = False
    input_token_logprobs: list[LogprobEntry] = field(default_factory=list)
    output_token_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_top_logprobs: list[list[LogprobEntry] | None] = field(default_factory=list)
    output_top_logprobs: list[list[LogprobEntry]] = field(default_factory=list)
    num_preemptions: int = 0
    # speculative decoding: the model worker's state between steps (specdec/spec_state.py) and
    # SGLang's figures, counted by the scheduler from each step's result
    spec: SpecState = field(default_factory=SpecState)
    spec_verify_ct: int = 0
    spec_num_correct_drafts: int = 0  # accepted draft tokens
    spec_num_proposed_drafts: int = 0  # sum over verify steps of the tree's depth
    spec_emitted_tokens: int = 0  # tokens emitted by verify steps (accepted + 1 each)
    spec_shape_counts: dict[str, int] = field(default_factory=dict)  # steps per tree shape label
    # structured outputs: the grammar state over output_ids (specdec.grammar.RequestGrammar)
    grammar: Any = None
    # parallel sampling (n > 1, best_of): the sibling whose prompt KV this request shares, and
    # how many prompt tokens it took from there instead of computing them (SGLang's cached_tokens)
    prefix_source: Req | None = None
    cached_tokens: int = 0
    draft_kv_len: int = 0  # leading positions whose draft K/V is written from target features
    cache_cursor: tuple[int, bytes] = (0, b"")  # pages offered to the prefix cache so far
    # the output's text, decoded a token at a time (specdec.detokenizer; None without a tokenizer)
    detok: IncrementalDetokenizer | None = None
    # hybrid KV (--swa-full-tokens-ratio): the chunked-attention pool's table, holding only the
    # pages of the current chunk window (specdec/swa_table.py); None with a single pool
    swa_table: WindowPageTable | None = None
    # --enable-multimodal: the prompt's images and where their embeddings go (specdec/multimodal.py)
    mm: MultimodalInputs | None = None
    _slot_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    _swa_cache: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    _swa_base: int = 0  # position of _swa_cache[0]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if not 0 <= self.num_cached <= self.seq_len:
            raise ValueError(f"num_cached={self.num_cached} outside [0, {self.seq_len}]")

    # ---- named lengths ----------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_len(self) -> int:
        return len(self.output_ids)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_key_ids(self) -> list[int]:
        """prompt_ids as the prefix cache keys them: an image's patch positions carry its digest."""
        return self.prompt_ids if self.mm is None else self.mm.key_ids

    @property
    def cache_ids(self) -> list[int]:
        """all_ids as the prefix cache keys them (see prompt_key_ids)."""
        return self.all_ids if self.mm is None else self.mm.key_ids + self.output_ids

    def uncached_ids(self) -> list[int]:
        """Tokens the next forward must feed: all_ids[num_cached:]."""
        if self.num_cached >= self.prompt_len:
            return self.output_ids[self.num_cached - self.prompt_len:]
        return self.prompt_ids[self.num_cached:] + self.output_ids

    # ---- KV slots ------------------------------------------------------------------------------
    def kv_slots(self, length: int) -> torch.Tensor:
        """Pool slots of positions [0, length) as an int64 tensor, cached across steps."""
        cached = int(self._slot_cache.shape[0])
        if cached < length:
            more = torch.tensor(self.page_table.slots(cached, length), dtype=torch.long)
            self._slot_cache = torch.cat((self._slot_cache, more))
        return self._slot_cache[:length]

    def swa_slots(self, start: int, end: int) -> torch.Tensor:
        """Chunked-attention pool slots of positions [start, end) (hybrid KV; `start` is at or
        after the window's first held position), cached across steps like `kv_slots`."""
        assert self.swa_table is not None
        cache, base = self._swa_cache, self._swa_base
        if not base <= start <= base + int(cache.shape[0]):
            cache, base = cache[:0], start
        elif start > base:
            cache, base = cache[start - base:], start
        have = base + int(cache.shape[0])
        if have < end:
            cache = torch.cat((cache, torch.tensor(self.swa_table.slots(have, end), dtype=torch.long)))
        self._swa_cache, self._swa_base = cache, base
        return cache[: end - base]

    def reserve_kv(self, end: int, swa_end: int | None = None) -> bool:
        """Slots for positions [0, end) in the full pool and, with hybrid KV, in the window
        of a forward whose first query is at num_cached, up to `swa_end` (default `end`).
        False when a pool lacks pages (what was reserved stays; release_kv frees it)."""
        if not self.page_table.reserve(end):
            return False
        if self.swa_table is not None:
            return self.swa_table.reserve(end if swa_end is None else swa_end, self.num_cached)
        return True

    def truncate_kv(self, length: int) -> None:
        """Keep KV for positions [0, length); free the pages beyond."""
        self.page_table.truncate(length)
        self._slot_cache = self._slot_cache[:length]
        if self.swa_table is not None:
            self.swa_table.truncate(min(length, self.swa_table.num_tokens))
            self._swa_cache = self._swa_cache[: max(0, length - self._swa_base)]
        self.num_cached = min(self.num_cached, length)

    def spec_meta(self) -> dict[str, Any]:
        """SGLang's per-request speculative figures (accept length = emitted / verify steps)."""
        ct = self.spec_verify_ct
        return {
            "spec_verify_ct": ct,
            "spec_accept_length": self.spec_emitted_tokens / ct if ct else 0.0,
            "spec_accept_rate": (
                self.spec_num_correct_drafts / self.spec_num_proposed_drafts
                if self.spec_num_proposed_drafts
                else 0.0
            ),
            "spec_num_correct_drafts": self.spec_num_correct_drafts,
            "spec_num_proposed_drafts": self.spec_num_proposed_drafts,
            "spec_tree_shapes": dict(self.spec_shape_counts),  # steps per shape ("none": plain)
        }

    def release_kv(self) -> None:
        self.spec.reset()
        self.page_table.release()
        self._slot_cache = self._slot_cache[:0]
        if self.swa_table is not None:
            self.swa_table.release()
            self._swa_cache, self._swa_base = self._swa_cache[:0], 0
        self.num_cached = 0
        self.draft_kv_len = 0
        self.cache_cursor = (0, b"")
