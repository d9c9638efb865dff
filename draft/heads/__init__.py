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


def shipped_head_for_embedded() -> Path | None:
    """The EAGLE3 head trained for the embedded SmolLM2-135M-Instruct, if present."""
    return EMBEDDED_HEAD if (EMBEDDED_HEAD / "config.json").exists() else None
