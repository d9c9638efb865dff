"""Copy shapes: adaptive speculation verifying a request's own copied text without a draft
forward (specdec/copy_stats.py, the chooser's copy shapes, specdec/spec_worker.py). Pure
parts by hand; end to end on a tiny Llama 4 with a random EAGLE3 head, greedy output equals
plain decoding and sampled output follows the target while copy shapes are taken."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from specdec.accept_stats import expected_accepted
from specdec.copy_stats import MAX_DEPTH, CopyStats
from specdec.draft.ngram_merge import copy_accept
from specdec.tree_chooser import OnlineCosts, choose_shapes
from specdec.tree_shape import NO_SPEC, TreeShape, candidate_shapes, copy_shape, copy_shapes

from . import test_adaptive_spec as adaptive
from .test_adaptive_spec import _chi2_fits, second_token_marginal
from .test_spec_e2e import NEW_TOKENS, PROMPT_LENGTHS
from .test_tree_chooser import costs, q_all
from .tiny_models import VOCAB, Checkpoint, random_prompts

ENVELOPE = TreeShape(6, 4, 16)
SHAPES = candidate_shapes(ENVELOPE)
COPIES = copy_shapes(ENVELOPE)


def test_copy_shapes_are_chains_without_drafting_steps() -> None:
    s = copy_shape(4)
    assert s.copy and s.speculates and not s.drafts and s.label == "copy3"
    assert NO_SPEC.drafts is False and NO_SPEC.speculates is False
    assert TreeShape(3, 1, 4).drafts and not TreeShape(3, 1, 4).copy
    assert [c.num_draft_tokens - 1 for c in COPIES] == [1, 2, 3, 4, 6, 8, 11, 15]
    assert copy_shapes(TreeShape(2, 1, 3)) == (copy_shape(2), copy_shape(3))
    assert all(c.fits(ENVELOPE) for c in COPIES)
    with pytest.raises(ValueError, match="copy"):
        copy_shape(1)  # no copied token
    with pytest.raises(ValueError, match="copy"):
        TreeShape(2, 1, 3, copy=True)  # a copy shape runs no drafting step


def test_copy_stats_start_at_the_measured_priors_and_follow_the_evidence() -> None:
    s = CopyStats()
    p = copy_accept(4)
    assert s.q(True, 4)[0] == pytest.approx(p) and s.q(True, 9) == s.q(True, 4)  # 4+ share a bucket
    assert s.expected(True, 4, [0, 1, 3]) == pytest.approx([0.0, p, p + p**2 + p**3])
    assert s.expected(True, 0, [3]) == [0.0]  # no match, nothing to copy
    for _ in range(60):  # 1-token matches whose first copy is always rejected
        s.observe(True, 1, 5, 0)
    assert s.q(True, 1)[0] < 0.05 and s.q(True, 1)[1] == pytest.approx(copy_accept(1))  # depth 2 unseen
    assert s.q(True, 4)[0] == pytest.approx(p) and s.q(False, 1)[0] == pytest.approx(copy_accept(1))
    for _ in range(60):  # 4+-token matches of sampled requests, fully accepted chains of 10
        s.observe(False, 6, 10, 10)
    assert all(q > 0.97 for q in s.q(False, 4))  # depths past MAX_DEPTH share the last count
    assert s.exposures[False][3][MAX_DEPTH - 1] > s.exposures[False][3][0]
    with pytest.raises(ValueError, match="accepted"):
        s.observe(True, 2, 3, 4)


def _exhaustive(c: Any, shapes: Any, expected: list[list[float]]) -> tuple[TreeShape, ...]:
    """choose_shapes without its shortcuts: every shape at every count, by step_ms."""
    from specdec.tree_chooser import MARGIN, _counts

    batch = len(expected)
    plain = c.step_ms(batch, NO_SPEC, 0, 0.0)
    best, best_tps = (NO_SPEC,) * batch, MARGIN * 1000.0 * batch / plain
    for s, shape in enumerate(shapes):
        if not shape.speculates:
            continue
        order = sorted(range(batch), key=lambda i: -expected[i][s])
        for j in _counts(batch):
            gain = sum(expected[i][s] for i in order[:j])
            tps = 1000.0 * (batch + gain) / c.step_ms(batch, shape, j, gain)
            if tps > best_tps:
                best, best_tps = tuple(shape if k in order[:j] else NO_SPEC for k in range(batch)), tps
    return best


def test_the_chooser_equals_the_exhaustive_search() -> None:
    rng = random.Random(7)
    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 4: [11.0, 13.0, 17.0, 25.0, 41.0],
               16: [16.0, 20.0, 28.0, 44.0, 76.0]}, draft_ms=1.0)
    shapes = SHAPES + COPIES
    for _ in range(300):
        batch = rng.choice([1, 2, 3, 5, 8, 16])
        expected = [expected_accepted(q_all(rng.random()), SHAPES) + (
            _copy_part(rng.random(), rng.randint(1, 15), rng.randint(1, 6)) if rng.random() < 0.3 else [0.0] * len(COPIES))
            for _ in range(batch)]
        assert choose_shapes(c, shapes, expected).shapes == _exhaustive(c, shapes, expected)


def _copy_part(p: float, length: int, n: int) -> list[float]:
    stats = CopyStats()
    for _ in range(8):
        stats.observe(True, n, 8, round(8 * p))
    return stats.expected(True, n, [min(length, s.num_draft_tokens - 1) for s in COPIES])


def test_a_requests_own_failed_copies_lower_its_estimate_only() -> None:
    """Engine-wide evidence (many requests whose 4+-token matches copy well) and one request
    whose chains are rejected at once: its estimate falls, a fresh request's stays the engine's."""
    engine, bad, fresh = CopyStats(), CopyStats(), CopyStats()
    for _ in range(40):
        engine.observe(True, 5, 8, 8)
    for _ in range(6):
        for s in (engine, bad):
            s.observe(True, 5, 8, 0)
    assert fresh.expected(True, 5, [8], engine) == pytest.approx(engine.expected(True, 5, [8]))
    assert engine.expected(True, 5, [8])[0] > 3.0
    assert bad.expected(True, 5, [8], engine)[0] < 0.5 * engine.expected(True, 5, [8])[0]
    assert bad.q(True, 5, engine)[1] == pytest.approx(engine.q(True, 5)[1])  # depth 2: no evidence of its own


def _expected(eagle_q: float, copy_len: int, n: int) -> list[float]:
    """One request's expected accepted drafts over SHAPES + COPIES: EAGLE3 at eagle_q, a copy
    chain of copy_len tokens from an n-token match at the prior."""
    stats = CopyStats()
    return expected_accepted(q_all(eagle_q), SHAPES) + stats.expected(
        True, n, [min(copy_len, c.num_draft_tokens - 1) for c in COPIES])


def test_a_long_copy_match_picks_a_copy_shape_where_drafting_would_not_pay() -> None:
    # memory-bound verify (flat in tokens), a draft forward costing a fifth of a step
    c = costs({1: [10.0, 10.2, 10.4, 10.8, 11.6]}, draft_ms=2.0)
    shapes = SHAPES + COPIES
    (weak,) = choose_shapes(c, SHAPES, [expected_accepted(q_all(0.1), SHAPES)]).shapes
    assert weak == NO_SPEC  # the draft alone does not pay
    (copied,) = choose_shapes(c, shapes, [_expected(0.1, 12, 5)]).shapes
    assert copied.copy and copied.num_draft_tokens - 1 >= 8  # p = 0.9 per token: a long chain
    (short,) = choose_shapes(c, shapes, [_expected(0.1, 2, 5)]).shapes
    assert short.copy and short.num_draft_tokens == 3  # no longer than the chain there is
    (none,) = choose_shapes(c, shapes, [_expected(0.1, 0, 0)]).shapes
    assert none == NO_SPEC


def test_under_load_copies_go_to_the_requests_that_have_them() -> None:
    # at 16 requests each extra token costs a quarter of a plain token (compute-bound
    # at 0.9 ms a token, no copy would pay by the chooser's 3 % margin)
    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 16: [16.0, 20.0, 28.0, 44.0, 76.0]}, draft_ms=2.0)
    shapes = SHAPES + COPIES
    batch = [_expected(0.1, 0, 0)] * 15 + [_expected(0.1, 12, 5)]
    chosen = choose_shapes(c, shapes, batch).shapes
    assert chosen[:15] == (NO_SPEC,) * 15 and chosen[15].copy
    (alone,) = choose_shapes(c, shapes, [batch[-1]]).shapes
    assert chosen[15].num_draft_tokens <= alone.num_draft_tokens


def test_one_slow_copy_step_teaches_nothing() -> None:
    table = costs({1: [10.0, 10.2, 10.4, 10.8, 11.6]}, overhead=0.0)
    online = OnlineCosts(table)
    online.observe([copy_shape(5)], [copy_shape(5)], 4.0, 50.0)  # (a page fault, say)
    assert online.costs.plain_overhead_ms == 0.0 and online.costs.draft_step_overhead_ms == 0.0
    assert online.costs.copy_verify_scale == (1.0,) * 5  # the prior outvotes one step
    assert table.draft_forward_ms([copy_shape(5)], 4.0) == 0.0
    assert table.step_ms(1, copy_shape(5), 1, 3.0) == pytest.approx(table.target(1, 5))


def test_copy_steps_dearer_than_the_table_stop_copies_at_that_batch_only() -> None:
    """Verifying four requests' long chains beside 12 one-token rows takes 1.6x what the table
    says (served contexts are longer than the table's): after a run of such steps the
    chooser stops copying at batch 16, and still copies at batch 1, whose steps it has not seen."""
    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 16: [16.0, 20.0, 28.0, 44.0, 76.0]}, draft_ms=2.0)
    shapes = SHAPES + COPIES
    batch = [_expected(0.1, 0, 0)] * 12 + [_expected(0.1, 12, 5)] * 4
    assert any(s.copy for s in choose_shapes(c, shapes, batch).shapes)
    online = OnlineCosts(c)
    verified = [copy_shape(13)] * 4 + [NO_SPEC] * 12
    for _ in range(8):
        online.observe([NO_SPEC] * 16, [NO_SPEC] * 16, 0.0, 16.0)  # plain steps: the table's
        online.observe(verified, verified, 10.0, 1.6 * c.verify_forward_ms(verified))
    learnt = online.costs
    assert learnt.copy_verify_scale[-1] == pytest.approx(1.6) and learnt.copy_verify_scale[0] == 1.0
    assert learnt.verify_forward_ms(verified) == pytest.approx(1.6 * c.verify_forward_ms(verified))
    assert choose_shapes(learnt, shapes, batch).shapes == (NO_SPEC,) * 16
    (alone,) = choose_shapes(learnt, shapes, [batch[-1]]).shapes
    assert alone.copy


# ---- end to end ---------------------------------------------------------------------------------
ADAPTIVE = {"speculative_num_steps": 4, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6,
            "speculative_adaptive": "on", "speculative_ngram_merge": True}


target = adaptive.target  # the same tiny Llama 4 and random EAGLE3 head (module fixtures)
draft = adaptive.draft


def _engine(target: Checkpoint, draft: Path, **kw: Any) -> Any:
    return target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft), **{**ADAPTIVE, **kw})


def _copies_pay(engine: Any) -> None:
    """Costs under which any copy pays and drafting never does: verifies nearly free, draft
    forwards 1 s (the chooser's own logic then picks copy shapes wherever a chain exists)."""
    table = engine.spec.costs.measured
    cheap = tuple(tuple(row[0] if i == 0 else row[0] + 0.001 for i, _ in enumerate(row)) for row in table.target_ms)
    engine.spec.costs = OnlineCosts(replace(table, target_ms=cheap, draft_ms=tuple((1000.0,) * len(r) for r in table.draft_ms),
                                            draft_step_overhead_ms=0.0, verify_overhead_ms=0.0, plain_overhead_ms=0.0))
    engine.spec.costs.observe = lambda *a: None  # type: ignore[method-assign]


def _copy_steps(outs: list[dict[str, Any]]) -> int:
    used: Counter[str] = Counter()
    for o in outs:
        used.update(o["meta_info"]["spec_tree_shapes"])
    return sum(v for k, v in used.items() if k.startswith("copy"))


def test_greedy_output_equals_plain_decoding_with_copy_shapes(target: Checkpoint, draft: Path) -> None:
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS}
    plain = [o["output_ids"] for o in target.engine().generate(input_ids=prompts, sampling_params=params)]
    engine = _engine(target, draft, page_size=1)
    assert engine.spec.copy_shapes == copy_shapes(TreeShape(4, 2, 6))
    _copies_pay(engine)
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == plain
    assert _copy_steps(outs) > 0 and engine.metrics.accept_length > 1.0
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    # shapes rotating through drafted trees, copies and none, request by request and step by step
    rotating = _engine(target, draft)
    shapes = rotating.spec.shapes + rotating.spec.copy_shapes
    calls = itertools.count()
    rotating.spec.choose = lambda reqs, b: [shapes[(next(calls) + i) % len(shapes)] for i in range(len(reqs))]
    outs = rotating.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == plain
    assert _copy_steps(outs) > 0
    assert rotating.allocator.num_free_pages == rotating.allocator.num_pages


def test_copy_shapes_only_with_adaptive_speculation_and_merged_copies(target: Checkpoint, draft: Path) -> None:
    assert _engine(target, draft, speculative_ngram_merge=False).spec.copy_shapes == ()
    assert _engine(target, draft, speculative_adaptive="off").spec.copy_shapes == ()


def test_sampled_output_follows_the_target_with_copy_shapes(target: Checkpoint, draft: Path) -> None:
    """As test_adaptive_spec's sampled test, every request's step taking a copy shape: every
    token of the vocabulary is in the prompt, so whatever the first sampled token is, it
    matches and a copy chain follows; the second token (emitted by the copy step's
    verification) fits the target's exact marginal (chi-square, p > 0.001). (The real chooser
    soon stops copying here: at temperature 2 a 1-token match's copy is almost never accepted,
    and CopyStats learns it.)"""
    temperature, n = 2.0, 1500
    prompt = random_prompts((9,), seed=3)[0] + random.Random(4).sample(range(VOCAB), VOCAB)
    exact = second_token_marginal(target.engine(), prompt, temperature)
    engine = _engine(target, draft, max_total_tokens=8192)
    engine.spec.choose = lambda reqs, b: [copy_shape(5)] * len(reqs)
    outs = engine.generate(input_ids=[prompt] * n, sampling_params=[
        {"temperature": temperature, "max_new_tokens": 2, "seed": s} for s in range(n)])
    assert _copy_steps(outs) > 0.9 * n
    chi2, critical = _chi2_fits(Counter(o["output_ids"][1] for o in outs), exact, n)
    assert chi2 < critical, (chi2, critical)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
