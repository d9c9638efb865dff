"""Speculative-decoding settings, named like SGLang's `--speculative-*` flags.

Tree shape (EAGLE): `num_steps` rounds of drafting, each expanding the `topk` best nodes
into `topk` children; the best `num_draft_tokens - 1` nodes (by cumulative draft
probability) form the tree verified with the root. `topk = 1` is a chain, so it requires
`num_draft_tokens = num_steps + 1`. Unset values default to SGLang's choice for Llama
(steps 5, topk 4, draft tokens 8).

Adaptive speculation (`adaptive`, EAGLE3/EAGLE; `--speculative-adaptive`): the tree settings
are an envelope, and each step picks, per request, the shape inside it (no speculation
included) that maximises predicted tokens per second (specdec/tree_chooser.py). `auto` turns it
on when no tree flag is given, with envelope `ADAPTIVE_ENVELOPE`; explicit tree flags fix the
tree unless `on` is asked for, and then they bound it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .tree_shape import TreeShape

ALGORITHMS = ("EAGLE3", "EAGLE", "NGRAM")
DEFAULT_NUM_STEPS = 5
DEFAULT_TOPK = 4
DEFAULT_NUM_DRAFT_TOKENS = 8
ADAPTIVE_CHOICES = ("auto", "on", "off")
ADAPTIVE_ENVELOPE = (6, 4, 16)  # (steps, topk, draft tokens) adaptive speculation chooses within


@dataclass(frozen=True, slots=True)
class SpecConfig:
    algorithm: str
    draft_model_path: str | None
    num_steps: int
    topk: int
    num_draft_tokens: int
    accept_threshold_single: float = 1.0
    accept_threshold_acc: float = 1.0
    # NGRAM only: context n-gram lengths tried, longest first
    ngram_min_match: int = 1
    ngram_max_match: int = 6
    adaptive: bool = False  # choose each step's shape inside (num_steps, topk, num_draft_tokens)
    # EAGLE3/EAGLE: merge the continuation of the context's final n-gram (found earlier in the
    # request's own prompt and output) into the draft tree (draft/ngram_merge.py)
    ngram_merge: bool = False

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown speculative algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        for name in ("num_steps", "topk", "num_draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_{name} must be a positive integer; got {value!r}")
        if self.num_draft_tokens < 2:
            raise ValueError("speculative_num_draft_tokens must be >= 2 (the root plus one draft)")
        if self.topk == 1 and self.num_draft_tokens != self.num_steps + 1:
            raise ValueError(
                f"speculative_eagle_topk=1 drafts a chain, so speculative_num_draft_tokens must be "
                f"speculative_num_steps + 1 = {self.num_steps + 1}; got {self.num_draft_tokens}"
            )
        most = 1 + self.topk + (self.num_steps - 1) * self.topk * self.topk
        if self.num_draft_tokens > most:
            raise ValueError(
                f"speculative_num_draft_tokens={self.num_draft_tokens} exceeds the "
                f"{most} nodes that {self.num_steps} steps x topk {self.topk} can draft"
            )
        for name in ("accept_threshold_single", "accept_threshold_acc"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"speculative_{name} must be in (0, 1]; got {value}")
        if not 1 <= self.ngram_min_match <= self.ngram_max_match:
            raise ValueError("need 1 <= ngram_min_match <= ngram_max_match")
        if self.adaptive and self.algorithm == "NGRAM":
            raise ValueError("adaptive speculation needs a draft model (EAGLE3/EAGLE), not NGRAM")
        if self.ngram_merge and self.algorithm == "NGRAM":
            raise ValueError("--speculative-ngram-merge merges copies into a draft model's tree "
                             "(EAGLE3/EAGLE); NGRAM already drafts copies only")

    @property
    def envelope(self) -> TreeShape:
        """The configured tree: the one every step uses, or the largest an adaptive step may."""
        return TreeShape(self.num_steps, self.topk, self.num_draft_tokens)

    @property
    def lossless(self) -> bool:
        return self.accept_threshold_single == 1.0 and self.accept_threshold_acc == 1.0

    @property
    def max_draft_forwards(self) -> int:
        """Draft-model forwards (tree nodes expanded) per speculative step, at most."""
        return (self.num_steps - 1) * self.topk

    @classmethod
    def from_options(
        cls,
        algorithm: str | None,
        draft_model_path: str | None = None,
        num_steps: int | None = None,
        topk: int | None = None,
        num_draft_tokens: int | None = None,
        accept_threshold_single: float = 1.0,
        accept_threshold_acc: float = 1.0,
        token_map: str | None = None,
        adaptive: str = "auto",
        ngram_merge: bool = False,
    ) -> SpecConfig | None:
        """None when speculation is off; fills SGLang's defaults for unset tree settings (or the
        adaptive envelope)."""
        if adaptive not in ADAPTIVE_CHOICES:
            raise ValueError(f"speculative_adaptive must be one of {', '.join(ADAPTIVE_CHOICES)}; got {adaptive!r}")
        if algorithm is None:
            given = [n for n, v in (("draft_model_path", draft_model_path), ("num_steps", num_steps),
                                    ("eagle_topk", topk), ("num_draft_tokens", num_draft_tokens))
                     if v is not None]
            if ngram_merge:
                given.append("ngram_merge")
            if given:
                raise ValueError(
                    "speculative settings given without --speculative-algorithm: "
                    + ", ".join("speculative_" + g for g in given)
                )
            return None
        algorithm = algorithm.upper()
        if token_map is not None:
            warnings.warn(
                "speculative_token_map is ignored: EAGLE3 heads carry their own d2t map "
                "(SGLang ignores it for EAGLE3 too)",
                stacklevel=2,
            )
        tree_given = any(v is not None for v in (num_steps, topk, num_draft_tokens))
        is_adaptive = algorithm in ("EAGLE3", "EAGLE") and (
            adaptive == "on" or (adaptive == "auto" and not tree_given))
        if adaptive == "on" and algorithm == "NGRAM":
            raise ValueError("--speculative-adaptive on needs a draft model (EAGLE3/EAGLE), not NGRAM")
        if is_adaptive and not tree_given:
            num_steps, topk, num_draft_tokens = ADAPTIVE_ENVELOPE
        if topk == 1 and num_draft_tokens is None:
            num_draft_tokens = (num_steps or DEFAULT_NUM_STEPS) + 1
        return cls(
            algorithm=algorithm,
            draft_model_path=draft_model_path,
            num_steps=DEFAULT_NUM_STEPS if num_steps is None else num_steps,
            topk=DEFAULT_TOPK if topk is None else topk,
            num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens,
            accept_threshold_single=accept_threshold_single,
            accept_threshold_acc=accept_threshold_acc,
            adaptive=is_adaptive,
            ngram_merge=ngram_merge,
        )
