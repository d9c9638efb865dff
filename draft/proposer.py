"""The interface every speculative proposer implements (EAGLE3 head, n-gram lookup).

Life of a request under speculation, with `c` = tokens whose target K/V are cached:

1. a target forward commits new tokens and (for EAGLE3) captures aux hidden states;
2. `extend(reqs, pending)` tells the proposer about them in the same step: draft position p
   pairs the target feature at p with token p + 1 (`PendingFeatures.ids`: the tokens the step
   just produced are not the request's yet: the scheduler appends them afterwards);
3. at the start of the request's next decode step, `propose(reqs, shapes)` returns one
   `DraftTree` per request, rooted at the last token, no larger than that request's
   `TreeShape` (adaptive speculation picks it per step; requests whose step does not
   speculate are not passed). Its state between the two is the request's typed `req.spec`
   (specdec/spec_state.py).

A proposer may use pool slots of positions [c, c + temp_slots) of the request's page table
as scratch space while drafting (the scheduler reserves them: specdec/spec_worker.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from specdec.request import Req
from specdec.spec_state import PendingFeatures
from specdec.tree import DraftTree
from specdec.tree_shape import TreeShape


class Proposer(ABC):
    name: str = "abstract"
    capture_layers: tuple[int, ...] = ()  # target layer inputs needed as features
    temp_slots: int = 0  # scratch KV slots needed beyond the committed prefix

    @abstractmethod
    def extend(self, reqs: Sequence[Req], pending: Sequence[PendingFeatures]) -> None:
        """Consume target features [m_i, 3H] for draft positions [start_i, start_i + m_i)."""

    @abstractmethod
    def propose(self, reqs: Sequence[Req], shapes: Sequence[TreeShape]) -> list[DraftTree]:
        """One tree per request within its shape, node 0 = the request's last token."""
