"""NGRAM proposer: prompt lookup over the request's own context, no draft model.

The last n tokens (n from `max_match` down to `min_match`) are searched for earlier in the
context; the tokens that followed each match (most recent match first) are inserted into a
trie under the root until it holds `num_draft_tokens - 1` nodes, with at most `topk` children
per node and depth at most `num_steps` (`num_draft_tokens - 1` for a chain, topk = 1).
Candidates are fixed (not sampled), so stochastic verification treats them as one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdec.request import Req
from specdec.spec_config import SpecConfig
from specdec.spec_state import PendingFeatures
from specdec.tree import DraftTree
from specdec.tree_shape import TreeShape

from .proposer import Proposer


def ngram_tree(
    context: Sequence[int], num_nodes: int, max_depth: int, topk: int, min_match: int, max_match: int
) -> DraftTree:
    """Trie of continuations of the context's final n-gram; node 0 = context[-1]."""
    tokens = [context[-1]]
    parents = [-1]
    child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    n_ctx = len(context)
    for n in range(min(max_match, n_ctx - 1), min_match - 1, -1):
        suffix = list(context[n_ctx - n:])
        # match ends before the suffix itself; most recent first
        for start in range(n_ctx - n - 1, -1, -1):
            if list(context[start:start + n]) != suffix:
                continue
            node = 0
            for tok in context[start + n:start + n + max_depth]:
                key = (node, tok)
                if key in child_of:
                    node = child_of[key]
                    continue
                if len(tokens) > num_nodes or sum(1 for p in parents if p == node) >= topk:
                    break
                tokens.append(tok)
                parents.append(node)
                child_of[key] = node = len(tokens) - 1
            if len(tokens) > num_nodes:
                break
        if len(tokens) > num_nodes:
            break
    keep = min(len(tokens), num_nodes + 1)
    return DraftTree(tuple(tokens[:keep]), tuple(parents[:keep]))


class NgramProposer(Proposer):
    name = "NGRAM"

    def __init__(self, spec: SpecConfig) -> None:
        self.spec = spec

    def extend(self, reqs: Sequence[Req], pending: Sequence[PendingFeatures]) -> None:
        """Nothing to compute: the context itself is the model."""

    def propose(self, reqs: Sequence[Req], shapes: Sequence[TreeShape]) -> list[DraftTree]:
        s = self.spec
        return [
            ngram_tree(r.all_ids, sh.num_draft_tokens - 1, sh.num_draft_tokens - 1 if sh.topk == 1 else sh.num_steps,
                       sh.topk, s.ngram_min_match, s.ngram_max_match)
            for r, sh in zip(reqs, shapes, strict=True)
        ]
