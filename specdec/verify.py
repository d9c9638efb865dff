"""Tree verification: which draft tokens the target accepts, and the token that follows.

Terms (as in vLLM's rejection sampler, extended to trees):

* **accepted tokens** - draft nodes on one root-to-node path that the target agrees with;
  each is emitted as if the target had produced it.
* **recovered token** - when every child of the last accepted node is rejected, a token is
  drawn from the target's *residual* distribution there (greedy: the target's argmax).
* **bonus token** - when the last accepted node has no children, a token is drawn from the
  target's distribution at it (greedy: the argmax). Either way exactly one extra token is
  emitted per verify step, so a step emits `len(accepted) + 1` tokens.

Stochastic rule (recursive rejection sampling; lossless). At a node with target distribution
p and children x_1..x_m, try the children in order:

    accept x_i with probability min(1, p(x_i) / q(x_i))
    on rejection: p <- normalise(max(p - q, 0)); q <- q without x_i, renormalised

where q is the draft distribution the children were sampled from *without replacement*
(`DraftTree.draft_probs`), or the one-hot of x_i for fixed candidates (top-k, n-gram, and the
children of a node whose `draft_probs` row is all zero: text copied into a sampled tree), which
reduces to "accept x_i with probability p(x_i); else zero it out of p" (SGLang's rule).
If all are rejected, the recovered token is drawn from the final p.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .sampler import sample_one
from .tree import DraftTree, children


class VerifyResult(NamedTuple):
    accepted: list[int]  # accepted node indices along the path (root excluded), in order
    next_token: int  # the recovered or bonus token


def verify_greedy(tree: DraftTree, target_argmax: Sequence[int]) -> VerifyResult:
    """`target_argmax[i]` is the target's choice after node i; follow matching children."""
    kids = children(tree)
    node = 0
    accepted: list[int] = []
    while True:
        want = int(target_argmax[node])
        # at most one child can carry the target's token (siblings are distinct)
        match = next((c for c in kids[node] if tree.tokens[c] == want), None)
        if match is None:
            return VerifyResult(accepted, want)  # recovered (children) or bonus (leaf)
        accepted.append(match)
        node = match


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def verify_stochastic(
    tree: DraftTree,
    target_probs: Tensor,  # [N, vocab] fp32: the processed target distribution after each node
    generator: torch.Generator | None,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
) -> VerifyResult:
    """Recursive rejection sampling down the tree (see module docstring).

    `threshold_single` / `threshold_acc` < 1 relax acceptance like SGLang's
    `speculative_accept_threshold_*` (lossy): accept when p(x) >= threshold_single, or when
    u * threshold_acc <= p(x) / q(x). Both 1.0 (the default) is exactly lossless.
    """
    kids = children(tree)
    node = 0
    accepted: list[int] = []
    while True:
        p = target_probs[node].clone()
        q = None if tree.draft_probs is None else tree.draft_probs[node].clone()
        if q is not None and not bool(q.any()):
            q = None  # an all-zero row: this node's children are fixed candidates (copied text)
        chosen = None
        for c in kids[node]:
            x = tree.tokens[c]
            px = float(p[x])
            qx = 1.0 if q is None else float(q[x])
            u = _uniform(generator)
            if px >= threshold_single or (qx > 0 and u * threshold_acc <= px / qx):
                chosen = c  # p(x) >= q(x): always accepted (ratio >= 1 > u)
                break
            # rejected: move to the residual distributions. Where nothing would be left (p one-hot
            # on x, or p == q, up to rounding: a grammar that forces one token does this) the
            # rejection had probability ~0 and p stays as it was rather than turning all-zero
            if q is None:
                if float(p.sum()) - px > 0:
                    p[x] = 0.0
            else:
                residual = torch.clamp(p - q, min=0.0)
                if float(residual.sum()) > 0:
                    p = residual
                elif float(p.sum()) - px > 0:
                    p[x] = 0.0
                q[x] = 0.0
                total_q = float(q.sum())
                if total_q > 0:
                    q = q / total_q
            p = p / p.sum()
        if chosen is None:
            token = sample_one(p, generator)
            return VerifyResult(accepted, token)
        accepted.append(chosen)
        node = chosen
