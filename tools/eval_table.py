"""Markdown tables of accept lengths from the trainer's eval.json files, one column per head.

    python tools/eval_table.py shipped=draft/heads/.../eval.json new=/path/eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    heads = [(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in argv]
    sections = sorted({k for _, e in heads for k in e})
    for sec in sections:
        cfgs = sorted({c for _, e in heads for c in e.get(sec, {}) if isinstance(e[sec][c], dict)})
        print(f"\n### {sec}\n")
        print("| tree | group | " + " | ".join(n for n, _ in heads) + " |")
        print("|---|---|" + "---|" * len(heads))
        for c in cfgs:
            groups = sorted({g for _, e in heads for g in e.get(sec, {}).get(c, {}).get("by_group", {})})
            for g in ["all", *groups]:
                cells = []
                for _, e in heads:
                    r = e.get(sec, {}).get(c)
                    if r is None:
                        cells.append("")
                        continue
                    v = r["accept_length"] if g == "all" else r["by_group"].get(g, {}).get("accept_length")
                    cells.append("" if v is None else (f"**{v:.2f}**" if g == "all" else f"{v:.2f}"))
                print(f"| {c} | {g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
