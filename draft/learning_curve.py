"""Accept length against training data seen: the heads a `--keep-heads true` training run kept.

    python -m specdec.draft.learning_curve --work-dir /path/work --start-head draft/heads/smollm2-135m-instruct-eagle3 \\
        --tree 5,4,8 --per-category 2 --json curve.json

Each kept head (<work>/heads/step_N, with trained.json: optimiser steps and loss tokens seen)
is measured by the trainer's own eval (draft/train_eagle3.evaluate_head) on the shipped held-out
chat prompts (bench/data/chat_heldout.jsonl, `--per-category` of every category, chat
template, greedy), one tree, `--quantization` as served; `--start-head` adds the warm start as
0 tokens. Prints a markdown table; `--json` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def kept_heads(work: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(head folder, trained.json) of every kept head under work/heads, in training order."""
    heads = []
    for d in sorted((work / "heads").glob("step_*")):
        info = d / "trained.json"
        if info.exists() and (d / "model.safetensors").exists():
            heads.append((d, json.loads(info.read_text())))
    return heads


def main(argv: list[str]) -> int:
    from .train_eagle3 import chat_eval_prompts, evaluate_head, parse_eval_configs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, type=Path)
    p.add_argument("--start-head", type=Path, help="the warm start, measured as 0 tokens seen")
    p.add_argument("--tree", default="5,4,8", help="steps,topk,draft tokens (+copy: copies merged)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--quantization", default="w8a16", help="'none' for unquantised weights")
    p.add_argument("--every", type=int, default=1, help="measure every k-th kept head (the last always)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    try:
        trees = parse_eval_configs(a.tree)
    except ValueError:
        trees = []
    if len(trees) != 1:
        raise SystemExit(f"--tree wants one steps,topk,draft tokens, got {a.tree!r}")
    (tree, copy), = trees
    heads = kept_heads(a.work_dir)
    if not heads:
        raise SystemExit(f"no kept heads under {a.work_dir / 'heads'} (train with --keep-heads true)")
    heads = [h for i, h in enumerate(heads) if i % a.every == 0 or i == len(heads) - 1]
    if a.start_head is not None:
        heads.insert(0, (a.start_head, {"step": 0, "tokens_seen": 0}))
    prompts = chat_eval_prompts(a.per_category)
    quant = None if a.quantization == "none" else a.quantization
    key = ",".join(map(str, tree)) + ("+copy" if copy else "")
    rows = []
    for head, info in heads:
        r = evaluate_head(head, prompts, None, a.max_new_tokens, [tree], quantization=quant, ngram_merge=copy)
        rows.append({"head": str(head), **info, "accept_length": r[key]["accept_length"],
                     "by_group": {g: v["accept_length"] for g, v in r[key]["by_group"].items()}})
        if a.json is not None:
            a.json.write_text(json.dumps({"tree": key, "prompts": len(prompts), "rows": rows}, indent=2) + "\n")
    print(f"| step | loss tokens seen | accept length ({key}, greedy, {len(prompts)} prompts) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['tokens_seen']:,} | {r['accept_length']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
