"""Rebuild the benchmark data shipped in bench/data/ from ../shared/data (run from the repo root):

    python tools/make_bench_data.py

gsm8k_test.jsonl (all 1319 test questions) and gsm8k_shots.jsonl (the first 16 training
questions, few-shot exemplars) for few_shot_gsm8k and bench_serving; alpaca_seed_tasks.jsonl;
chat_heldout.jsonl: up to 12 prompts per category of chat_prompts.jsonl, drawn only from the
held-out split (draft/data_split.py) and 16-1500 characters long, by hash within a category,
the categories taken in turn (the first 9 prompts are one of each).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "draft"))
from data_split import is_heldout, prompt_key  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "data"
PER_CATEGORY = 12


def main() -> None:
    OUT.mkdir(exist_ok=True)
    shutil.copyfile(SHARED / "gsm8k_test.jsonl", OUT / "gsm8k_test.jsonl")
    shutil.copyfile(SHARED / "alpaca_seed_tasks.jsonl", OUT / "alpaca_seed_tasks.jsonl")
    train = (SHARED / "gsm8k_train.jsonl").read_text(encoding="utf-8").split("\n")
    (OUT / "gsm8k_shots.jsonl").write_text("\n".join(train[:16]) + "\n", encoding="utf-8")
    by_category: dict[str, list[dict[str, str]]] = defaultdict(list)
    for line in (SHARED / "chat_prompts.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        if is_heldout(row["prompt"]) and 16 <= len(row["prompt"].strip()) <= 1500:
            by_category[row["category"]].append(row)
    picked = {c: sorted(v, key=lambda r: prompt_key(r["prompt"]))[:PER_CATEGORY] for c, v in by_category.items()}
    # round robin over the categories: the first N prompts of the file cover N categories
    rows = [picked[c][i] for i in range(PER_CATEGORY) for c in sorted(picked) if i < len(picked[c])]
    with open(OUT / "chat_heldout.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("source", "category", "prompt", "licence")}) + "\n")
    print(f"wrote {len(rows)} held-out chat prompts over {len(by_category)} categories to {OUT}")


if __name__ == "__main__":
    main()
