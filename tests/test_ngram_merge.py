"""The draft that also copies (draft/ngram_merge.py): the n-gram index, the merged trees, and
losslessness end to end (greedy equal to plain decoding; sampled verification on merged trees)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from specdec.draft.ngram_merge import NgramIndex, attach_chain, copy_accept, merge_greedy
from specdec.draft.tree_builders import SampledTreeBuilder
from specdec.tree import Candidate, DraftTree, tree_from_candidates
from specdec.verify import verify_stochastic

from .spec_models import make_random_eagle3
from .test_spec_e2e import FULL_LLAMA4, NEW_TOKENS
from .test_verify import TRIALS, TV_BOUND, _distributions, _tv
from .tiny_models import VOCAB, Checkpoint, make_checkpoint


def _brute_chain(ids: list[int], max_len: int, lo: int, hi: int) -> tuple[list[int], int]:
    """Reference: scan for the latest earlier occurrence of the longest final n-gram."""
    for n in range(min(hi, len(ids) - 1), lo - 1, -1):
        suffix = ids[len(ids) - n :]
        for end in range(len(ids) - 2, n - 2, -1):
            if ids[end - n + 1 : end + 1] == suffix:
                return ids[end + 1 : end + 1 + max_len], n
    return [], 0


def test_ngram_index_matches_a_brute_force_scan_as_the_context_grows() -> None:
    rng = random.Random(0)
    for trial in range(20):
        ids = [rng.randrange(4 + trial % 3) for _ in range(3)]
        index = NgramIndex(1, 4)
        for _ in range(60):
            assert index.chain(ids, 5) == _brute_chain(ids, 5, 1, 4)
            ids += [rng.randrange(4 + trial % 3) for _ in range(rng.randrange(1, 4))]


def test_ngram_index_excludes_the_final_occurrence_and_prefers_longer_matches() -> None:
    index = NgramIndex(1, 3)
    # "1 2 3" occurred at 0..2 (followed by 9 9) and "3" alone more recently at 6 (followed by 5)
    ids = [1, 2, 3, 9, 9, 4, 3, 5, 1, 2, 3]
    assert index.chain(ids, 4) == ([9, 9, 4, 3], 3)
    # (an index belongs to one growing context: a fresh one per context here)
    assert NgramIndex(1, 3).chain([7], 4) == ([], 0)
    assert NgramIndex(1, 3).chain([7, 8], 4) == ([], 0)  # no earlier 8
    assert NgramIndex(1, 3).chain([8, 1, 7, 8], 2) == ([1, 7], 1)


def test_merge_shares_a_prefix_with_eagle3_and_raises_its_score() -> None:
    # EAGLE3: root -> 5 (log 0.5) -> 6 (log 0.5 * 0.2); root -> 7 (log 0.3)
    lg = torch.log(torch.tensor([0.5, 0.1, 0.3])).tolist()
    cands = [Candidate(lg[0], 5, -1), Candidate(lg[0] + lg[1], 6, 0), Candidate(lg[2], 7, -1)]
    # a 3-gram match copies 5 8 9: 5 is shared, 8 and 9 are new under it
    merged, added = merge_greedy(1, cands, [5, 8, 9], 3, budget=4)
    assert added == 2
    tree = tree_from_candidates(1, merged, 4)
    paths = {tree.tokens[i]: tree.parents[i] for i in range(1, tree.size)}
    assert tree.size == 5  # the budget: 4 nodes plus the root
    node5 = tree.tokens.index(5)
    assert paths[5] == 0 and tree.tokens[paths[8]] == 5 and tree.tokens[paths[9]] == 8
    # kept by estimated acceptance: 5 (raised to the copy's 0.65), 8 (0.42), 7 (0.3), 9 (0.27);
    # EAGLE3's 6 (0.05) is dropped
    assert 6 not in tree.tokens
    assert tree.tokens.count(5) == 1 and node5 == 1
    # the copy raises a weaker EAGLE3 node to its own estimate, never above its parent
    weak = [Candidate(-5.0, 5, -1), Candidate(-6.0, 8, 0)]
    merged, added = merge_greedy(1, weak, [5, 8], 4, budget=2)
    assert added == 0
    assert merged[0].score == pytest.approx(torch.log(torch.tensor(copy_accept(4))).item())
    assert merged[1].score <= merged[0].score


def test_merge_respects_the_budget_and_parents_come_first() -> None:
    rng = random.Random(1)
    for _ in range(50):
        cands: list[Candidate] = []
        for i in range(rng.randrange(0, 12)):
            parent = rng.randrange(-1, i) if i else -1
            base = 0.0 if parent == -1 else cands[parent].score
            cands.append(Candidate(base - rng.random() * 2, 100 + i, parent))  # distinct tokens
        budget = rng.randrange(1, 9)
        chain = [rng.randrange(100, 112) for _ in range(rng.randrange(0, 10))]  # some are EAGLE3's
        merged, _ = merge_greedy(0, cands, chain, rng.randrange(1, 5), budget)
        for c in merged:
            if c.parent >= 0:
                assert c.score <= merged[c.parent].score
        tree = tree_from_candidates(0, merged, min(budget, len(merged)))  # raises on a lost parent
        assert tree.size - 1 <= budget


def test_attach_chain_follows_agreeing_sampled_nodes_and_hangs_the_rest_on_a_leaf() -> None:
    probs = torch.zeros(3, 10)
    probs[0, [4, 6]] = 0.5
    sampled = DraftTree((1, 4, 6), (-1, 0, 0), probs)  # root's children 4, 6 (leaves)
    merged = attach_chain(sampled, [4, 7, 8, 9], budget=4)
    assert merged.tokens == (1, 4, 6, 7, 8)  # 4 followed, then 7 8 under the leaf 4 (4 nodes in all)
    assert merged.parents == (-1, 0, 0, 1, 3)
    assert merged.draft_probs is not None and merged.draft_probs.shape == (5, 10)
    assert not merged.draft_probs[1:].any()  # copied children are fixed candidates
    assert torch.equal(merged.draft_probs[0], probs[0])
    # leaving the tree at a node with sampled children: the copy is dropped
    assert attach_chain(sampled, [5, 7], budget=5) is sampled
    assert attach_chain(sampled, [4, 7], budget=2) is sampled  # no room


def test_sampled_verification_on_a_merged_tree_follows_the_target() -> None:
    """A sampled tree with a copied chain under one of its leaves: the first and the second
    emitted tokens follow the target (the copies verified as one-hot proposals)."""
    p0, q0 = _distributions(11, 0.9, 1.0)
    p1, _ = _distributions(12, 0.9, 1.0)
    gen = torch.Generator().manual_seed(4)
    first = torch.zeros(6)
    second = torch.zeros(6)
    n_second = 0
    for _ in range(TRIALS):
        b = SampledTreeBuilder(root_token=0, num_steps=1, topk=2, num_nodes=2, vocab_size=6, generator=gen)
        b.add_children(0, q0)
        tree = b.finish()
        # copy "3 2" after whichever sampled child is token 3 (a choice made from the sampled
        # path, as the proposer does)
        merged = attach_chain(tree, [3, 2, 5], budget=4)
        target = torch.stack([p0] + [p1] * (merged.size - 1))
        res = verify_stochastic(merged, target, gen)
        emitted = [merged.tokens[n] for n in res.accepted] + [res.next_token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
            n_second += 1
    assert _tv(first, p0) < TV_BOUND
    assert n_second > 2000
    assert _tv(second, p1) < 0.045


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "llama4", seed=3, **FULL_LLAMA4)


def _repetitive_prompts() -> list[list[int]]:
    rng = random.Random(5)
    out = []
    for n in (3, 6, 9):
        motif = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.append(motif * 4 + motif[: n // 2])
    out.append([rng.randrange(3, VOCAB) for _ in range(17)])  # nothing to copy
    return out


@pytest.mark.parametrize(("tree", "page_size"), [((5, 4, 8), 1), ((3, 1, 4), 1), ((2, 2, 3), 16), ((6, 2, 12), 1)])
def test_merged_trees_are_lossless_and_copy(
    target: Checkpoint, tmp_path: Path, tree: tuple[int, int, int], page_size: int
) -> None:
    """Page size 1 leaves no slack: a copy chain deeper than num_steps must still have its
    slots reserved (accepted copies commit up to num_draft_tokens tokens in one step)."""
    prompts = _repetitive_prompts()
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS}
    plain = [o["output_ids"] for o in target.engine().generate(input_ids=prompts, sampling_params=params)]
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=0)
    steps, topk, ndt = tree
    accept = {}
    for merge in (False, True):
        engine = target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft),
                               speculative_num_steps=steps, speculative_eagle_topk=topk,
                               speculative_num_draft_tokens=ndt, speculative_ngram_merge=merge,
                               page_size=page_size)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == plain
        assert engine.allocator.num_free_pages == engine.allocator.num_pages
        steps_ct = sum(o["meta_info"]["spec_verify_ct"] for o in outs)
        accept[merge] = sum(len(o["output_ids"]) for o in outs) / steps_ct
    # a random head rarely agrees with the target; the copies do on the repetitive prompts
    assert accept[True] > accept[False]


def test_merged_sampling_is_reproducible_and_frees_pages(target: Checkpoint, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=1)
    engine = target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft),
                           speculative_num_steps=3, speculative_eagle_topk=2, speculative_num_draft_tokens=6,
                           speculative_ngram_merge=True)
    params = {"temperature": 0.8, "max_new_tokens": NEW_TOKENS, "seed": 3}
    a = engine.generate(input_ids=_repetitive_prompts(), sampling_params=params)
    b = engine.generate(input_ids=_repetitive_prompts(), sampling_params=params)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    assert engine.allocator.num_free_pages == engine.allocator.num_pages


def test_ngram_merge_needs_a_draft_model() -> None:
    from specdec.spec_config import SpecConfig

    with pytest.raises(ValueError, match="ngram-merge"):
        SpecConfig.from_options("NGRAM", None, 3, 1, 4, ngram_merge=True)
    with pytest.raises(ValueError, match="without --speculative-algorithm"):
        SpecConfig.from_options(None, ngram_merge=True)


@pytest.mark.parametrize("tree", [(5, 4, 8), (3, 1, 4), (6, 4, 16)])
def test_slots_reserved_for_a_fully_accepted_copy_chain(target: Checkpoint, tmp_path: Path,
                                                        tree: tuple[int, int, int]) -> None:
    """A step drafts into the draft's scratch slots, verifies its tree (num_draft_tokens slots)
    and may accept a copy chain num_draft_tokens - 1 deep (deeper than num_steps), whose draft
    K/V it writes in the same step: the reservation covers each of them."""
    draft = tmp_path / "draft"
    make_random_eagle3(draft, 32, VOCAB, seed=0)
    steps, topk, ndt = tree
    engine = target.engine(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(draft),
                           speculative_num_steps=steps, speculative_eagle_topk=topk,
                           speculative_num_draft_tokens=ndt, speculative_ngram_merge=True)
    spec = engine.spec
    assert spec.extra_slots == max(ndt, spec.proposer.temp_slots)
    req = engine.make_request([1, 2, 3], engine.sampling_params({"max_new_tokens": 4}))
    req.num_cached = 2
    assert engine.worker.slots_needed(req) == 2 + spec.extra_slots
