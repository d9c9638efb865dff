"""The start-up step-cost measurement's pure parts: the monotone table, the request groups
held at once, the interleaved rounds."""

from __future__ import annotations

import itertools

from specdec.step_costs import _groups, _interleaved_ms, monotone


def test_monotone_lifts_cells_that_noise_made_cheaper_than_less_work() -> None:
    table = ((12.0, 11.0, 14.0), (25.0, 30.0, 29.0), (24.0, 41.0, 55.0))
    assert monotone(table) == ((12.0, 12.0, 14.0), (25.0, 30.0, 30.0), (25.0, 41.0, 55.0))
    assert monotone(((1.0, 2.0), (3.0, 4.0))) == ((1.0, 2.0), (3.0, 4.0))  # already monotone: unchanged


def test_groups_hold_consecutive_batch_sizes_that_fit_together() -> None:
    assert _groups((1, 2, 4, 8, 16), 100) == [(1, 2, 4, 8, 16)]
    assert _groups((1, 2, 4, 8, 16), 16) == [(1, 2, 4, 8), (16,)]
    assert _groups((1, 2, 4, 8), 6) == [(1, 2), (4,), (8,)]


def test_interleaved_rounds_time_every_cell_once_a_round() -> None:
    calls: list[str] = []
    cells = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = _interleaved_ms(cells, repeats=3)
    assert set(out) == {"a", "b", "c"} and all(v >= 0.0 for v in out.values())
    assert calls == list("abc") + list(itertools.chain.from_iterable(["a", "b", "c"] for _ in range(3)))
