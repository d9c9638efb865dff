"""Copy shapes on and off, against plain decoding, in one run: what verifying the request's own
copied text without a draft forward gives `make run`'s speculative default.

One speculative engine with the embedded model's defaults (EAGLE3, adaptive trees, copies
merged) and one plain engine, both in this process's main thread, `--disable-radix-cache` on
both (a prefix hit would favour whichever side ran a prompt second). Per prompt three runs,
their order alternating prompt by prompt: the speculative engine with its copy shapes, the same
engine with them removed (`SpecWorker.copy_shapes = ()`: adaptive trees with merged copies as
before copy shapes existed), plain decoding. Held-out chat prompts, chat template, greedy,
`ignore_eos`; the wall time of each `generate` (prefill included, as users get it).

    python -m specdec.bench.copy_shapes_ab --num-prompts 8 --max-new-tokens 96

Prints tokens/s per side (median over prompts, and all tokens over all time), the ratios to
plain, and the shapes each speculative side took; exits 1 unless every side's tokens equal
plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bench_serving import DEFAULT_DATA

SIDES = ("copy", "nocopy", "plain")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.copy_shapes_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=DEFAULT_DATA["chat"], help="jsonl with a 'prompt' per line")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--quantization", default="w8a16", help="'none' for unquantised weights")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from specdec import Engine
    from specdec.draft.heads import EMBEDDED_HEAD

    from .head_to_head import load_prompts

    quant = None if args.quantization == "none" else args.quantization
    common: dict[str, Any] = {"quantization": quant, "log_level": "warning", "disable_radix_cache": True}
    spec = Engine(**common, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(EMBEDDED_HEAD),
                  speculative_ngram_merge=True)
    plain = Engine(**common)
    worker = spec.spec
    if worker is None or not worker.copy_shapes:
        print("copy_shapes_ab: error: the speculative engine offers no copy shapes", file=sys.stderr)
        return 2
    copies = worker.copy_shapes
    prompts = load_prompts(args.prompts, args.num_prompts, spec.tokenizer)
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    for e in (spec, plain):  # warm-up
        e.generate(input_ids=prompts[0], sampling_params={**params, "max_new_tokens": 8})
    rates: dict[str, list[float]] = {s: [] for s in SIDES}
    seconds = dict.fromkeys(SIDES, 0.0)
    emitted = dict.fromkeys(SIDES, 0)
    shapes: dict[str, Counter[str]] = {"copy": Counter(), "nocopy": Counter()}
    lossless = True
    for i, ids in enumerate(prompts):
        tokens: dict[str, list[int]] = {}
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            if side != "plain":
                worker.copy_shapes = copies if side == "copy" else ()
            t = time.perf_counter()
            out: Any = (plain if side == "plain" else spec).generate(input_ids=ids, sampling_params=params)
            dt = time.perf_counter() - t
            tokens[side] = out["output_ids"]
            rates[side].append(len(out["output_ids"]) / dt)
            seconds[side] += dt
            emitted[side] += len(out["output_ids"])
            if side != "plain":
                shapes[side].update(out["meta_info"]["spec_tree_shapes"])
        if not tokens["copy"] == tokens["nocopy"] == tokens["plain"]:
            lossless = False
            print(f"copy_shapes_ab: prompt {i}: speculative tokens differ from plain decoding", file=sys.stderr)
    worker.copy_shapes = copies
    result: dict[str, Any] = {"num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                              "quantization": args.quantization, "lossless": lossless, "sides": {}}
    base_med, base_all = statistics.median(rates["plain"]), emitted["plain"] / seconds["plain"]
    print(f"held-out chat prompts, {args.max_new_tokens} new tokens (ignore_eos), greedy, "
          f"--quantization {args.quantization}, {len(prompts)} prompts, sides alternating")
    print(f"{'side':<8} {'median tok/s':>12} {'vs plain':>9} {'all tok/s':>10} {'vs plain':>9}")
    for side in SIDES:
        med, allr = statistics.median(rates[side]), emitted[side] / seconds[side]
        result["sides"][side] = {"median_tok_s": med, "all_tok_s": allr, "shapes": dict(shapes.get(side, {}))}
        print(f"{side:<8} {med:>12.1f} {med / base_med:>8.2f}x {allr:>10.1f} {allr / base_all:>8.2f}x")
    for side, c in shapes.items():
        print(f"{side} shapes: " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    print("lossless: " + ("yes" if lossless else "NO"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
