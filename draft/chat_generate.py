"""The target answers (and continues) chat conversations through the engine's continuous
batching: every chunk of prompts goes to `Engine.generate` as one batch (many requests per
step), then the multi-turn ones get a follow-up user turn and a second answer, again batched.
Rows are appended to disk chunk by chunk, so the stage resumes where it stopped."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat_data import Conversation, TurnTemplate, followup_prefix, one_turn, second_turn
from .train_data import read_jsonl, write_jsonl

log = logging.getLogger("specdec.train")

FOLLOWUP_PARAMS = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 96}
MAX_PROMPT_TOKENS = 768


@dataclass(frozen=True)
class GenPlan:
    """How one conversation is generated: sampling temperature of the answers (0 = greedy), the
    number of turns, and a seed for the sampled parts."""

    temperature: float
    turns: int
    seed: int


def plan_for(index: int, seed: int, sample_frac: float, multi_turn_frac: float,
             temp_range: tuple[float, float]) -> GenPlan:
    """Deterministic per (seed, index): a share `sample_frac` of conversations sampled at a
    temperature drawn from `temp_range` (rounded to 0.05), a share `multi_turn_frac` two turns."""
    rng = random.Random(seed * 7919 + index)
    lo, hi = temp_range
    temp = round(rng.uniform(lo, hi) / 0.05) * 0.05 if rng.random() < sample_frac else 0.0
    turns = 2 if rng.random() < multi_turn_frac else 1
    return GenPlan(round(temp, 2), turns, seed * 1000003 + index)


@dataclass
class GenStats:
    response_tokens: int = 0
    user_tokens: int = 0  # follow-up user turns the target wrote
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return (self.response_tokens + self.user_tokens) / max(1e-9, self.seconds)


def _answer_params(plan: GenPlan, max_new_tokens: int, turn: int) -> dict[str, Any]:
    p: dict[str, Any] = {"temperature": plan.temperature, "max_new_tokens": max_new_tokens}
    if plan.temperature > 0:
        p["seed"] = plan.seed * 3 + turn
    return p


def generate_conversations(
    engine: Any,
    template: Any,
    prompts: Sequence[dict[str, Any]],
    out_path: Path,
    max_new_tokens: int,
    sample_frac: float,
    multi_turn_frac: float,
    seed: int,
    temp_range: tuple[float, float] = (0.7, 1.0),
    chunk: int = 128,
    progress: Any = None,
    stats: GenStats | None = None,
) -> list[dict[str, Any]]:
    """Rows: key, source, category, prompt, temperature, turns, input_ids, spans (assistant
    [start, end) pairs), prompt_len (= the first span's start), user_turns. Prompts already in
    `out_path` are skipped. A follow-up that does not end its turn within 96 tokens leaves the
    conversation at one turn (turns says what was kept)."""
    turns_t = TurnTemplate(template)
    eos_text = engine.detokenize(engine.eos_token_ids[:1], False) if getattr(engine, "eos_token_ids", None) else ""
    done = read_jsonl(out_path) if out_path.exists() else []
    have = {r["key"] for r in done}
    todo = []
    for i, p in enumerate(prompts):
        key = f"{p['source']}|{p['prompt'][:64]}"
        if key not in have:
            todo.append((key, p, plan_for(i, seed, sample_frac, multi_turn_frac, temp_range)))
    if progress is not None:
        progress.update(len(prompts) - len(todo))
    stats = stats if stats is not None else GenStats()
    for s in range(0, len(todo), chunk):
        t0 = time.perf_counter()
        part = todo[s : s + chunk]
        ids = [engine.encode(turns_t.first_prompt(p["prompt"]))[-MAX_PROMPT_TOKENS:] for _, p, _ in part]
        outs = engine.generate(input_ids=ids, sampling_params=[_answer_params(pl, max_new_tokens, 0)
                                                               for _, _, pl in part])
        convs = [one_turn(pid, o["output_ids"], p["prompt"]) for pid, o, (_, p, _) in zip(ids, outs, part, strict=True)]
        stats.response_tokens += sum(len(o["output_ids"]) for o in outs)
        # multi-turn: the target writes a follow-up user turn, then answers it
        # (an answer cut at max_new_tokens is continued too, closed by the template's end of turn,
        # as a client sends a truncated answer back)
        multi = [j for j, (_, _, pl) in enumerate(part) if pl.turns > 1]
        if multi:
            prefixes = [followup_prefix(engine, turns_t, convs[j], eos_text) for j in multi]
            fparams = [{**FOLLOWUP_PARAMS, "seed": part[j][2].seed * 3 + 1} for j in multi]
            fouts = engine.generate(input_ids=prefixes, sampling_params=fparams)
            stats.user_tokens += sum(len(o["output_ids"]) for o in fouts)
            ok = [(j, pre, o["text"].strip()) for j, pre, o in zip(multi, prefixes, fouts, strict=True)
                  if (o["meta_info"]["finish_reason"] or {}).get("type") == "stop" and len(o["text"].strip()) >= 4]
            second_ids = [pre + engine.encode(text + turns_t.after(convs[j].user_turns[0])) for j, pre, text in ok]
            keep = [k for k, x in enumerate(second_ids) if len(x) + max_new_tokens <= engine.context_length]
            ok = [ok[k] for k in keep]
            if ok:
                aouts = engine.generate(
                    input_ids=[second_ids[k] for k in keep],
                    sampling_params=[_answer_params(part[j][2], max_new_tokens, 2) for j, _, _ in ok],
                )
                stats.response_tokens += sum(len(o["output_ids"]) for o in aouts)
                for (j, pre, text), o in zip(ok, aouts, strict=True):
                    convs[j] = second_turn(engine, turns_t, pre, text, o["output_ids"], convs[j])
        rows = [_row(key, p, pl, c) for (key, p, pl), c in zip(part, convs, strict=True)]
        write_jsonl(out_path, rows, mode="a")
        done.extend(rows)
        stats.seconds += time.perf_counter() - t0
        if progress is not None:
            progress.update(len(part))
            progress.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
    return done


def _row(key: str, p: dict[str, Any], plan: GenPlan, conv: Conversation) -> dict[str, Any]:
    return {"key": key, "source": p["source"], "category": p.get("category", ""), "prompt": p["prompt"],
            "temperature": plan.temperature, "turns": len(conv.spans), "input_ids": conv.input_ids,
            "spans": [list(sp) for sp in conv.spans], "prompt_len": conv.spans[0][0],
            "user_turns": conv.user_turns}

