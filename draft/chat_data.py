"""Diverse chat data for self-distillation: balanced prompts and multi-turn conversations.

* `chat_pool` reads `chat_prompts.jsonl` (every source and category of ../shared/data) and drops
  every held-out prompt (`draft.data_split.is_heldout`, ~2 % of each source), so nothing the
  benchmarks measure on is ever trained on.
* `balanced_order` interleaves the pool round-robin over categories (and over sources inside a
  category), so any prefix of the result is balanced: a run that answers only the first N
  prompts still sees every category equally (small categories run out first, then the rest
  share their turns).
* Conversations: turn 1 answers the prompt; for a multi-turn conversation the target then writes
  a follow-up user turn to its own answer (sampled after the chat template's user header) and
  answers that too. `Conversation` keeps the token ids and the assistant spans (the loss mask).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_split import is_heldout

CHAT_FILE = "chat_prompts.jsonl"
MAX_PROMPT_CHARS = 3000  # longer prompts (a few long documents) are skipped: prefill cost


def chat_pool(data_dir: Path, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """Training-eligible chat prompts: {source, category, prompt}, held-out ones removed."""
    from .train_data import read_jsonl

    path = data_dir / CHAT_FILE
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path} (the recipe reads the project's "
                                "../shared/data; pass --data-dir)")
    exclude = exclude or set()
    out = []
    for r in read_jsonl(path):
        text = r["prompt"].strip()
        if not text or len(text) > MAX_PROMPT_CHARS or is_heldout(text) or text in exclude:
            continue
        out.append({"source": f"chat:{r['source']}", "category": r["category"], "prompt": text})
    return out


def balanced_order(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """All `rows`, ordered round-robin over categories, and within a category round-robin over
    sources (each source shuffled by `seed`); deterministic."""
    rng = random.Random(seed)
    by_cat: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_cat[r["category"]][r["source"]].append(r)
    streams: list[list[dict[str, Any]]] = []
    for cat in sorted(by_cat):
        sources = by_cat[cat]
        for src in sorted(sources):
            rng.shuffle(sources[src])
        # one category's stream: its sources interleaved
        queues = [list(sources[s]) for s in sorted(sources)]
        stream: list[dict[str, Any]] = []
        while any(queues):
            for q in queues:
                if q:
                    stream.append(q.pop())
        streams.append(stream)
    out: list[dict[str, Any]] = []
    depth = 0
    while len(out) < len(rows):
        for stream in streams:
            if depth < len(stream):
                out.append(stream[depth])
        depth += 1
    return out


# ---- conversations through the chat template -----------------------------------------------------
_A = "\x00ASSISTANT\x00"
_U = "\x00USER\x00"


@dataclass(frozen=True)
class TurnTemplate:
    """The chat template's text around an assistant turn and the next user turn, found by
    rendering markers: `first_prompt(u)` + answer + `between` + follow-up + `after`."""

    template: Any

    def first_prompt(self, user: str) -> str:
        text: str = self.template.render([{"role": "user", "content": user}])
        return text

    def _parts(self, user: str) -> tuple[str, str, str]:
        full: str = self.template.render(
            [{"role": "user", "content": user}, {"role": "assistant", "content": _A},
             {"role": "user", "content": _U}]
        )
        before, rest = full.split(_A)
        between, after = rest.split(_U)
        return before, between, after

    def between(self, user: str, eos_text: str) -> str:
        """Text after the assistant's answer up to the open follow-up user turn; the answer's own
        EOS (the end-of-turn token the target emitted) is not repeated."""
        _, between, _ = self._parts(user)
        return between[len(eos_text):] if eos_text and between.startswith(eos_text) else between

    def after(self, user: str) -> str:
        """Text after the follow-up user turn up to the open assistant turn."""
        return self._parts(user)[2]


@dataclass(frozen=True)
class Conversation:
    """input_ids: the whole conversation as the target saw it; spans: [start, end) of every
    assistant turn in it (the tokens the draft learns to predict)."""

    input_ids: list[int]
    spans: list[tuple[int, int]]
    user_turns: list[str]


def one_turn(prompt_ids: list[int], answer_ids: list[int], user: str) -> Conversation:
    return Conversation(prompt_ids + answer_ids, [(len(prompt_ids), len(prompt_ids) + len(answer_ids))], [user])


def followup_prefix(engine: Any, turns: TurnTemplate, conv: Conversation, eos_text: str) -> list[int]:
    """The conversation so far plus the chat template's open user header: the target samples
    the next user turn from here."""
    ends_eos = bool(eos_text) and engine.detokenize(conv.input_ids[-1:], False) == eos_text
    between = turns.between(conv.user_turns[0], eos_text if ends_eos else "")
    return conv.input_ids + engine.encode(between)


def second_prompt(engine: Any, turns: TurnTemplate, prefix_ids: list[int], follow_up: str, first_user: str) -> list[int]:
    """The conversation up to the second answer: `prefix_ids` (ending in the open user header)
    plus the follow-up text re-encoded as the server would, and the open assistant turn."""
    return prefix_ids + engine.encode(follow_up + turns.after(first_user))


def second_turn(prompt2: list[int], follow_up: str, answer_ids: list[int], conv: Conversation) -> Conversation:
    """`conv` extended to `prompt2` (from `second_prompt`) and the target's answer to it."""
    return Conversation(prompt2 + answer_ids, [*conv.spans, (len(prompt2), len(prompt2) + len(answer_ids))],
                        [*conv.user_turns, follow_up])
