"""Adaptive speculation's pure parts: candidate shapes, acceptance statistics, the chooser."""

from __future__ import annotations

import pytest

from specdec.accept_stats import AcceptStats, best_path_weights, expected_accepted
from specdec.tree import DraftTree
from specdec.tree_chooser import StepCosts, choose_shapes
from specdec.tree_shape import NO_SPEC, TreeShape, candidate_shapes

ENVELOPE = TreeShape(6, 4, 16)
SHAPES = candidate_shapes(ENVELOPE)


def costs(target: dict[int, list[float]], draft_ms: float = 0.5, overhead: float = 0.05) -> StepCosts:
    """target[b] = ms for b requests of 1, 2, 4, 8, 16 tokens each; a flat draft cost."""
    batch = tuple(sorted(target))
    return StepCosts(batch=batch, tokens=(1, 2, 4, 8, 16), target_ms=tuple(tuple(target[b]) for b in batch),
                     rows=(1, 4), draft_ms=tuple((draft_ms, draft_ms) for _ in batch),
                     draft_step_overhead_ms=overhead, verify_overhead_ms=overhead)


def q_all(p: float, depth: int = 6, ranks: int = 4) -> list[list[float]]:
    return [[p if r == 0 else p * 0.2 for r in range(ranks)] for _ in range(depth)]


def test_candidate_shapes_are_valid_and_fit_the_envelope() -> None:
    assert SHAPES[0] == NO_SPEC and NO_SPEC.label == "none"
    assert TreeShape(3, 1, 4) in SHAPES and TreeShape(6, 1, 7) in SHAPES
    assert all(s.fits(ENVELOPE) for s in SHAPES)
    assert candidate_shapes(TreeShape(2, 1, 3)) == (NO_SPEC, TreeShape(1, 1, 2), TreeShape(2, 1, 3))
    with pytest.raises(ValueError, match="chain"):
        TreeShape(3, 1, 5)
    with pytest.raises(ValueError, match="cannot draft"):
        TreeShape(2, 2, 9)


def test_stats_count_exposures_and_hits_per_depth_and_rank() -> None:
    #      0            children in rank order: 0 -> (1, 2), 1 -> (3,)
    #     / \
    #    1   2
    #    |
    #    3
    tree = DraftTree((10, 11, 12, 13), (-1, 0, 0, 1))
    s = AcceptStats(max_depth=3, max_rank=2)
    s.observe(tree, [1, 3])  # rank 0 accepted at depth 1, rank 0 at depth 2, then the leaf
    assert s.exposures == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert s.hits == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    s.observe(tree, [2])  # the second child matched; node 2 is a leaf
    assert s.hits[0] == pytest.approx([0.97, 1.0]) and s.exposures[0] == pytest.approx([1.97, 1.97])
    s.observe(DraftTree.chain([5]), [])  # a root-only step is no evidence
    assert s.exposures[0] == pytest.approx([1.97, 1.97])


def test_estimates_move_from_the_prior_toward_the_evidence() -> None:
    s = AcceptStats(max_depth=2, max_rank=1)
    prior = s.q()[0][0]
    for _ in range(40):
        s.observe(DraftTree.chain([1, 2, 3]), [1, 2])  # always fully accepted
    assert prior < s.q()[0][0] <= 1.0 and s.q()[0][0] > 0.85  # ~33 decayed counts vs a prior of 6


def test_expected_accepted_of_chains_and_bushy_trees() -> None:
    q = [[0.8, 0.1], [0.5, 0.1]]
    chain1, chain2 = TreeShape(1, 1, 2), TreeShape(2, 1, 3)
    assert expected_accepted(q, [NO_SPEC, chain1, chain2]) == pytest.approx([0.0, 0.8, 0.8 + 0.4])
    # topk 2, 3 nodes: the best rank paths are (0) 0.8, (0,0) 0.4, (1) 0.1
    assert best_path_weights(q, 2, 2, 3) == pytest.approx([0.8, 0.4, 0.1])
    assert expected_accepted(q, [TreeShape(2, 2, 4)]) == pytest.approx([1.3])


def test_speculation_that_cannot_pay_is_not_chosen() -> None:
    # verifying n tokens costs n plain steps: no tree can win
    c = costs({1: [10.0, 20.0, 40.0, 80.0, 160.0]})
    choice = choose_shapes(c, SHAPES, [expected_accepted(q_all(0.6), SHAPES)])
    assert choice.shapes == (NO_SPEC,)


def test_a_cheap_verify_with_high_acceptance_picks_a_deep_tree() -> None:
    c = costs({1: [10.0, 10.2, 10.4, 10.8, 11.6]}, draft_ms=0.3)
    choice = choose_shapes(c, SHAPES, [expected_accepted(q_all(0.95), SHAPES)])
    (shape,) = choice.shapes
    assert shape.num_steps >= 5 and choice.tokens_per_s > 100.0 * 4
    # low acceptance with the same costs: a short tree, or none
    (low,) = choose_shapes(c, SHAPES, [expected_accepted(q_all(0.15), SHAPES)]).shapes
    assert low.num_steps <= 2


