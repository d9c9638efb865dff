"""How often copying from the context would be right: for every position of the greedy answers
in a trainer `responses.jsonl`, the continuation of the longest earlier n-gram match
(`draft.ngram_merge.NgramIndex`) against what the target actually wrote next. Prints, per
matched length n (4 = 4 or more) and chain depth, the share of copied tokens that agree given
the earlier ones did: the source of `draft.ngram_merge.COPY_ACCEPT`.

    python tools/copy_accept.py ~/.cache/specdec/train/<head>/responses.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from specdec.draft.ngram_merge import NgramIndex
from specdec.draft.train_data import read_jsonl, response_spans


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("responses", type=Path)
    p.add_argument("--depth", type=int, default=6, help="longest chain scored")
    args = p.parse_args()
    hits: Counter[tuple[int, int]] = Counter()
    seen: Counter[tuple[int, int]] = Counter()
    positions = 0
    for r in read_jsonl(args.responses):
        if r["temperature"] != 0:
            continue
        ids = r["input_ids"]
        for a, b in response_spans(r):
            index = NgramIndex(1, 6)
            for pos in range(a, b - 1):
                positions += 1
                chain, n = index.chain(ids[: pos + 1], args.depth)
                for d, tok in enumerate(chain):
                    if pos + 1 + d >= b:
                        break
                    key = (min(n, 4), d)
                    seen[key] += 1
                    if ids[pos + 1 + d] != tok:
                        break
                    hits[key] += 1
    out = {f"n={n}{'+' if n == 4 else ''} depth={d + 1}": {"accept": round(hits[n, d] / seen[n, d], 3),
                                                         "exposures": seen[n, d]}
           for n, d in sorted(seen)}
    print(json.dumps({"greedy_answer_positions": positions, "by_match_and_depth": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
