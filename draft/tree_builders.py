"""Growing one request's draft tree step by step from draft distributions.

`GreedyTreeBuilder` reproduces SGLang's EAGLE tree: the root's `topk` children, then each
step expands the `topk` best frontier nodes into `topk` children each, keeping the `topk`
best of those new candidates as the next frontier; finally the best `num_draft_tokens - 1`
candidates by cumulative draft log-probability are kept (parents before children). The
children of every node of a step, across requests, come from one `top_children` call
(log-softmax and top-k over all rows at once); the builder only keeps the bookkeeping.

`SampledTreeBuilder` is for sampling requests: children are *drawn without replacement*
(Gumbel top-k over q's support; one child is a single inverse-CDF draw, the same
distribution) from the draft distribution q, and the tree shape is the fixed
`static_rank_tree`, so verification can use q losslessly (see `specdec.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.kernels import cpu_kernels
from specdec.sampler import sample_one
from specdec.tree import Candidate, DraftTree, static_rank_tree, tree_from_candidates


def top_children(logits: Tensor, k: int, token_ids: Tensor) -> tuple[list[list[float]], list[list[int]]]:
    """The k best children of each of R nodes in one call: logits [R, draft_vocab] ->
    (log-probabilities [R][k], target token ids [R][k]), best first (token_ids [draft_vocab]
    maps the draft vocabulary to target ids)."""
    vals, idx = cpu_kernels.top_logprobs(logits, k)
    return vals.tolist(), token_ids[idx].tolist()


class GreedyTreeBuilder:
    def __init__(self, root_token: int, topk: int, num_nodes: int) -> None:
        self.root_token = root_token
        self.topk = topk
        self.num_nodes = num_nodes
        self.cands: list[Candidate] = []
        self.depth: list[int] = []

    def add_children(self, parent: int, logprobs: Sequence[float], tokens: Sequence[int]) -> list[int]:
        """parent: candidate index (-1 = root); its best children's log-probabilities and target
        token ids, best first (`top_children`); the first `topk` become candidates."""
        base = 0.0 if parent == -1 else self.cands[parent].score
        depth = 1 if parent == -1 else self.depth[parent] + 1
        new = []
        for v, t in zip(logprobs[: self.topk], tokens[: self.topk], strict=True):
            new.append(len(self.cands))
            self.cands.append(Candidate(base + v, t, parent))
            self.depth.append(depth)
        return new

    def best(self, new: list[int]) -> list[int]:
        """The next frontier: the `topk` best of this step's candidates (ties: earlier)."""
        return sorted(new, key=lambda i: (-self.cands[i].score, i))[: self.topk]

    def finish(self) -> DraftTree:
        return tree_from_candidates(self.root_token, self.cands, min(self.num_nodes, len(self.cands)))


class SampledTreeBuilder:
    """Fixed shape; node i's children are the first draws without replacement from q_i."""

    def __init__(
        self, root_token: int, num_steps: int, topk: int, num_nodes: int, vocab_size: int,
        generator: torch.Generator | None,
    ) -> None:
        shape = static_rank_tree(num_steps, topk, num_nodes)
        index = {path: i + 1 for i, path in enumerate(shape)}
        self.parents = [-1] + [index.get(p[:-1], 0) for p in shape]
        self.depth = [0] + [len(p) for p in shape]
        self.kids: list[list[int]] = [[] for _ in self.parents]
        for i in range(1, len(self.parents)):
            self.kids[self.parents[i]].append(i)  # rank order: shape is sorted
        self.tokens = [root_token] + [-1] * len(shape)
        self.alive = [True] * len(self.parents)
        self.probs = torch.zeros(len(self.parents), vocab_size)  # [N, vocab]
        self.generator = generator

    def expandable(self, depth: int) -> list[int]:
        """Nodes at `depth` that exist and have children in the shape."""
        return [i for i, d in enumerate(self.depth) if d == depth and self.alive[i] and self.kids[i]]

    def add_children(self, node: int, q: Tensor) -> None:
        """q [vocab] fp32 (target ids): draw this node's children without replacement."""
        kids = self.kids[node]
        self.probs[node] = q
        support_ids = torch.nonzero(q > 0).squeeze(1)  # [S]: the draft vocabulary, at most
        support = int(support_ids.shape[0])
        if len(kids) == 1 and support:  # one child: a plain categorical draw (= Gumbel-max)
            order = [sample_one(q, self.generator)]
        else:  # Gumbel top-k over the support = sampling without replacement
            qs = q[support_ids]
            gumbel = -torch.log(-torch.log(torch.rand(qs.shape, generator=self.generator).clamp_min(1e-20)))
            top = torch.topk(torch.log(qs) + gumbel, min(len(kids), support)).indices
            order = support_ids[top].tolist()
        for rank, child in enumerate(kids):
            if rank < support:
                self.tokens[child] = int(order[rank])
            else:  # q has fewer tokens than the shape's children (a function of q only)
                self._drop(child)

    def _drop(self, node: int) -> None:
        self.alive[node] = False
        for c in self.kids[node]:
            self._drop(c)

    def finish(self) -> DraftTree:
        keep = [i for i in range(len(self.parents)) if self.alive[i] and self.tokens[i] >= 0]
        new_index = {old: new for new, old in enumerate(keep)}
        parents = tuple(-1 if i == 0 else new_index[self.parents[i]] for i in keep)
        return DraftTree(tuple(self.tokens[i] for i in keep), parents, self.probs[keep])
