"""Adaptive speculation end to end on a tiny Llama 4 with a random EAGLE3 head: whatever trees
the chooser picks step by step (no speculation included), greedy output equals plain decoding
token for token and sampled output follows the target's distribution."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from specdec.tree_shape import NO_SPEC

from .spec_models import make_random_eagle3
from .test_spec_e2e import FULL_LLAMA4, NEW_TOKENS, PROMPT_LENGTHS
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts

ENVELOPE = {"speculative_num_steps": 4, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6,
            "speculative_adaptive": "on"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3, **FULL_LLAMA4)


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draft") / "head"
    make_random_eagle3(path, 32, VOCAB, seed=1)
    return path


def _adaptive(target: Checkpoint, draft: Path, **kw: Any) -> Any:
    return target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft), **ENVELOPE, **kw)


def _rotate_shapes(engine: Any) -> None:
    """Replace the chooser: every call and every request of a call takes another shape."""
    shapes = engine.spec.shapes
    calls = itertools.count()

    def choose(reqs: Any, batch_size: int) -> list[Any]:
        k = next(calls)
        return [shapes[(k + i) % len(shapes)] for i in range(len(reqs))]

    engine.spec.choose = choose


def test_adaptive_engine_measures_costs_and_offers_shapes_within_its_envelope(target: Checkpoint, draft: Path) -> None:
    engine = _adaptive(target, draft)
    spec = engine.spec
    assert spec.spec.adaptive and spec.costs is not None
    assert NO_SPEC in spec.shapes and all(s.fits(spec.spec.envelope) for s in spec.shapes)
    table = spec.costs.measured
    assert len(table.target_ms) == len(table.batch) and all(ms > 0 for row in table.target_ms for ms in row)
    again = _adaptive(target, draft)  # the table is cached per machine and model
    assert again.spec.costs.measured == table


def test_greedy_output_equals_plain_decoding_while_the_trees_change(target: Checkpoint, draft: Path) -> None:
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS}
    plain = [o["output_ids"] for o in target.engine().generate(input_ids=prompts, sampling_params=params)]
    engine = _adaptive(target, draft, page_size=1)
    _rotate_shapes(engine)
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == plain
    used = Counter()
    for o in outs:
        used.update(o["meta_info"]["spec_tree_shapes"])
    assert used["none"] > 0 and len(used) >= 5  # plain steps and several tree shapes
    assert engine.allocator.num_free_pages == engine.allocator.num_pages
    # the real chooser on the measured costs: still the same tokens
    chosen = _adaptive(target, draft)
    assert [o["output_ids"] for o in chosen.generate(input_ids=prompts, sampling_params=params)] == plain
    assert sum(chosen.metrics.spec_tree_shapes.values()) > 0
    assert chosen.allocator.num_free_pages == chosen.allocator.num_pages


def _next_token_probs(engine: Any, ids: list[int], temperature: float) -> list[float]:
    """The target's next-token distribution at `temperature` (no truncation), from its raw logprobs."""
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1},
                          return_logprob=True, top_logprobs_num=VOCAB)
    weights = [0.0] * VOCAB
    for lp, t, _ in out["meta_info"]["output_top_logprobs"][0]:
        weights[int(t)] = math.exp(lp / temperature)
    total = sum(weights)
    return [w / total for w in weights]


def second_token_marginal(plain: Any, prompt: list[int], temperature: float) -> list[float]:
    """The target's exact distribution of the second sampled token, sum_a p(a) p(. | a)."""
    exact = [0.0] * VOCAB
    for a, pa in enumerate(_next_token_probs(plain, prompt, temperature)):
        for b, pb in enumerate(_next_token_probs(plain, [*prompt, a], temperature)):
            exact[b] += pa * pb
    return exact


def _chi2_fits(counts: Counter[int], probs: list[float], n: int) -> tuple[float, float]:
    """(statistic, 0.999 quantile) of a chi-square goodness-of-fit test, cells expected below 5
    merged into one (Wilson-Hilferty approximation of the quantile)."""
    big = [c for c in range(len(probs)) if probs[c] * n >= 5]
    rest = [c for c in range(len(probs)) if c not in big]
    observed = [counts[c] for c in big] + [sum(counts[c] for c in rest)]
    expected = [probs[c] * n for c in big] + [sum(probs[c] for c in rest) * n]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    df = len(observed) - 1
    critical = df * (1 - 2 / (9 * df) + 3.090 * math.sqrt(2 / (9 * df))) ** 3
    return chi2, critical


