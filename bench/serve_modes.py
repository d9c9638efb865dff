"""Speculative modes against plain decoding through the server, at several concurrencies, in one
run: what `make run`'s users get.

For each round and each mode (`--modes`; `plain` = `--speculative-algorithm NONE`, `adaptive` =
`make run`'s default, `tree:S,K,N` = a fixed EAGLE3 tree; `+copy` / `+nocopy` after either
adds `--speculative-ngram-merge` / `--no-speculative-ngram-merge`) one `specdec serve` process is
started (one at a time: they never share the CPU), and `specdec.bench_serving` sends the
held-out chat prompts of every category (chat template, greedy, a fixed output length with
`ignore_eos`; `--temperature` / `--top-p` / `--top-k` sample instead) at each `--concurrency`. Modes alternate round by round so the machine's drift
hits all of them; the table shows the median output throughput over rounds and its ratio to
`plain` at the same concurrency, with the accept length the server reports.

    python -m specdec.bench.serve_modes --modes plain adaptive tree:2,1,3 --concurrency 1 4 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .served_vs_offline import Server


def mode_flags(mode: str, quantization: str | None, draft: str | None = None) -> list[str]:
    flags = ["--quantization", quantization] if quantization else []
    for suffix, flag in (("+copy", "--speculative-ngram-merge"), ("+nocopy", "--no-speculative-ngram-merge")):
        if mode.endswith(suffix) and not mode.startswith("plain"):  # the draft that also copies, or not
            return [*mode_flags(mode.removesuffix(suffix), quantization, draft), flag]
    if draft and mode != "plain":
        flags += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", draft]
    if mode == "plain":
        return [*flags, "--speculative-algorithm", "NONE"]
    if mode == "adaptive":
        return flags
    if mode.startswith("tree:"):
        steps, topk, ndt = mode[5:].split(",")
        return [*flags, "--speculative-num-steps", steps, "--speculative-eagle-topk", topk,
                "--speculative-num-draft-tokens", ndt]
    raise ValueError(f"unknown mode {mode!r}: plain, adaptive or tree:S,K,N (either with +copy or +nocopy)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.serve_modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["plain", "adaptive"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompts-per-slot", type=int, default=2, help="requests per unit of concurrency (min 8)")
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quantization", default="w8a16", help="'none' for unquantised weights")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--draft-model-path", default=None, help="an EAGLE3 head instead of the shipped one")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    return p.parse_args(argv)


def sampling_body(temperature: float, top_p: float, top_k: int, output_len: int) -> str | None:
    """The native request's sampling_params when not greedy (bench_serving's --extra-request-body
    replaces its greedy ones), with a seed per request left to the server (unseeded)."""
    if temperature == 0.0:
        return None
    return json.dumps({"sampling_params": {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                           "max_new_tokens": output_len, "ignore_eos": True}})


def run_bench(port: int, concurrency: int, num_prompts: int, output_len: int, out: Path,
              extra_body: str | None = None) -> dict[str, Any]:
    from specdec.bench import bench_serving

    argv = ["--backend", "specdec", "--port", str(port), "--dataset-name", "chat", "--apply-chat-template",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--sharegpt-output-len", str(output_len), "--output-file", str(out), "--disable-tqdm"]
    if extra_body is not None:
        argv += ["--extra-request-body", extra_body]
    if bench_serving.main(argv) != 0:
        raise RuntimeError(f"bench_serving failed at concurrency {concurrency}")
    return dict(json.loads(out.read_text().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quant = None if args.quantization in ("none", "") else args.quantization
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    body = sampling_body(args.temperature, args.top_p, args.top_k, args.output_len)
    sampling = "greedy" if body is None else f"temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}"
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for mode in args.modes:
                print(f"[serve_modes] round {rnd + 1}: {mode}", file=sys.stderr, flush=True)
                server = Server(mode_flags(mode, quant, args.draft_model_path))
                try:
                    for c in args.concurrency:
                        rec = run_bench(server.port, c, max(8, args.prompts_per_slot * c), args.output_len,
                                        Path(tmp) / f"{mode}-{c}.jsonl", body)
                        results.setdefault((mode, c), []).append(rec)
                finally:
                    server.close()
    table = []
    print(f"held-out chat prompts, {args.output_len} new tokens (ignore_eos), {sampling}, --quantization "
          f"{args.quantization}, median of {args.rounds} rounds")
    print(f"{'mode':<16} {'concurrency':>11} {'tok/s':>8} {'vs plain':>9} {'accept':>7}")
    for mode in args.modes:
        for c in args.concurrency:
            recs = results[(mode, c)]
            tps = statistics.median(r["output_throughput"] for r in recs)
            base = statistics.median(r["output_throughput"] for r in results[("plain", c)]) \
                if ("plain", c) in results else float("nan")
            accept = [float(r["accept_length"]) for r in recs if r.get("accept_length")]
            acc = statistics.median(accept) if accept else float("nan")
            table.append({"mode": mode, "concurrency": c, "output_throughput": tps, "vs_plain": tps / base,
                          "accept_length": acc, "rounds": [r["output_throughput"] for r in recs]})
            print(f"{mode:<16} {c:>11} {tps:>8.1f} {tps / base:>8.2f}x {acc:>7.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": table},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
