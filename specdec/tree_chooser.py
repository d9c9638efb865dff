"""Which tree shape each request's next speculative step takes: a pure function of the measured
step costs of this machine and model, each request's acceptance estimates, and the batch.

Expected tokens per second of a step = (sum over requests of 1 + expected accepted drafts)
/ predicted step time. The chooser tries, for every candidate shape, giving it to the j requests
that gain most from it (j = 1..B) and no speculation to the rest, and keeps the best, the plain
step included: speculation happens only where it is predicted to pay. A large batch makes the
target's forward over extra tree tokens and the draft forwards costlier relative to the tokens
plain decoding already gets, so trees shrink and then stop.
"""

from __future__ import annotations

import bisect
import functools
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .tree_shape import NO_SPEC, TreeShape


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear in x, extrapolated linearly past the ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _target_row(tokens: Sequence[int], row: Sequence[float], tokens_per_req: float) -> float:
    """A batch's target time at `tokens_per_req` from its row of the table (`StepCosts.target`)."""
    if tokens_per_req <= 1.0 or len(tokens) < 3 or tokens[0] != 1:
        return _interp(tokens, row, tokens_per_req)
    return max(row[0], _interp(tokens[1:], row[1:], tokens_per_req))


@functools.lru_cache(maxsize=256)
def _at_batch(batch: tuple[int, ...], table: tuple[tuple[float, ...], ...], b: int) -> tuple[float, ...]:
    """The table's row for batch size b, interpolated between the measured batch sizes."""
    return tuple(_interp(batch, [row[j] for row in table], b) for j in range(len(table[0])))


