"""What `--tp N` puts on each rank, and whether it changes the tokens: per rank the target's and
the EAGLE3 head's weights and K/V against the whole model's (`--tp 1`), greedy tokens of
EAGLE3 at `--tp N` against EAGLE3 at `--tp 1` and against plain decoding at `--tp N`
(lossless), and tok/s of each (on a CPU the ranks share its cores: not a speed-up).

    python -m specdec.bench.tp_footprint --tp 3 --quantization w8a16

Exits 1 when EAGLE3 at `--tp N` is not token-identical to plain decoding at `--tp N`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

PROMPTS = ("Write a haiku about the sea.", "What is 17 * 23? Explain step by step.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.tp_footprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--speculative-draft-model-path", default=None,
                   help="default: the embedded model's shipped EAGLE3 head")
    p.add_argument("--tp", type=int, default=3, help="ranks (default 3: the embedded model's 9 heads / 3 KV heads)")
    p.add_argument("--quantization", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--input-ids", default=None,
                   help="comma-separated token ids as the one prompt (a checkpoint without a tokenizer)")
    return p.parse_args(argv)


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _whole(engine: Any) -> dict[str, int]:
    """A --tp 1 engine's footprint in the keys `Engine.tp_footprints` uses."""
    model, draft = engine.model, engine.draft_model
    pools = [p for p in (engine.runner.pool, engine.runner.swa_pool) if p is not None]  # (hybrid KV: two)
    dpool = engine.spec.proposer.pool
    head = [p for n, p in (*draft.named_parameters(), *draft.named_buffers()) if n != "_shared_embedding"]
    return {"weight_bytes": _bytes([*model.parameters(), *model.buffers()]),
            "kv_bytes": _bytes([t for pool in pools for t in (*pool.k, *pool.v)]),
            "draft_weight_bytes": _bytes(head), "draft_kv_bytes": _bytes([*dpool.k, *dpool.v])}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from specdec import Engine
    from specdec.draft.heads import EMBEDDED_HEAD

    head = args.speculative_draft_model_path or str(EMBEDDED_HEAD)
    spec = {"speculative_algorithm": "EAGLE3", "speculative_draft_model_path": head, "speculative_num_steps": 3,
            "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4, "speculative_adaptive": "off"}
    common = {"model_path": args.model_path, "dtype": args.dtype, "quantization": args.quantization,
              "log_level": "warning", "max_total_tokens": 2048}
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    prompts: list[dict[str, Any]] = (
        [{"input_ids": [int(t) for t in args.input_ids.split(",")]}] if args.input_ids
        else [{"prompt": p} for p in PROMPTS])
    if args.input_ids:
        common["skip_tokenizer_init"] = True

    def run(tp: int, speculative: bool) -> tuple[list[list[int]], float, list[dict[str, int]]]:
        with Engine(tp_size=tp, **common, **(spec if speculative else {})) as engine:
            engine.generate(**prompts[0], sampling_params={"temperature": 0, "max_new_tokens": 2})  # warm-up
            t0 = time.perf_counter()
            outs: list[dict[str, Any]] = [engine.generate(**p, sampling_params=params) for p in prompts]  # type: ignore[misc]
            ids = [o["output_ids"] for o in outs]
            rate = sum(len(i) for i in ids) / (time.perf_counter() - t0)
            feet = engine.tp_footprints if tp > 1 else [_whole(engine)]
        return ids, rate, feet

    one, one_rate, (whole,) = run(1, True)
    tp_spec, tp_rate, feet = run(args.tp, True)
    tp_plain, plain_rate, _ = run(args.tp, False)
    mib = 2.0**20
    print(f"--tp {args.tp}, quantization {args.quantization}, {args.dtype}; MiB per rank (share of --tp 1's)")
    print(f"{'rank':>4} {'target':>16} {'target KV':>16} {'EAGLE3 head':>16} {'draft KV':>16}")
    keys = ("weight_bytes", "kv_bytes", "draft_weight_bytes", "draft_kv_bytes")
    for r, f in enumerate(feet):
        cells = [f"{f[k] / mib:8.1f} ({f[k] / max(whole[k], 1):.3f})" for k in keys]
        print(f"{r:>4} " + " ".join(f"{c:>16}" for c in cells))
    print(f"{'tp 1':>4} " + " ".join(f"{whole[k] / mib:>16.1f}" for k in keys))
    lossless = tp_spec == tp_plain
    print(f"EAGLE3 --tp {args.tp} == plain --tp {args.tp}: {lossless}; == EAGLE3 --tp 1: {tp_spec == one}")
    print(f"tok/s: EAGLE3 --tp 1 {one_rate:.1f}, EAGLE3 --tp {args.tp} {tp_rate:.1f}, plain --tp {args.tp} {plain_rate:.1f}")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
