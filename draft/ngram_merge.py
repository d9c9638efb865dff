"""A draft that also copies: the request's own text merged into EAGLE3's tree.

`NgramIndex` finds, in O(1) per step, the most recent earlier occurrence of the context's final
n-gram (n from `max_match` down to `min_match`) and returns the tokens that followed it (the
copy chain). Prompt lookup (`NGRAM`) proposes only that; here it joins EAGLE3's candidates in
one tree under the same `num_draft_tokens` budget:

* greedy requests (`merge_greedy`): the chain's nodes become candidates beside EAGLE3's, scored
  like them by an estimated log acceptance (cumulative draft log-probability for EAGLE3's; the
  parent's score plus log `copy_accept(n)` per copied token, n the matched length). A copied
  token EAGLE3 also drafted is one node, with the higher score. The best `budget` candidates
  are kept, parents before children (`tree_from_candidates`).
* sampled requests (`attach_chain`): the sampled tree's shape must not depend on the sampled
  tokens' values, so the chain only follows the sampled nodes it agrees with and hangs its rest
  under a *leaf*; those copied children are fixed candidates (their parent's `draft_probs` row
  stays zero, which verification reads as one-hot proposals: lossless, see specdec.verify).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specdec.tree import Candidate, DraftTree, children

if TYPE_CHECKING:
    from specdec.request import Req

# acceptance of a copied token by matched n-gram length (longer matches repeat more reliably):
# how often the target's greedy next token was the first copied one, measured over the greedy
# answers of the chat training conversations (tools/copy_accept.py; ~16k positions with a
# match): 0.24 / 0.54 / 0.65 / 0.89 for n = 1 / 2 / 3 / 4+. Later tokens of a chain agree more
# often still (given the earlier ones did), so a constant per token is conservative.
COPY_ACCEPT = {1: 0.25, 2: 0.55, 3: 0.65}
COPY_ACCEPT_LONG = 0.9  # n >= 4
MIN_SAMPLED_COPY_MATCH = 4  # sampled trees give copies room only for matches this long (see docs)


def copy_accept(n: int) -> float:
    return COPY_ACCEPT.get(n, COPY_ACCEPT_LONG)


@dataclass
class NgramIndex:
    """n-gram -> end position of its latest occurrence, over ids[: indexed] (one request's
    context; grows as tokens are appended, never re-scans)."""

    min_match: int
    max_match: int
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # end positions < indexed are in the table
    # the last `request_chain` answer: (sequence length, budget, chain, n); a step asks up to
    # three times (the chooser, a copy tree, the merged tree) for the same sequence
    last: tuple[int, int, list[int], int] | None = None

    def _add_until(self, ids: Sequence[int], end: int) -> None:
        for e in range(self.indexed, end):
            for n in range(self.min_match, self.max_match + 1):
                if e - n + 1 < 0:
                    break
                self.last_end[tuple(ids[e - n + 1 : e + 1])] = e
        self.indexed = max(self.indexed, end)

    def chain(self, ids: Sequence[int], max_len: int) -> tuple[list[int], int]:
        """(continuation, matched n) of the longest final n-gram seen before; ([], 0) when none.
        The final n-gram's own occurrence is excluded (only end positions < len(ids) - 1)."""
        if max_len <= 0 or len(ids) < 2:
            return [], 0
        self._add_until(ids, len(ids) - 1)
        for n in range(min(self.max_match, len(ids) - 1), self.min_match - 1, -1):
            e = self.last_end.get(tuple(ids[len(ids) - n :]))
            if e is not None:
                return list(ids[e + 1 : e + 1 + max_len]), n
        return [], 0


def request_chain(req: Req, min_match: int, max_match: int, budget: int) -> tuple[list[int], int]:
    """The request's copy chain (up to `budget` tokens) and matched n, from its own index."""
    index = req.spec.ngram
    if index is None:
        index = req.spec.ngram = NgramIndex(min_match, max_match)
    length = req.seq_len
    if index.last is not None and index.last[0] == length and index.last[1] >= budget:
        return index.last[2][:budget], index.last[3]
    chain, n = index.chain(req.all_ids, budget)
    index.last = (length, budget, chain, n)
    return chain[:], n


def merge_greedy(
    root_token: int, cands: Sequence[Candidate], chain: Sequence[int], n: int, budget: int
) -> tuple[list[Candidate], int]:
    """EAGLE3's candidates plus the copy chain (from the root down), as one candidate list for
    `tree_from_candidates(root_token, ..., budget)`. Returns (candidates, copied nodes added).
    Scores keep the invariant a child never scores above its parent."""
    out = list(cands)
    child_of = {(c.parent, c.token): i for i, c in enumerate(out)}
    step = math.log(copy_accept(n))
    parent, score, added = -1, 0.0, 0
    for tok in chain[:budget]:
        score = score + step
        key = (parent, tok)
        if key in child_of:
            i = child_of[key]
            if out[i].score < score:  # the copy raises an EAGLE3 node (never above its parent)
                out[i] = out[i]._replace(score=score)
            score = out[i].score
        else:
            i = len(out)
            out.append(Candidate(score, tok, parent))
            child_of[key] = i
            added += 1
        parent = i
    return out, added


def attach_chain(tree: DraftTree, chain: Sequence[int], budget: int) -> DraftTree:
    """A sampled tree plus the copy chain: follow the chain down the nodes whose tokens agree;
    where it leaves the tree at a node without children, hang the rest there as fixed
    candidates (at most `budget` nodes in all, root excluded). Anywhere else it is dropped:
    a node's sampled children are never joined by fixed ones."""
    kids = children(tree)
    node, k = 0, 0
    while k < len(chain):
        nxt = next((c for c in kids[node] if tree.tokens[c] == chain[k]), None)
        if nxt is None:
            break
        node, k = nxt, k + 1
    room = budget - (tree.size - 1)
    if k >= len(chain) or kids[node] or room <= 0:
        return tree
    rest = list(chain[k : k + room])
    tokens = list(tree.tokens) + rest
    parents = [*tree.parents, node, *range(tree.size, tree.size + len(rest) - 1)]
    probs = tree.draft_probs
    if probs is not None:  # zero rows: the leaf's children (the copies) and theirs are fixed
        probs = torch.cat([probs, probs.new_zeros(len(rest), probs.shape[1])])
        probs[node] = 0.0
    return DraftTree(tuple(tokens), tuple(parents), probs)