@dataclass(frozen=True, slots=True)
class StepCosts:
    """Measured milliseconds (specdec/step_costs.py measures them).

    target_ms[i][j]: the target's forward + logits for batch[i] requests of tokens[j] tokens each;
    draft_ms[i][j]: one draft forward + draft logits for batch[i] requests of rows[j] rows each;
    draft_step_overhead_ms: host work per speculating request per drafting step (tree building);
    verify_overhead_ms: host work per speculating request per verify step;
    plain_overhead_ms: host work of any decode step beyond the target's forward (sampling,
    bookkeeping). The engine keeps the last three up to date from the steps it times
    (`OnlineCosts`): the start-up measurement cannot see all of the host's work.
    copy_verify_scale[k]: measured / tabled target time of a step verifying copy chains (and no
    drafted tree) at a batch of bucket k (`batch_bucket`), learnt from such steps (empty or
    missing buckets: 1.0). Served requests' contexts are longer than the table's 128-token
    prefix and a verify's attention grows with them (on a 2-core AVX2 EPYC at batch 8-16 the
    learnt scale settled at 1.2-1.3).
    """

    batch: tuple[int, ...]
    tokens: tuple[int, ...]
    target_ms: tuple[tuple[float, ...], ...]
    rows: tuple[int, ...]
    draft_ms: tuple[tuple[float, ...], ...]
    draft_step_overhead_ms: float
    verify_overhead_ms: float
    plain_overhead_ms: float = 0.0
    copy_verify_scale: tuple[float, ...] = ()

    def copy_scale(self, b: int) -> float:
        k = batch_bucket(b)
        return self.copy_verify_scale[k] if k < len(self.copy_verify_scale) else 1.0

    def target(self, b: int, tokens_per_req: float) -> float:
        """A step where nobody speculates (1 token each) is the measured plain decode; any tree
        in the batch takes the verify path (tree masks, attention per request), whose fixed
        cost the one-token column does not show: a mixed batch's cost then comes from the
        multi-token columns alone, extrapolated below 2 tokens a request."""
        return _target_row(self.tokens, _at_batch(self.batch, self.target_ms, b), tokens_per_req)

    def draft(self, b: int, rows_per_req: float) -> float:
        return _interp(self.rows, _at_batch(self.batch, self.draft_ms, b), rows_per_req)

    def step_ms(self, batch: int, shape: TreeShape, speculating: int, accepted: float) -> float:
        """One step of `batch` requests, `speculating` of them with `shape` (the others plain)
        whose expected accepted drafts sum to `accepted`."""
        return self.step_ms_at(batch, (speculating,))(shape, speculating, accepted)

    def step_ms_at(self, batch: int, counts: Sequence[int]) -> Callable[[TreeShape, int, float], float]:
        """`step_ms(batch, shape, j, accepted)` for j in `counts`, with the table's rows for
        these batch sizes looked up once (the chooser asks it ~150 times a choice at batch 16):
        forward_ms + host_ms of [shape] * j + [NO_SPEC] * (batch - j), in O(1)."""
        row = _at_batch(self.batch, self.target_ms, batch)
        drafts = {j: _at_batch(self.batch, self.draft_ms, j) for j in counts if j > 0}
        tokens, rows = self.tokens, self.rows
        po, dso, vo = self.plain_overhead_ms, self.draft_step_overhead_ms, self.verify_overhead_ms
        plain = _target_row(tokens, row, 1.0) + po
        scale = self.copy_scale(batch)
        # what depends on the shape's size and j only, once each (shapes share draft-token
        # counts and frontier widths): the same floats, looked up
        verify_at: dict[tuple[int, int], float] = {}
        frontier_at: dict[tuple[int, int], float] = {}

        def step(shape: TreeShape, j: int, accepted: float) -> float:
            if not shape.speculates or j == 0:
                return plain
            n = shape.num_draft_tokens
            ms = verify_at.get((n, j))
            if ms is None:
                ms = verify_at[n, j] = _target_row(tokens, row, (j * n + batch - j) / batch)
            if not shape.drafts:  # copies alone
                ms *= scale
            else:
                dr = drafts[j]
                ms += _interp(rows, dr, 1.0 + accepted / j)
                if shape.num_steps > 1:
                    w = min(shape.topk, n - 1)
                    frontier = frontier_at.get((w, j))
                    if frontier is None:
                        frontier = frontier_at[w, j] = _interp(rows, dr, w)
                    ms += (shape.num_steps - 1) * frontier
            return ms + po + j * (shape.num_steps * dso + vo)

        return step

    def forward_ms(self, shapes: Sequence[TreeShape], accepted: float) -> float:
        """The target's and the draft's forwards of a step whose requests take `shapes`."""
        return self.verify_forward_ms(shapes) + self.draft_forward_ms(shapes, accepted)

    def verify_forward_ms(self, shapes: Sequence[TreeShape]) -> float:
        """The target's forward + logits over every request's tree (copy chains and no drafted
        tree: times `copy_scale`)."""
        ms = self.target(len(shapes), sum(s.num_draft_tokens for s in shapes) / len(shapes))
        if any(s.speculates for s in shapes) and not any(s.drafts for s in shapes):
            ms *= self.copy_scale(len(shapes))
        return ms

    def draft_forward_ms(self, shapes: Sequence[TreeShape], accepted: float) -> float:
        """The draft's extend over the committed tokens and its frontier forwards, for the
        requests that draft (`accepted`: their accepted drafts in all; copy shapes run no
        draft forward)."""
        spec = [s for s in shapes if s.drafts]
        if not spec:
            return 0.0
        j = len(spec)
        t = self.draft(j, 1.0 + accepted / j)
        for step in range(2, max(s.num_steps for s in spec) + 1):
            deep = [s for s in spec if s.num_steps >= step]
            t += self.draft(len(deep), sum(min(s.topk, s.num_draft_tokens - 1) for s in deep) / len(deep))
        return t

    def host_ms(self, shapes: Sequence[TreeShape]) -> float:
        """Host work of a step beyond the forwards."""
        spec = [s for s in shapes if s.speculates]
        return (self.plain_overhead_ms + sum(s.num_steps for s in spec) * self.draft_step_overhead_ms
                + len(spec) * self.verify_overhead_ms)


BATCH_BUCKETS = 5  # batch 1, 2-3, 4-7, 8-15, 16+


def batch_bucket(b: int) -> int:
    return min(max(b, 1).bit_length() - 1, BATCH_BUCKETS - 1)


