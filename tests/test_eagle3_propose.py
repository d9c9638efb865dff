"""EAGLE3 drafting in batches: the children of every node of a step come from one batched
log-softmax + top-k (`top_children`), and a request's tree does not depend on which other
requests (greedy or sampled, other shapes) draft beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from specdec.draft.tree_builders import GreedyTreeBuilder, top_children

from .spec_models import make_random_eagle3
from .test_spec_e2e import FULL_LLAMA4
from .tiny_models import VOCAB, Checkpoint, make_checkpoint, random_prompts


def test_top_children_equals_per_row_log_softmax_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    hot = torch.randperm(100, generator=g)[:40]
    vals, toks = top_children(logits, 3, hot)
    for r in range(5):
        v, i = torch.topk(torch.log_softmax(logits[r], -1), 3)
        assert vals[r] == pytest.approx(v.tolist(), abs=1e-6)
        assert toks[r] == hot[i].tolist()
    # k larger than the vocabulary: every token
    vals, toks = top_children(logits[:1], 50, hot)
    assert len(vals[0]) == 40 and sorted(toks[0]) == sorted(hot.tolist())


def test_greedy_builder_keeps_the_best_cumulative_scores() -> None:
    b = GreedyTreeBuilder(root_token=7, topk=2, num_nodes=3)
    first = b.add_children(-1, [-0.1, -0.5, -3.0], [10, 11, 12])  # only topk = 2 are kept
    assert first == [0, 1]
    new = b.add_children(0, [-0.2, -0.4], [20, 21]) + b.add_children(1, [-0.05, -2.0], [30, 31])
    # scores: 20: -0.3, 21: -0.5, 30: -0.55, 31: -2.5 -> frontier 20, 21
    assert [b.cands[i].token for i in b.best(new)] == [20, 21]
    tree = b.finish()  # the 3 best: 10 (-0.1), 20 (-0.3), 11 / 21 tie at -0.5 -> the earlier, 11
    assert tree.tokens == (7, 10, 11, 20) and tree.parents == (-1, 0, 0, 1)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3, **FULL_LLAMA4)


def _first_trees(target: Checkpoint, draft: Path, prompts: list[list[int]], params: list[dict[str, Any]],
                 tree: tuple[int, int, int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The tree each request drafts in its first decode step, all requests in one batch."""
    steps, topk, ndt = tree
    engine = target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft),
                           speculative_num_steps=steps, speculative_eagle_topk=topk,
                           speculative_num_draft_tokens=ndt, speculative_adaptive="off")
    reqs = [engine.make_request(ids, _params(p)) for ids, p in zip(prompts, params, strict=True)]
    for r in reqs:
        engine.scheduler.add(r)
    engine.scheduler.step()  # prefill every request (one batch); the draft takes its features
    batch = engine.scheduler.schedule()  # the first decode step: its slots reserved
    assert batch is not None and batch.reqs == tuple(reqs)
    out = [(t.tokens, t.parents) for t in engine.spec.draft(batch.reqs, len(reqs))]
    engine.shutdown()
    return out


def _params(p: dict[str, Any]) -> Any:
    from specdec.sampling_params import SamplingParams

    return SamplingParams.from_dict(p)


@pytest.mark.parametrize("tree", [(4, 3, 8), (3, 1, 4)])
def test_a_request_drafts_the_same_tree_alone_and_in_a_mixed_batch(
    target: Checkpoint, tmp_path: Path, tree: tuple[int, int, int]
) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=5, draft_vocab=64)
    prompts = random_prompts((6, 11, 3, 17), seed=9)
    params: list[dict[str, Any]] = [
        {"temperature": 0, "max_new_tokens": 8},
        {"temperature": 0.8, "max_new_tokens": 8, "seed": 3},
        {"temperature": 0, "max_new_tokens": 8},
        {"temperature": 1.0, "top_k": 5, "max_new_tokens": 8, "seed": 4},
    ]
    together = _first_trees(target, draft, prompts, params, tree)
    alone = [_first_trees(target, draft, [p], [q], tree)[0] for p, q in zip(prompts, params, strict=True)]
    assert together == alone
    for tokens, _parents in together:
        assert 2 <= len(tokens) <= tree[2]  # the draft proposed something within the budget
