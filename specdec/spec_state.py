"""One request's speculative state, kept between steps by the model worker and its proposer
(typed, so neither reads another's state through `Any`).

    shape     the tree shape of the request's last speculative step (None before its first);
              adaptive speculation picks a new one every step (specdec/tree_chooser.py)
    pending   committed positions whose target features the draft has not consumed yet:
              (start, features [m, 3H], ids [m]) with the feature at position p paired with the
              token at p + 1 (steps without speculation leave them here until the request
              speculates again; a speculating request's are consumed in the step that made them)
    root      EAGLE3: the draft's forward at the last committed position, the next tree's root
    accept    running acceptance statistics (the chooser's per-request evidence)
    ngram     --speculative-ngram-merge: the n-gram index over the request's tokens
    copy_match  the matched n-gram length of the request's last copy-shape step
    copies    the request's own acceptance counts of its copied chains (the engine's as prior)
    expected  the chooser's expected accepted tokens per candidate shape, and the versions of
              the statistics they came from (own, engine-wide): reused while neither changed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from .accept_stats import AcceptStats
from .copy_stats import CopyStats
from .tree_shape import TreeShape

if TYPE_CHECKING:  # (the index lives with the proposers)
    from specdec.draft.ngram_merge import NgramIndex


@dataclass(frozen=True, slots=True)
class PendingFeatures:
    start: int  # first position
    features: Tensor  # [m, 3H] target features of positions [start, start + m)
    ids: tuple[int, ...]  # [m] the tokens at positions start + 1 .. start + m


@dataclass(frozen=True, slots=True)
class DraftRoot:
    hidden: Tensor  # [H] pre-norm draft hidden of the forward at the last committed position
    logits: Tensor  # [draft_vocab] fp32 draft logits there (the root's children)


@dataclass(slots=True)
class SpecState:
    shape: TreeShape | None = None
    pending: list[PendingFeatures] = field(default_factory=list)
    root: DraftRoot | None = None
    accept: AcceptStats | None = None
    ngram: NgramIndex | None = None
    copy_match: int = 0
    copies: CopyStats = field(default_factory=CopyStats)
    expected: tuple[tuple[int, int], list[float]] | None = None

    def reset(self) -> None:
        """What the request's K/V going away invalidates (its statistics and index stay)."""
        self.shape = None
        self.pending.clear()
        self.root = None
