"""Accuracy cost of weight-only quantisation (and of an fp8 KV cache) on held-out chat prompts,
against the same model unquantised (float32 weights and KV):

* the unquantised model answers each prompt greedily; every engine then scores prompt + answer
  teacher-forced: mean |logprob difference| of the answer tokens, and how often its top-1 token
  equals the unquantised model's;
* each engine's own greedy answer: mean common prefix with the unquantised answer.

    python -m specdec.bench.quant_accuracy --num-prompts 8 --schemes w8a16 w4a16
    python -m specdec.bench.quant_accuracy --schemes none --kv-cache-dtypes fp8_e4m3 fp8_e5m2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from specdec.draft.heads import shipped_head_for_embedded

    head = shipped_head_for_embedded()
    p = argparse.ArgumentParser(prog="python -m specdec.bench.quant_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=None if head is None else head / "heldout_prompts.jsonl")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--schemes", nargs="+", default=["w8a16", "w4a16"], help="'none': unquantised weights")
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                   help="each scheme is also run with these --kv-cache-dtype values (auto: the model dtype)")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def score(engine: Any, prompt: list[int], answer: list[int]) -> tuple[list[float], list[int]]:
    """Teacher-forced logprobs of `answer` after `prompt`, and the top-1 id at each answer row."""
    out: Any = engine.generate(input_ids=prompt + answer, sampling_params={"temperature": 0, "max_new_tokens": 1},
                               return_logprob=True, logprob_start_len=len(prompt) - 1, top_logprobs_num=1)
    meta = out["meta_info"]
    lps = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]
    tops = [row[0][1] for row in meta["input_top_logprobs"][:-1]]
    return lps, tops


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from specdec import Engine

    from .bench_decode import chat_prompt_ids, common_prefix

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    rows = rows[: args.num_prompts]
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
    with Engine(dtype=args.dtype, log_level="warning") as ref:
        assert ref.tokenizer is not None
        prompts = [chat_prompt_ids(ref.tokenizer, r["prompt"]) for r in rows]
        ref_outs: Any = ref.generate(input_ids=prompts, sampling_params=params)
        answers: list[list[int]] = [o["output_ids"] for o in ref_outs]
        ref_scores = [score(ref, p, a) for p, a in zip(prompts, answers)]
    print(f"{len(prompts)} held-out chat prompts, {args.dtype}, reference = unquantised greedy answers "
          f"({sum(map(len, answers))} tokens)")
    print(f"{'scheme':<18} {'mean |dlogprob|':>15} {'max |dlogprob|':>14} {'top-1 agree':>11} "
          f"{'greedy common prefix':>21}")
    runs = [(s, kv) for s in args.schemes for kv in args.kv_cache_dtypes if (s, kv) != ("none", "auto")]
    for scheme, kv in runs:
        quant = None if scheme == "none" else scheme
        with Engine(dtype=args.dtype, quantization=quant, kv_cache_dtype=kv, log_level="error") as eng:
            scores = [score(eng, p, a) for p, a in zip(prompts, answers)]
            outs: Any = eng.generate(input_ids=prompts, sampling_params=params)
            own: list[list[int]] = [o["output_ids"] for o in outs]
        diffs = [abs(x - y) for (lq, _), (lr, _) in zip(scores, ref_scores) for x, y in zip(lq, lr)]
        agree = [x == y for (_, tq), (_, tr) in zip(scores, ref_scores) for x, y in zip(tq, tr)]
        prefix = statistics.mean(common_prefix(o, a) / max(1, len(a)) for o, a in zip(own, answers))
        label = scheme if kv == "auto" else f"{scheme} + kv {kv}"
        print(f"{label:<18} {statistics.mean(diffs):>15.4f} {max(diffs):>14.3f} {sum(agree) / len(agree):>11.3f} "
              f"{prefix:>20.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
