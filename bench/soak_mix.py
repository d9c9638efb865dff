"""The request mix of the soak test (bench/soak.py): what to send next, drawn from a seeded RNG.

Chat, completions and /generate, streamed and not; prompts short (held-out chat prompts),
medium (a GSM8K question) and long (a few-shot GSM8K prompt of 4-8 solved examples, ~0.5-1.5k
tokens); outputs short (1-24 tokens), medium (32-128) and long (200-400), EOS honoured or
ignored; now and then n = 2 or a batch of two prompts. A share of the requests is abandoned by
the client (a stream closed after a few events, a non-streaming request given up after a short
timeout), and a few are bad requests that must be refused with a 4xx.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate")

BAD_BODIES: tuple[tuple[str, bytes], ...] = (
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 2}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}'),
    ("/v1/completions", b'{"prompt": [99999999], "max_tokens": 4}'),
    ("/v1/completions", b'{"prompt": "x", "n": 0}'),
    ("/generate", b'{"text": "x", "input_ids": [1, 2]}'),
    ("/generate", b'{"text": "x", "sampling_params": {"no_such_param": 1}}'),
    ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": 4'),
)


@dataclass(frozen=True)
class Plan:
    """One request of the soak and what the client does with it."""

    route: str
    body: bytes
    stream: bool = False
    close_after_events: int | None = None  # a stream the client closes early
    give_up_s: float | None = None  # a plain request the client abandons
    bad: bool = False  # must be refused with a 4xx

    @property
    def abandoned(self) -> bool:
        return self.close_after_events is not None or self.give_up_s is not None


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


class Mix:
    """Draws Plans; `abort_share` of the good ones are abandoned, `bad_share` are bad requests."""

    def __init__(self, seed: int, abort_share: float = 0.15, bad_share: float = 0.04) -> None:
        self.rng = random.Random(seed)
        self.abort_share = abort_share
        self.bad_share = bad_share
        self.chat = [r["prompt"] for r in _jsonl("chat_heldout.jsonl")]
        self.gsm8k = [r["question"] for r in _jsonl("gsm8k_test.jsonl")]
        self.shots = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in _jsonl("gsm8k_shots.jsonl")]

    def prompt(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(self.chat)
        question = f"Question: {self.rng.choice(self.gsm8k)}\nAnswer:"
        if r < 0.8:
            return question
        shots = self.rng.sample(self.shots, self.rng.randint(4, 8))
        return "\n\n".join([*shots, question])

    def max_new(self) -> int:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.randint(1, 24)
        if r < 0.85:
            return self.rng.randint(32, 128)
        return self.rng.randint(200, 400)

    def next(self) -> Plan:
        rng = self.rng
        if rng.random() < self.bad_share:
            bad_route, bad_body = rng.choice(BAD_BODIES)
            return Plan(bad_route, bad_body, bad=True)
        route = rng.choice(ROUTES)
        stream = rng.random() < 0.5
        max_new = self.max_new()
        temperature = rng.choice([0.0, 0.0, 0.7, 1.0])
        ignore_eos = rng.random() < 0.3
        fanout = rng.random() < 0.08  # n = 2, or two prompts for /generate
        body: dict[str, Any]
        if route == "/generate":
            text: str | list[str] = [self.prompt(), self.prompt()] if fanout and not stream else self.prompt()
            body = {"text": text, "stream": stream, "sampling_params": {
                "max_new_tokens": max_new, "temperature": temperature, "ignore_eos": ignore_eos}}
        else:
            body = {"max_tokens": max_new, "temperature": temperature, "ignore_eos": ignore_eos, "stream": stream}
            if route == "/v1/chat/completions":
                body["messages"] = [{"role": "user", "content": self.prompt()}]
            else:
                body["prompt"] = self.prompt()
            if stream:
                body["stream_options"] = {"include_usage": True}
            if fanout:
                body["n"] = 2
        close_after = give_up = None
        if rng.random() < self.abort_share:
            if stream:
                close_after = rng.randint(1, 20)
            else:
                give_up = rng.uniform(0.3, 3.0)
        return Plan(route, json.dumps(body).encode(), stream, close_after, give_up)
