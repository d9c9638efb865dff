"""Several engine requests behind one HTTP request: `n` choices, `best_of` candidates and a list
of prompts.

Siblings of one prompt share its KV: every request after the first names the first as its
`prefix_source`, and the scheduler starts it on the first one's whole prompt pages once they
are computed (specdec/scheduler.py `_share_prefix`), so `n` choices of a long prompt prefill it
about once. A seeded request's choice `i` is seeded `seed + i` (the same seed for every choice
would give `n` copies of one sample).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from specdec.engine_loop import Update
from specdec.request import Req
from specdec.sampling_params import SamplingParams

from .state import ApiError

MAX_CHOICES = 32  # n and best_of per prompt (OpenAI allows up to 128; each is a full request here)


def check_counts(n: int, best_of: int | None, stream: bool) -> int:
    """The number of requests per prompt; OpenAI's rules: 1 <= n <= best_of, no best_of > n
    when streaming (the best are known only at the end)."""
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    if best_of is None:
        return n
    if not n <= best_of <= MAX_CHOICES:
        raise ApiError(400, f"best_of must be in [n, {MAX_CHOICES}] (n = {n}), got {best_of}", "best_of")
    if stream and best_of > n:
        raise ApiError(400, "best_of > n cannot be streamed: the best choices are known only at the end",
                       "best_of")
    return best_of


def sibling_params(params: SamplingParams, count: int) -> list[SamplingParams]:
    """One SamplingParams per sibling: choice i of a seeded request is seeded seed + i."""
    if params.seed is None:
        return [params] * count
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(count)]


def share_prompt(reqs: Sequence[Req]) -> None:
    """Siblings of one prompt take its KV from the first of them."""
    for req in reqs[1:]:
        req.prefix_source = reqs[0]


def cumulative_logprob(result: dict[str, object]) -> float:
    """The sum of the sampled tokens' log-probabilities (best_of's ranking, as vLLM's)."""
    meta = result["meta_info"]
    assert isinstance(meta, dict)
    return sum(float(lp or 0.0) for lp, _tid, _text in meta["output_token_logprobs"])


def best_indices(results: Sequence[dict[str, object]], n: int) -> list[int]:
    """Indices of the `n` candidates of highest cumulative log-probability, best first (ties:
    the earlier candidate)."""
    order = sorted(range(len(results)), key=lambda i: (-cumulative_logprob(results[i]), i))
    return order[:n]


async def merged(queues: Sequence[asyncio.Queue[Update]]) -> AsyncIterator[tuple[int, Update]]:
    """The updates of several requests as they arrive, each with its request's index, until
    every request has sent its final update."""
    if len(queues) == 1:
        while True:
            update = await queues[0].get()
            yield 0, update
            if update.finished:
                return
    pending = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                update = task.result()
                yield i, update
                if not update.finished:
                    pending[asyncio.ensure_future(queues[i].get())] = i
    finally:
        for task in pending:
            task.cancel()
