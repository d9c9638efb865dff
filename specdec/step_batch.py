"""What one engine step runs, and what it gives back: the contract between the scheduler and
the model worker.

    Scheduler.schedule()  -> ScheduledBatch   (requests chosen, their KV slots reserved)
    ModelWorker.run(batch) -> StepResult      (forward, sampling or verification, the draft)
    Scheduler.postprocess(batch, result)      (tokens appended, stops checked, pages freed)

An EXTEND step feeds each request's uncached tokens (a prefill, a prefill chunk, a recompute
after preemption) and samples the next token of those whose prompt is then all fed. A DECODE
step gives every request one or more new tokens: a plain decode step, or under speculation the
request's draft tree verified in one target forward (the worker drafts the tree first).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor

from .request import Req
from .tree_shape import TreeShape


class StepKind(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    kind: StepKind
    reqs: tuple[Req, ...]
    # EXTEND: the tokens each request feeds after its num_cached cached ones; DECODE: empty
    feeds: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.kind is StepKind.EXTEND and len(self.feeds) != len(self.reqs):
            raise ValueError("an extend step names the tokens every request feeds")
        if self.kind is StepKind.DECODE and self.feeds:
            raise ValueError("a decode step feeds what the worker drafts, not scheduled tokens")


@dataclass(frozen=True, slots=True)
class SpecOutcome:
    """A speculative verify step of one request."""

    shape: TreeShape  # the shape its tree was drafted for (NO_SPEC: a plain step)
    accepted: int  # draft tokens accepted
    depth: int  # depth of the verified tree


@dataclass(frozen=True, slots=True)
class ReqOutput:
    """One request's share of a step."""

    num_cached: int  # committed positions after the step
    tokens: tuple[int, ...] = ()  # new tokens in order (none: a prefill chunk)
    logprobs: Tensor | None = None  # [len(tokens), vocab] raw log-probabilities behind each token
    # prompt logprobs (the first prefill of a request that asks for them): rows [n, vocab]
    # scoring prompt tokens prompt_logprob_start .. prompt_logprob_start + n - 1
    prompt_logprobs: Tensor | None = None
    prompt_logprob_start: int = 0
    spec: SpecOutcome | None = None
    error: BaseException | None = None  # this request's own work failed; the batch went on

    def __post_init__(self) -> None:
        if self.logprobs is not None and self.logprobs.shape[0] != len(self.tokens):
            raise ValueError("one logprob row per token")


@dataclass(frozen=True, slots=True)
class StepResult:
    outputs: tuple[ReqOutput, ...]  # one per request of the batch, in its order
