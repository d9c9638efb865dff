"""The target answers (and continues) chat conversations through the engine's continuous
batching: every chunk of prompts goes to `Engine.generate` as one batch (many requests per
step), then the multi-turn ones get a follow-up user turn and a second answer, again batched.
Rows are appended to disk chunk by chunk, so the stage resumes where it stopped."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .chat_data import (
    Conversation,
    TurnTemplate,
    followup_prefix,
    one_turn,
    second_prompt,
    second_turn,
)
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


@dataclass
class _Job:
    """One conversation in flight: its plan and what it has so far."""

    key: str
    prompt: dict[str, Any]
    plan: GenPlan
    conv: Conversation | None = None
    prefix: list[int] | None = None  # conversation + open user header (follow-up being written)
    follow_up: str = ""
    prompt2: list[int] | None = None  # the conversation up to the second answer


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
    stats_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Rows: key, source, category, prompt, temperature, turns, input_ids, spans (assistant
    [start, end) pairs), prompt_len (= the first span's start), user_turns. Prompts already in
    `out_path` (the same source and text) are skipped. A follow-up that does not end its turn within 96 tokens leaves the
    conversation at one turn (turns says what was kept).

    Pipelined so the batch stays full: each `Engine.generate` call holds the first answers of
    `chunk` new prompts, the follow-up user turns of the previous chunk's two-turn
    conversations and the second answers of the chunk before that. Rows are written as
    conversations complete (file order = completion order); everything is seeded per prompt, so
    a resumed run gives the same rows. `stats` (tokens and seconds, accumulated) is written to
    `stats_path` after every call, so a stopped run keeps its figures."""
    turns_t = TurnTemplate(template)
    eos_text = engine.detokenize(engine.eos_token_ids[:1], False) if getattr(engine, "eos_token_ids", None) else ""
    done = read_jsonl(out_path) if out_path.exists() else []
    # a prompt is done when its source and whole text are: keys (source and the first 64
    # characters) collide for templated prompts, which a resumed run would otherwise skip
    have = {(r["source"], r["prompt"]) for r in done}
    todo = []
    for i, p in enumerate(prompts):
        key = f"{p['source']}|{p['prompt'][:64]}"
        if (p["source"], p["prompt"]) not in have:
            todo.append(_Job(key, p, plan_for(i, seed, sample_frac, multi_turn_frac, temp_range)))
    if progress is not None:
        progress.update(len(prompts) - len(todo))
    stats = stats if stats is not None else GenStats()
    writing: list[_Job] = []  # waiting for a follow-up user turn
    answering: list[_Job] = []  # waiting for the second answer
    s = 0
    while s < len(todo) or writing or answering:
        t0 = time.perf_counter()
        fresh = todo[s : s + chunk]
        s += chunk
        ids: list[list[int]] = []
        params: list[dict[str, Any]] = []
        for job in fresh:
            ids.append(engine.encode(turns_t.first_prompt(job.prompt["prompt"]))[-MAX_PROMPT_TOKENS:])
            params.append(_answer_params(job.plan, max_new_tokens, 0))
        for job in writing:
            # (an answer cut at max_new_tokens is continued too, closed by the template's end of
            # turn, as a client sends a truncated answer back)
            assert job.conv is not None
            job.prefix = followup_prefix(engine, turns_t, job.conv, eos_text)
            ids.append(job.prefix)
            params.append({**FOLLOWUP_PARAMS, "seed": job.plan.seed * 3 + 1})
        for job in answering:
            assert job.prompt2 is not None
            ids.append(job.prompt2)
        params += [_answer_params(job.plan, max_new_tokens, 2) for job in answering]
        outs = engine.generate(input_ids=ids, sampling_params=params) if ids else []
        n_f, n_w = len(fresh), len(writing)
        complete: list[_Job] = []
        next_writing: list[_Job] = []
        next_answering: list[_Job] = []
        for job, o, pid in zip(fresh, outs[:n_f], ids[:n_f], strict=True):
            job.conv = one_turn(pid, o["output_ids"], job.prompt["prompt"])
            stats.response_tokens += len(o["output_ids"])
            (next_writing if job.plan.turns > 1 else complete).append(job)
        for job, o in zip(writing, outs[n_f : n_f + n_w], strict=True):
            stats.user_tokens += len(o["output_ids"])
            text = o["text"].strip()
            assert job.prefix is not None
            prompt2 = second_prompt(engine, turns_t, job.prefix, text, job.prompt["prompt"])
            fits = len(prompt2) + max_new_tokens <= engine.context_length
            if (o["meta_info"]["finish_reason"] or {}).get("type") == "stop" and len(text) >= 4 and fits:
                job.follow_up, job.prompt2 = text, prompt2
                next_answering.append(job)
            else:
                complete.append(job)  # stays one turn
        for job, o in zip(answering, outs[n_f + n_w :], strict=True):
            stats.response_tokens += len(o["output_ids"])
            assert job.conv is not None and job.prompt2 is not None
            job.conv = second_turn(job.prompt2, job.follow_up, o["output_ids"], job.conv)
            complete.append(job)
        writing, answering = next_writing, next_answering
        rows = [_row(job.key, job.prompt, job.plan, job.conv) for job in complete if job.conv is not None]
        write_jsonl(out_path, rows, mode="a")
        done.extend(rows)
        stats.seconds += time.perf_counter() - t0
        if stats_path is not None:
            stats_path.write_text(json.dumps({**asdict(stats), "tokens_per_s": stats.tokens_per_s}, indent=2) + "\n")
        if progress is not None:
            progress.update(len(rows))
            progress.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
    return done


def _row(key: str, p: dict[str, Any], plan: GenPlan, conv: Conversation) -> dict[str, Any]:
    return {"key": key, "source": p["source"], "category": p.get("category", ""), "prompt": p["prompt"],
            "temperature": plan.temperature, "turns": len(conv.spans), "input_ids": conv.input_ids,
            "spans": [list(sp) for sp in conv.spans], "prompt_len": conv.spans[0][0],
            "user_turns": conv.user_turns}