def test_sampled_output_follows_the_target_while_the_trees_change(target: Checkpoint, draft: Path) -> None:
    """The token after the first (emitted by a speculative step: an accepted draft, a recovered
    or a bonus token), sampled at temperature 2 from 1500 seeds while the trees rotate, fits
    the target's exact marginal sum_a p(a) p(. | a) (chi-square, p > 0.001)."""
    temperature, n = 2.0, 1500
    prompt = random_prompts((9,), seed=3)[0]
    exact = second_token_marginal(target.engine(), prompt, temperature)
    engine = _adaptive(target, draft, max_total_tokens=8192)
    _rotate_shapes(engine)
    outs = engine.generate(input_ids=[prompt] * n, sampling_params=[
        {"temperature": temperature, "max_new_tokens": 2, "seed": s} for s in range(n)])
    assert engine.metrics.accept_length > 1.3  # drafts are accepted, not only rejected
    chi2, critical = _chi2_fits(Counter(o["output_ids"][1] for o in outs), exact, n)
    assert chi2 < critical, (chi2, critical)
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


@pytest.mark.parametrize(("verify_ms", "every"), [(1000.0, 16), (0.001, 4)])
def test_the_chooser_reruns_less_often_while_nothing_speculates(
    target: Checkpoint, draft: Path, monkeypatch: pytest.MonkeyPatch, verify_ms: float, every: int
) -> None:
    """An unchanged batch keeps its shapes for 4 steps, or for 16 when none of its requests
    speculates (no drafts, so no new evidence that could change the choice)."""
    from dataclasses import replace

    from specdec import spec_worker
    from specdec.tree_chooser import OnlineCosts

    engine = _adaptive(target, draft)
    table = engine.spec.costs.measured
    # every verify of more than one token costs verify_ms: 1000 ms never pays, 0.001 ms always does
    # (with the host overheads zeroed: measured ones made a tiny model's 1 ms verify lose at times)
    slow = tuple(tuple(row[0] if i == 0 else verify_ms for i, _ in enumerate(row)) for row in table.target_ms)
    engine.spec.costs = OnlineCosts(replace(table, target_ms=slow, draft_ms=tuple((0.0,) * len(r) for r in table.draft_ms),
                                            draft_step_overhead_ms=0.0, verify_overhead_ms=0.0))
    monkeypatch.setattr(engine.spec.costs, "observe", lambda *a: None)  # no host costs learnt from timings
    calls = []
    real = spec_worker.choose_shapes
    monkeypatch.setattr(spec_worker, "choose_shapes", lambda *a: calls.append(1) or real(*a))
    out = engine.generate(input_ids=random_prompts((5,), seed=2)[0],
                          sampling_params={"temperature": 0, "max_new_tokens": 33, "ignore_eos": True})
    steps = sum(out["meta_info"]["spec_tree_shapes"].values())  # decode steps, speculative or not
    assert steps >= 8
    assert len(calls) == pytest.approx(steps / every, abs=1.5)
    assert ("none" in out["meta_info"]["spec_tree_shapes"]) == (every == 16)


def test_a_requests_estimates_are_kept_until_the_statistics_change(
    target: Checkpoint, draft: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chooser's expected accepted tokens per shape are computed again only when the request's
    or the engine's statistics saw a drafted step: the same list while nothing drafts, and the
    same figures as a fresh computation whenever they are computed."""
    from specdec import spec_worker
    from specdec.accept_stats import AcceptStats, expected_accepted
    from specdec.request import Req
    from specdec.sampling_params import SamplingParams
    from specdec.tree import DraftTree

    engine = _adaptive(target, draft)
    spec = engine.spec
    computed = []
    real = spec_worker.expected_accepted
    monkeypatch.setattr(spec_worker, "expected_accepted", lambda *a: computed.append(1) or real(*a))
    req: Req = engine.make_request([3, 5, 7], SamplingParams.from_dict({"temperature": 0}))
    first = spec._expected_of(req)
    assert spec._expected_of(req) is first and len(computed) == 1
    chain = DraftTree((1, 2, 3), (-1, 0, 1))
    spec.global_stats.observe(chain, [1])  # the engine's evidence moves every request's prior
    second = spec._expected_of(req)
    assert len(computed) == 2 and second != first
    spec.global_stats.observe(DraftTree((1,), (-1,)), [])  # a root alone is no evidence
    assert spec._expected_of(req) is second and len(computed) == 2
    req.spec.accept = AcceptStats(spec.spec.num_steps, spec.spec.topk)
    req.spec.accept.observe(chain, [1, 2])
    third = spec._expected_of(req)
    assert len(computed) == 3
    assert third == expected_accepted(req.spec.accept.q(spec.global_stats), spec.shapes)
