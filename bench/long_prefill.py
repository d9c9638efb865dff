"""Time to first token of a long prompt while other requests decode, with chunked prefill
(`--chunked-prefill-size`) and without (-1), through the server as users get it.

    python -m specdec.bench.long_prefill --prompt-tokens 6000 --chunk-sizes 512 -1

Per setting a fresh `specdec serve` (the embedded model, w8a16, its default EAGLE3 speculation):
`--decoders` streaming requests start decoding; once they are going, one request with a long
prompt is sent. Reported: the long prompt's time to first token, and for the decoders the longest
gap between two of their stream chunks and the tokens they received while the long prompt was
prefilled (with the whole prompt in one forward they stall for all of it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .served_vs_offline import Server


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.long_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=6000)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, -1])
    p.add_argument("--decoders", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=2000, help="each decoder's max_new_tokens (ignore_eos)")
    p.add_argument("--quantization", default="w8a16")
    p.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeat)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _stream(server: Server, ids: list[int], n: int, arrivals: list[tuple[float, int]], stop: threading.Event) -> None:
    """One streamed /generate; appends (time, output tokens so far) per chunk until `stop`."""
    import httpx

    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    with httpx.Client(timeout=600) as client, client.stream("POST", f"{server.base}/generate", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            arrivals.append((time.perf_counter(), len(json.loads(line[6:])["output_ids"])))
            if stop.is_set():
                break


def one_setting(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    import random

    flags = ["--chunked-prefill-size", str(chunk), "--disable-radix-cache", *args.server_arg]
    if args.quantization not in ("", "none"):
        flags += ["--quantization", args.quantization]
    server = Server(flags)
    try:
        vocab = int(server.info().get("vocab_size", 49152))
        rng = random.Random(0)
        server.generate([rng.randrange(100, vocab) for _ in range(32)], 4)  # warm-up
        stop = threading.Event()
        streams: list[list[tuple[float, int]]] = [[] for _ in range(args.decoders)]
        threads = [threading.Thread(target=_stream, args=(server, [rng.randrange(100, vocab) for _ in range(64)],
                                                          args.decode_tokens, s, stop), daemon=True) for s in streams]
        for t in threads:
            t.start()
        while min((len(s) for s in streams), default=0) < 10:  # every decoder is going
            time.sleep(0.05)
        long_ids = [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]
        first: list[tuple[float, int]] = []
        sent = time.perf_counter()
        _stream(server, long_ids, 2, first, threading.Event())
        done_at = next(t for t, n in first if n >= 1)  # (a chunk may come before any token)
        ttft = done_at - sent
        stop.set()
        for t in threads:
            t.join(timeout=120)
        gaps, during = [], []
        for s in streams:
            times = [t for t, _ in s if sent - 2.0 <= t <= done_at + 2.0]
            gaps.append(max((b - a for a, b in itertools.pairwise(times)), default=float("nan")))
            got = [n for t, n in s if sent <= t <= done_at]
            before = [n for t, n in s if t < sent]
            during.append((got[-1] if got else (before[-1] if before else 0)) - (before[-1] if before else 0))
        return {"chunked_prefill_size": chunk, "prompt_tokens": args.prompt_tokens, "ttft_s": round(ttft, 2),
                "decoder_max_gap_s": round(max(gaps), 2), "decoder_tokens_during_prefill": during,
                "decoder_tok_s_during_prefill": round(statistics.mean(during) / ttft, 1)}
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [one_setting(args, c) for c in args.chunk_sizes]
    print(f"long prompt {args.prompt_tokens} tokens, {args.decoders} decoders streaming; {args.quantization}")
    print(f"{'chunked prefill':>15} {'TTFT s':>7} {'decoder max gap s':>18} {'decoder tokens during prefill':>30}")
    for r in rows:
        print(f"{r['chunked_prefill_size']:>15} {r['ttft_s']:>7} {r['decoder_max_gap_s']:>18} "
              f"{r['decoder_tokens_during_prefill']!s:>30}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