def test_a_large_batch_shrinks_the_trees() -> None:
    # flat at batch 1 (memory-bound), compute-bound at batch 16: tree tokens cost in proportion
    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 16: [16.0, 30.0, 58.0, 114.0, 226.0]})
    q = expected_accepted(q_all(0.7), SHAPES)
    (one,) = choose_shapes(c, SHAPES, [q]).shapes
    many = choose_shapes(c, SHAPES, [q] * 16).shapes
    assert one.num_draft_tokens >= 4
    assert max(s.num_draft_tokens for s in many) < one.num_draft_tokens


def test_requests_that_accept_little_stop_speculating_first() -> None:
    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 4: [11.0, 13.0, 17.0, 25.0, 41.0]})
    good, bad = expected_accepted(q_all(0.9), SHAPES), expected_accepted(q_all(0.05), SHAPES)
    shapes = choose_shapes(c, SHAPES, [good, bad, good, bad]).shapes
    assert shapes[0].speculates and shapes[2].speculates
    assert shapes[1] == NO_SPEC and shapes[3] == NO_SPEC


def test_online_costs_learn_the_host_work_of_plain_and_speculative_steps() -> None:
    from specdec.tree_chooser import OnlineCosts

    table = costs({1: [10.0, 10.2, 10.4, 10.8, 11.6]}, draft_ms=0.5, overhead=0.0)
    online = OnlineCosts(table)
    chain = TreeShape(3, 1, 4)
    for _ in range(200):  # plain steps take 1 ms beyond the forward, speculative ones 2 ms more
        online.observe([NO_SPEC], [NO_SPEC], 0.0, 10.0 + 1.0)
        forwards = table.verify_forward_ms([chain]) + table.draft_forward_ms([chain], 1.0)
        online.observe([chain], [chain], 1.0, forwards + 1.0 + 2.0)
    learnt = online.costs
    assert learnt.plain_overhead_ms == pytest.approx(1.0, rel=1e-3)
    assert learnt.draft_step_overhead_ms * chain.num_steps == pytest.approx(2.0, rel=1e-3)
    # the learnt host work makes the same tree dearer than the table alone said
    assert learnt.step_ms(1, chain, 1, 1.0) > table.step_ms(1, chain, 1, 1.0) + 2.5


def test_step_ms_is_the_forwards_and_host_work_of_the_mixed_batch() -> None:
    """step_ms's O(1) form equals forward_ms + host_ms over [shape] * j + [NO_SPEC] * (b - j)."""
    from specdec.tree_shape import copy_shapes

    c = costs({1: [10.0, 10.5, 11.0, 12.0, 14.0], 4: [11.0, 13.0, 17.0, 25.0, 41.0],
               16: [16.0, 30.0, 58.0, 114.0, 226.0]}, draft_ms=0.7, overhead=0.13)
    c = StepCosts(c.batch, c.tokens, c.target_ms, (1, 4), tuple((0.5 + b / 10, 0.9 + b / 5) for b in c.batch),
                  0.13, 0.21, 0.4, (1.0, 1.1, 1.2, 1.3, 1.4))
    for shape in (*SHAPES, *copy_shapes(ENVELOPE)):
        for batch in (1, 3, 4, 9, 16, 20):
            at = c.step_ms_at(batch, range(batch + 1))  # (the chooser's form: one lookup per batch)
            for j in range(batch + 1):
                mixed = [shape] * j + [NO_SPEC] * (batch - j)
                accepted = 0.7 * j
                want = (c.forward_ms(mixed, accepted) + c.host_ms(mixed) if j and shape.speculates
                        else c.forward_ms([NO_SPEC] * batch, 0.0) + c.plain_overhead_ms)
                assert c.step_ms(batch, shape, j, accepted) == pytest.approx(want, rel=1e-12), (shape, batch, j)
                assert at(shape, j, accepted) == pytest.approx(want, rel=1e-12), (shape, batch, j)


def test_a_mixed_batch_pays_the_verify_paths_fixed_cost() -> None:
    """Plain decode 30 ms at batch 16; any tree takes the verify path: 50 ms at 2 tokens a
    request, +20 ms a token. One request verifying 5 tokens (1.25 a request) costs the verify
    path's 35 ms, not the 32.5 ms a line from the plain step would say."""
    c = StepCosts(batch=(16,), tokens=(1, 2, 3, 4), target_ms=((30.0, 50.0, 70.0, 90.0),), rows=(1,),
                  draft_ms=((1.0,),), draft_step_overhead_ms=0.0, verify_overhead_ms=0.0)
    assert c.target(16, 1.0) == 30.0
    assert c.target(16, 1.25) == pytest.approx(35.0)
    assert c.target(16, 1.01) == pytest.approx(30.2)  # never below the plain step
    assert c.target(16, 3.5) == pytest.approx(80.0)
