"""Trained EAGLE3 heads shipped with specdec (SGLang/vLLM checkpoint format)."""

from __future__ import annotations

from pathlib import Path

HEADS_DIR = Path(__file__).parent
EMBEDDED_HEAD = HEADS_DIR / "smollm2-135m-instruct-eagle3"
# (steps, topk, draft tokens) used with the shipped head when the CLI is given no tree flags and
# --speculative-adaptive off (adaptive trees are the default): the fastest fixed tree in
# docs/PERFORMANCE.md's sweeps on a 2-core AVX2 CPU; the engine's own fixed default stays
# SGLang's (5, 4, 8).
EMBEDDED_TREE = (2, 1, 3)
# --speculative-ngram-merge's default for the embedded model with its shipped head (the CLI's
# --no-speculative-ngram-merge turns it off): copying raised the held-out chat accept length
# 1.73 -> 2.54 at (5,4,8) greedy (docs/PERFORMANCE.md, session 6)
EMBEDDED_NGRAM_MERGE = True


def shipped_head_for_embedded() -> Path | None:
    """The EAGLE3 head trained for the embedded SmolLM2-135M-Instruct, if present."""
    return EMBEDDED_HEAD if (EMBEDDED_HEAD / "config.json").exists() else None
