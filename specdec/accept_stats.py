"""Running acceptance statistics of speculative steps, per request and engine-wide.

What a verify step shows: at every node the accepted path visits (the root, then each accepted
node), the target's next token was compared with that node's children, ranked as drafted (rank
0 = the draft's best). So for the children's depth d and every rank r that node had, the step is
one *exposure*, and a *hit* at the rank that matched, if any. `q(d, r) = hits / exposures` then
estimates P(target's token = the draft's rank-r candidate at depth d), whatever the trees were.

Counts decay by `DECAY` per observed step (recent text weighs more), and a request's estimate
leans on the engine-wide one until it has its own evidence (`PRIOR_WEIGHT` pseudo-exposures).
`expected_accepted(shape)` is the expected number of accepted draft tokens of a tree of that
shape: the sum, over the tree's nodes, of the probability that the accepted path reaches the
node (the product of q along its rank path), the nodes being the best rank paths (as the
drafter keeps the best candidates).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .tree import DraftTree
from .tree_shape import TreeShape

DECAY = 0.97
PRIOR_WEIGHT = 6.0
# before any evidence: a plausible draft (top-1 right half the time, falling with depth and rank)
DEFAULT_Q0 = 0.5
DEFAULT_RANK_DECAY = 0.25
DEFAULT_DEPTH_DECAY = 0.93


class AcceptStats:
    """Decayed hit / exposure counts per (depth 1..max_depth, rank 0..max_rank - 1)."""

    __slots__ = ("exposures", "hits", "max_depth", "max_rank", "version")

    def __init__(self, max_depth: int, max_rank: int) -> None:
        self.max_depth, self.max_rank = max_depth, max_rank
        self.version = 0  # observed steps with evidence: the estimates change only with it
        self.hits = [[0.0] * max_rank for _ in range(max_depth)]
        self.exposures = [[0.0] * max_rank for _ in range(max_depth)]

    def observe(self, tree: DraftTree, accepted: Sequence[int]) -> None:
        """One verify step: `accepted` = accepted node indices along the path, root excluded."""
        if tree.size == 1:
            return  # nothing was drafted: no evidence
        self.version += 1
        for row_h, row_e in zip(self.hits, self.exposures, strict=True):
            for r in range(self.max_rank):
                row_h[r] *= DECAY
                row_e[r] *= DECAY
        kids: list[list[int]] = [[] for _ in range(tree.size)]
        for i in range(1, tree.size):
            kids[tree.parents[i]].append(i)
        node, depth = 0, 1
        path = list(accepted)
        while depth <= self.max_depth:
            children = kids[node]
            nxt = path[depth - 1] if depth - 1 < len(path) else None
            for r, c in enumerate(children[: self.max_rank]):
                self.exposures[depth - 1][r] += 1.0
                if c == nxt:
                    self.hits[depth - 1][r] += 1.0
            if nxt is None:
                break
            node, depth = nxt, depth + 1

    def q(self, prior: AcceptStats | None = None) -> list[list[float]]:
        """[depth][rank] acceptance estimates, shrunk toward `prior` (or the default guess)."""
        out = []
        for d in range(self.max_depth):
            row = []
            for r in range(self.max_rank):
                base = prior.q_one(d, r) if prior is not None else default_q(d, r)
                e = self.exposures[d][r]
                row.append((self.hits[d][r] + PRIOR_WEIGHT * base) / (e + PRIOR_WEIGHT))
            out.append(row)
        return out

    def q_one(self, d: int, r: int) -> float:
        e = self.exposures[d][r]
        return (self.hits[d][r] + PRIOR_WEIGHT * default_q(d, r)) / (e + PRIOR_WEIGHT)


def default_q(depth_index: int, rank: int) -> float:
    return DEFAULT_Q0 * DEFAULT_RANK_DECAY**rank * DEFAULT_DEPTH_DECAY**depth_index


def best_path_weights(q: list[list[float]], topk: int, max_depth: int, max_nodes: int) -> list[float]:
    """Weights (reach probabilities) of the best `max_nodes` rank paths with ranks < topk and
    depth <= max_depth, best first: a parent always comes before its children (q <= 1)."""
    topk = min(topk, len(q[0]) if q else 0)
    max_depth = min(max_depth, len(q))
    heap = [(-q[0][r], 1, r) for r in range(topk)]  # (-weight, depth, tie-break)
    heapq.heapify(heap)
    out: list[float] = []
    tie = topk
    while heap and len(out) < max_nodes:
        neg_w, depth, _ = heapq.heappop(heap)
        out.append(-neg_w)
        if depth < max_depth:
            for r in range(topk):
                tie += 1
                heapq.heappush(heap, (neg_w * q[depth][r], depth + 1, tie))
    return out


def expected_accepted(q: list[list[float]], shapes: Sequence[TreeShape]) -> list[float]:
    """Expected accepted draft tokens per step for each shape, from estimates q [depth][rank]."""
    out: list[float] = []
    cache: dict[tuple[int, int], list[float]] = {}
    for s in shapes:
        if not s.drafts:  # no speculation, or a copy shape (specdec/copy_stats.py)
            out.append(0.0)
            continue
        if s.topk == 1:
            total, reach = 0.0, 1.0
            for d in range(min(s.num_steps, len(q))):
                reach *= q[d][0]
                total += reach
            out.append(total)
            continue
        key = (s.topk, s.num_steps)
        if key not in cache:
            cache[key] = best_path_weights(q, s.topk, s.num_steps, 16)
        out.append(sum(cache[key][: s.num_draft_tokens - 1]))
    return out
