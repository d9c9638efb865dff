"""The held-out split of the chat prompts: which prompts training may never see.

A prompt is held out when a hash of its text falls in one bucket of `HELDOUT_BUCKETS` (about 2 %
of every source and category, stable across runs, machines and file orders). The benchmark
prompts shipped in bench/data/chat_heldout.jsonl are drawn from the held-out prompts only, and
the trainer drops every held-out prompt, so accept lengths measured on them are on unseen text.
"""

from __future__ import annotations

import hashlib

HELDOUT_BUCKETS = 50


def prompt_key(prompt: str) -> int:
    """A stable 32-bit hash of the prompt's text (whitespace at the ends ignored)."""
    return int(hashlib.sha1(prompt.strip().encode("utf-8")).hexdigest()[:8], 16)


def is_heldout(prompt: str) -> bool:
    return prompt_key(prompt) % HELDOUT_BUCKETS == 0
