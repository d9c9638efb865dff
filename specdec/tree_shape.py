"""Tree shapes a speculative step can take, and the candidates adaptive speculation picks from.

A shape is SGLang's triple (num_steps, topk, num_draft_tokens); `NO_SPEC` (0, 0, 1) is a step
without speculation: the tree is its root alone, so verification is a plain decode step.
`copy_shape(n)` (0, 0, n, copy=True) is a chain of n - 1 tokens copied from the request's own
text (`--speculative-ngram-merge`'s n-gram match) verified without any draft forward.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class TreeShape:
    num_steps: int
    topk: int
    num_draft_tokens: int  # nodes verified, root included
    copy: bool = False  # a copied chain alone: no drafting steps, num_draft_tokens - 1 copies

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1 or self.num_steps < 0 or self.topk < 0:
            raise ValueError(f"not a tree shape: {self}")
        if self.copy:
            if self.num_steps or self.topk or self.num_draft_tokens < 2:
                raise ValueError(f"a copy shape is a chain of >= 1 copied tokens and no drafting steps: {self}")
            return
        if (self.num_steps == 0) != (self.num_draft_tokens == 1):
            raise ValueError(f"a tree with no drafting steps is its root alone, and only that: {self}")
        if self.num_steps and self.topk == 1 and self.num_draft_tokens != self.num_steps + 1:
            raise ValueError(f"a topk-1 tree is a chain of num_steps + 1 nodes: {self}")
        if self.num_steps and self.num_draft_tokens > 1 + self.topk + (self.num_steps - 1) * self.topk**2:
            raise ValueError(f"{self.num_steps} steps of topk {self.topk} cannot draft {self.num_draft_tokens} nodes")

    @property
    def speculates(self) -> bool:
        """Verifies more than the root (drafted or copied tokens)."""
        return self.num_draft_tokens > 1

    @property
    def drafts(self) -> bool:
        """Runs the draft model (a copy shape and NO_SPEC do not)."""
        return self.num_steps > 0

    @property
    def label(self) -> str:
        if self.copy:
            return f"copy{self.num_draft_tokens - 1}"
        return "none" if not self.speculates else f"{self.num_steps},{self.topk},{self.num_draft_tokens}"

    def fits(self, envelope: TreeShape) -> bool:
        """True when this shape drafts within `envelope` (steps, topk and nodes no larger)."""
        return (self.num_steps <= envelope.num_steps and self.topk <= envelope.topk
                and self.num_draft_tokens <= envelope.num_draft_tokens)


NO_SPEC = TreeShape(0, 0, 1)


def copy_shape(num_draft_tokens: int) -> TreeShape:
    """The root and a chain of num_draft_tokens - 1 copied tokens."""
    return TreeShape(0, 0, num_draft_tokens, copy=True)


COPY_LENGTHS = (1, 2, 3, 4, 6, 8, 11, 15)  # copied chains adaptive speculation can verify


def copy_shapes(envelope: TreeShape) -> tuple[TreeShape, ...]:
    """Copy chains within the envelope's node budget (--speculative-ngram-merge)."""
    return tuple(copy_shape(n + 1) for n in COPY_LENGTHS if n + 1 <= envelope.num_draft_tokens)


def candidate_shapes(envelope: TreeShape) -> tuple[TreeShape, ...]:
    """What adaptive speculation chooses from inside `envelope`: no speculation, every chain of
    1..steps, and bushy trees of topk 2 and 4 with 4, 6, 8, 12 or 16 nodes (each at the depth its
    nodes need, at most the envelope's)."""
    out = [NO_SPEC]
    out += [TreeShape(s, 1, s + 1) for s in range(1, envelope.num_steps + 1)]
    for k in (2, 4):
        for n in (4, 6, 8, 12, 16):
            if k > envelope.topk or n > envelope.num_draft_tokens:
                continue
            steps = min(envelope.num_steps, n - 1)
            if 1 + k + (steps - 1) * k * k >= n and steps >= 2:
                out.append(TreeShape(steps, k, n))
    return tuple(sorted(set(out)))
