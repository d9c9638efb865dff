"""Prefix-cache hit rate and time saved on multi-turn chats, through the server as users get it:
the same conversations against `specdec serve` with the prefix cache (the default) and with
`--disable-radix-cache`, alternating, one conversation at a time.

    python -m specdec.bench.multi_turn --conversations 6 --turns 4

Each conversation starts from a held-out chat prompt (bench/data/chat_heldout.jsonl, never
training data); every later turn sends the whole history (the model's own answers included, as a
chat client does) plus the next prompt of the file as the new user message. Reported per setting:
time to first token of turns 2+ (median; their prefill is what the cache saves), whole-request
time, usage.prompt_tokens_details.cached_tokens over prompt tokens, and the server's
sglang:cache_hit_rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .served_vs_offline import Server


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.multi_turn", description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quantization", default="w8a16")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the two settings")
    p.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeat)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def prompts() -> list[str]:
    text = resources.files("specdec.bench").joinpath("data/chat_heldout.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def chat(server: Server, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: its text, time to first content, total time and usage."""
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    with server.client.stream("POST", f"{server.base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "ttft": (first or end) - t0, "total": end - t0, "usage": usage}


def one_setting(args: argparse.Namespace, cache: bool, pool: list[str]) -> dict[str, Any]:
    flags = [*args.server_arg] + ([] if cache else ["--disable-radix-cache"])
    if args.quantization not in ("", "none"):
        flags += ["--quantization", args.quantization]
    server = Server(flags)
    try:
        chat(server, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        ttft_later, totals, prompt_tokens, cached = [], [], 0, 0
        k = 0
        for _ in range(args.conversations):
            messages: list[dict[str, str]] = []
            for turn in range(args.turns):
                messages.append({"role": "user", "content": pool[k % len(pool)]})
                k += 1
                out = chat(server, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": out["text"]})
                totals.append(out["total"])
                if turn:
                    ttft_later.append(out["ttft"])
                    prompt_tokens += int(out["usage"].get("prompt_tokens", 0))
                    cached += int((out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        metrics = server.client.get(f"{server.base}/metrics").text
        rate = next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sglang:cache_hit_rate")),
                    float("nan"))
        return {"prefix_cache": cache, "requests": len(totals),
                "ttft_turn2plus_median_s": round(statistics.median(ttft_later), 3),
                "request_median_s": round(statistics.median(totals), 3), "all_requests_s": round(sum(totals), 1),
                "cached_share_turn2plus": round(cached / prompt_tokens, 3) if prompt_tokens else 0.0,
                "server_cache_hit_rate": round(rate, 3)}
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pool = prompts()
    rows = [one_setting(args, cache, pool) for _ in range(args.rounds) for cache in (True, False)]
    print(f"{args.conversations} conversations x {args.turns} turns, {args.max_tokens} tokens per answer; {args.quantization}")
    print(f"{'prefix cache':>12} {'TTFT turns 2+ s':>16} {'request s':>10} {'all s':>7} {'cached':>7} {'hit rate':>9}")
    for r in rows:
        print(f"{'on' if r['prefix_cache'] else 'off':>12} {r['ttft_turn2plus_median_s']:>16} {r['request_median_s']:>10} "
              f"{r['all_requests_s']:>7} {r['cached_share_turn2plus']:>7} {r['server_cache_hit_rate']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
