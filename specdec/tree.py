"""Draft trees as data, and pure functions over them.

A `DraftTree` holds node tokens and parent indices in *topological order*: node 0 is the
root (the last verified token, whose K/V the target has not computed yet) and every
parent index is smaller than its child's. Example, a 4-node tree::

        0 (root)          tokens  = (t0, t1, t2, t3)
       / \\                parents = (-1, 0, 0, 1)
      1   2               depths  = (0, 1, 1, 2)
      |                   mask    = ancestor-or-self, row = query node:
      3                             [[1,0,0,0],
                                     [1,1,0,0],
                                     [1,0,1,0],
                                     [1,1,0,1]]

Target verification feeds all nodes at positions `prefix_len + depth` with that mask
(plus the whole cached prefix).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class DraftTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # parents[0] == -1, parents[i] < i
    # Optional [N, vocab] fp32: row i is the draft distribution node i's children were
    # sampled from (without replacement, in child order). None: children are fixed
    # candidates (top-k, n-gram) and verification treats each as a one-hot proposal.
    draft_probs: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.parents):
            raise ValueError("a tree needs a root and one parent per node")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before children")

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))


def depths(tree: DraftTree) -> list[int]:
    out = [0] * tree.size
    for i in range(1, tree.size):
        out[i] = out[tree.parents[i]] + 1
    return out


def children(tree: DraftTree) -> list[list[int]]:
    """Child lists in node order (which is the verification order of siblings)."""
    out: list[list[int]] = [[] for _ in range(tree.size)]
    for i in range(1, tree.size):
        out[tree.parents[i]].append(i)
    return out


def tree_mask(tree: DraftTree) -> Tensor:
    """[N, N] bool: mask[i, j] is True when node j is node i or one of its ancestors."""
    n = tree.size
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        p = tree.parents[i]
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def positions(tree: DraftTree, prefix_len: int) -> Tensor:
    """[N] int64 positions: the root sits right after the cached prefix."""
    return torch.tensor(depths(tree), dtype=torch.long) + prefix_len


def path_to(tree: DraftTree, node: int) -> list[int]:
    """Node indices from the root down to `node`, both included."""
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def first_child_next_sibling(tree: DraftTree) -> tuple[Tensor, Tensor]:
    """The tree as two [N] int64 link arrays (SGLang's retrieve_next_token / _sibling):
    node i's first child and its next sibling in node order, -1 where there is none."""
    first = [-1] * tree.size
    sibling = [-1] * tree.size
    last_child = [-1] * tree.size
    for i in range(1, tree.size):
        p = tree.parents[i]
        if first[p] == -1:
            first[p] = i
        else:
            sibling[last_child[p]] = i
        last_child[p] = i
    return torch.tensor(first, dtype=torch.long), torch.tensor(sibling, dtype=torch.long)


def prune_tree(tree: DraftTree, keep: Sequence[bool]) -> DraftTree:
    """The subtree of kept nodes (root always kept; a node whose parent goes goes too), in the
    same order. Only for trees of fixed candidates (`draft_probs` None): dropping a *sampled*
    child would change its later siblings' residual distributions."""
    if tree.draft_probs is not None:
        raise ValueError("prune_tree takes trees of fixed candidates (draft_probs None)")
    if len(keep) != tree.size:
        raise ValueError(f"keep has {len(keep)} entries for a tree of {tree.size} nodes")
    index = {0: 0}
    tokens = [tree.tokens[0]]
    parents = [-1]
    for i in range(1, tree.size):
        p = tree.parents[i]
        if keep[i] and p in index:
            index[i] = len(tokens)
            tokens.append(tree.tokens[i])
            parents.append(index[p])
    return DraftTree(tuple(tokens), tuple(parents))


# ---- building trees from draft scores -----------------------------------------------------


class Candidate(NamedTuple):
    score: float  # cumulative draft log-probability (greedy) or a rank weight (sampled)
    token: int
    parent: int  # index into the candidate list, -1 for the root's children


def select_nodes(candidates: Sequence[Candidate], num_nodes: int) -> list[int]:
    """Indices of the best `num_nodes` candidates, parents before children.

    Ties break toward the earlier candidate, so a parent (never scored below its child and
    always listed earlier) is kept whenever its child is.
    """
    best = heapq.nsmallest(num_nodes, range(len(candidates)), key=lambda i: (-candidates[i].score, i))
    return sorted(best)


def tree_from_candidates(root_token: int, candidates: Sequence[Candidate], num_nodes: int) -> DraftTree:
    """Prune candidates to `num_nodes` non-root nodes and renumber them into a DraftTree."""
    keep = select_nodes(candidates, num_nodes)
    index = {c: i + 1 for i, c in enumerate(keep)}
    tokens = [root_token]
    parents = [-1]
    for c in keep:
        cand = candidates[c]
        if cand.parent != -1 and cand.parent not in index:
            raise AssertionError("pruning kept a node without its parent")
        tokens.append(cand.token)
        parents.append(0 if cand.parent == -1 else index[cand.parent])
    return DraftTree(tuple(tokens), tuple(parents))


RANK_WEIGHT = 0.75
RANK_DECAY = 0.3


def _rank_weight(rank: int) -> float:
    return RANK_WEIGHT * RANK_DECAY**rank


def static_rank_tree(num_steps: int, topk: int, num_nodes: int) -> list[tuple[int, ...]]:
    """A fixed tree shape as rank paths (r1, ..., rd), used when drafts are *sampled*.

    Sampled trees must not choose their shape from the sampled values (that would bias
    which draws survive and break losslessness), so the shape is a pure function of the
    config: the r-th draw among siblings weighs RANK_WEIGHT * RANK_DECAY^r (a rough prior
    of its acceptance), a path weighs the product; the `num_nodes` heaviest rank paths of
    depth <= num_steps with ranks < topk are kept. Every kept path's parent and elder
    siblings are kept too (their weights are strictly larger).
    """
    heap: list[tuple[float, tuple[int, ...]]] = [(-_rank_weight(r), (r,)) for r in range(topk)]
    heapq.heapify(heap)
    out: list[tuple[int, ...]] = []
    while heap and len(out) < num_nodes:
        neg_w, path = heapq.heappop(heap)
        out.append(path)
        if len(path) < num_steps:
            for r in range(topk):
                heapq.heappush(heap, (neg_w * _rank_weight(r), (*path, r)))
    # parents before children, siblings in rank order
    return sorted(out, key=lambda p: (len(p), p))