class OnlineCosts:
    """The measured table, with its host-work terms learnt from the steps the engine times:
    a plain step's time beyond the target's forward, and a speculative step's beyond its
    forwards and the plain part, per drafting step of a speculating request; and, per batch
    bucket, how much dearer than the table a step verifying copy chains alone is
    (`copy_verify_scale`). Each is the median of the last `WINDOW` steps of its kind (a slow
    step, a page fault or a neighbour's burst, does not move it); the copy scales start from
    `COPY_PRIOR` steps at 1.0, so that one step alone never moves them."""

    WINDOW = 31
    COPY_PRIOR = 4
    COPY_SCALE_RANGE = (0.5, 4.0)  # (a step's ratio is clamped to it: a stall is not a cost)

    def __init__(self, measured: StepCosts) -> None:
        self.measured = measured
        self._plain: deque[float] = deque([measured.plain_overhead_ms], maxlen=self.WINDOW)
        self._per_step: deque[float] = deque([measured.draft_step_overhead_ms + measured.verify_overhead_ms],
                                             maxlen=self.WINDOW)
        self._copy: list[deque[float]] = [deque([measured.copy_scale(2**k)] * self.COPY_PRIOR, maxlen=self.WINDOW)
                                          for k in range(BATCH_BUCKETS)]

    @property
    def plain_ms(self) -> float:
        return statistics.median(self._plain)

    @property
    def per_step_ms(self) -> float:
        return statistics.median(self._per_step)

    @property
    def copy_verify_scale(self) -> tuple[float, ...]:
        return tuple(statistics.median(d) for d in self._copy)

    @property
    def costs(self) -> StepCosts:
        return replace(self.measured, plain_overhead_ms=self.plain_ms, draft_step_overhead_ms=self.per_step_ms,
                       verify_overhead_ms=0.0, copy_verify_scale=self.copy_verify_scale)

    def observe(self, verified: Sequence[TreeShape], drafted: Sequence[TreeShape], accepted: float,
                ms: float) -> None:
        """A step took `ms`: it verified trees of shapes `verified` (accepting `accepted` drafts
        in all), then drafted the next trees, of shapes `drafted`."""
        m = self.measured
        forward = m.verify_forward_ms(verified)
        rest = ms - forward - m.draft_forward_ms(drafted, accepted)
        steps = sum(s.num_steps for s in drafted if s.drafts)
        if steps == 0:
            if not any(s.speculates for s in verified):
                self._plain.append(rest)
            elif forward > 0.0:  # copies alone: how much dearer than the table their verify was
                lo, hi = self.COPY_SCALE_RANGE
                ratio = (ms - self.plain_ms) / (forward / m.copy_scale(len(verified)))
                self._copy[batch_bucket(len(verified))].append(min(max(ratio, lo), hi))
        else:
            self._per_step.append(max(0.0, (rest - self.plain_ms) / steps))


@dataclass(frozen=True, slots=True)
class Choice:
    shapes: tuple[TreeShape, ...]  # one per request, in the batch's order
    tokens_per_s: float  # predicted
    step_ms: float  # predicted


MARGIN = 1.03  # speculate only where predicted to beat plain decoding by 3 % (model error)


def _counts(batch: int) -> list[int]:
    """How many of the batch's best requests to try a shape on: every count up to 4, then
    about 1.5x apart, and the whole batch."""
    out, j = [], 1
    while j < batch:
        out.append(j)
        j = j + 1 if j < 4 else int(j * 1.5)
    return [*out, batch]


def choose_shapes(costs: StepCosts, shapes: Sequence[TreeShape], expected: Sequence[Sequence[float]]) -> Choice:
    """expected[i][s] = request i's expected accepted drafts with shapes[s] (0 for NO_SPEC).
    Returns the shapes maximising predicted tokens per second of the whole batch; plain
    decoding unless speculation is predicted to win by `MARGIN`."""
    batch = len(expected)
    counts = _counts(batch)
    step_ms = costs.step_ms_at(batch, counts)
    plain = step_ms(NO_SPEC, 0, 0.0)
    best = Choice((NO_SPEC,) * batch, MARGIN * 1000.0 * batch / plain, plain)
    for s, shape in enumerate(shapes):
        if not shape.speculates:
            continue
        column = [e[s] for e in expected]
        # a copy shape gains nothing on requests without a chain (expected 0) and costs more
        # with every request it is given: past the first count holding all that gain, none wins
        gaining = batch if shape.drafts else sum(1 for v in column if v > 0.0)
        if gaining == 0:
            continue
        order = sorted(range(batch), key=column.__getitem__, reverse=True)
        prefix = [0.0]
        for i in order:
            prefix.append(prefix[-1] + column[i])
        for j in counts:
            gain = prefix[j]
            ms = step_ms(shape, j, gain)
            tps = 1000.0 * (batch + gain) / ms
            if tps > best.tokens_per_s:
                chosen = set(order[:j])
                best = Choice(tuple(shape if k in chosen else NO_SPEC for k in range(batch)), tps, ms)
            if j >= gaining:
                break
    if not any(s.speculates for s in best.shapes):
        return Choice(best.shapes, 1000.0 * batch / plain, plain)
    return best
