"""Verification: literal greedy/stochastic cases and statistical losslessness."""

from __future__ import annotations

import torch

from specdec.draft.tree_builders import SampledTreeBuilder
from specdec.sampler import processed_probs
from specdec.sampling_params import SamplingParams
from specdec.tree import DraftTree
from specdec.verify import verify_greedy, verify_stochastic


def test_greedy_chain_accepts_prefix_then_target_token() -> None:
    # draft = [1, 2, 3] after root 0; target argmax after each node = [1, 5, ...]
    tree = DraftTree.chain([0, 1, 2, 3])
    res = verify_greedy(tree, [1, 5, 3, 4])
    assert res.accepted == [1]  # node 1 (token 1) accepted
    assert res.next_token == 5  # recovered: target says 5 where the draft said 2


def test_greedy_chain_all_accepted_gives_bonus() -> None:
    tree = DraftTree.chain([0, 1, 2, 3])
    res = verify_greedy(tree, [1, 2, 3, 9])
    assert res.accepted == [1, 2, 3]
    assert res.next_token == 9  # bonus from the last node


def test_greedy_tree_follows_matching_branch() -> None:
    #       0
    #     /   \
    #   1(7)  2(8)
    #    |     |
    #   3(9)  4(6)
    tree = DraftTree((0, 7, 8, 9, 6), (-1, 0, 0, 1, 2))
    res = verify_greedy(tree, [8, 9, 6, 1, 2])
    assert res.accepted == [2, 4]  # 8 then 6 (the second branch)
    assert res.next_token == 2  # target after node 4


def test_greedy_nothing_accepted() -> None:
    tree = DraftTree((0, 7, 8), (-1, 0, 0))
    res = verify_greedy(tree, [3, 0, 0])
    assert res.accepted == [] and res.next_token == 3


def test_stochastic_one_hot_certain_cases() -> None:
    tree = DraftTree((0, 1, 2), (-1, 0, 0))
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25] * 4, [0.0, 0.0, 0.0, 1.0]])
    # p(1) = 0 at the root: child 1 always rejected; p(2) = 1: child 2 always accepted,
    # then node 2's distribution is a point mass on 3
    for seed in range(20):
        res = verify_stochastic(tree, p, torch.Generator().manual_seed(seed))
        assert res.accepted == [2] and res.next_token == 3


def test_stochastic_with_draft_probs_equal_to_target_always_accepts() -> None:
    # q == p at the root: min(1, p/q) = 1 for the first draw
    p_root = torch.tensor([0.1, 0.6, 0.3])
    probs = torch.stack([p_root, torch.zeros(3)])
    tree = DraftTree((0, 1), (-1, 0), probs)
    target = torch.stack([p_root, torch.tensor([0.0, 0.0, 1.0])])
    for seed in range(20):
        res = verify_stochastic(tree, target, torch.Generator().manual_seed(seed))
        assert res.accepted == [1] and res.next_token == 2


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


# With n = 8000 draws over 6 tokens the expected TV of an exact sampler is about
# sum_i sqrt(p_i (1 - p_i) / n) * sqrt(2/pi) / 2 ~= 0.01; we allow 0.03 (a biased sampler,
# e.g. one that ignores the residual, is off by 0.1 or more on these distributions).
TV_BOUND = 0.03
TRIALS = 8000


def _distributions(seed: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target p and a different draft q over 6 tokens, both processed like real requests."""
    g = torch.Generator().manual_seed(seed)
    params = [SamplingParams(temperature=temperature, top_p=top_p)]
    p = processed_probs(torch.randn(1, 6, generator=g) * 1.5, params)[0]
    q = processed_probs(torch.randn(1, 6, generator=g) * 1.5, params)[0]
    return p, q


def test_sampled_tree_first_token_follows_target() -> None:
    """Children drawn without replacement from q; the emitted token must follow p."""
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.3, 0.8)):
        p, q = _distributions(int(temperature * 10), temperature, top_p)
        counts = torch.zeros(6)
        gen = torch.Generator().manual_seed(1)
        for _ in range(TRIALS):
            b = SampledTreeBuilder(root_token=0, num_steps=1, topk=3, num_nodes=3, vocab_size=6, generator=gen)
            b.add_children(0, q)
            tree = b.finish()
            target = p.expand(tree.size, 6)
            res = verify_stochastic(tree, target, gen)
            first = tree.tokens[res.accepted[0]] if res.accepted else res.next_token
            counts[first] += 1
        assert _tv(counts, p) < TV_BOUND, (temperature, top_p, counts / TRIALS, p)


def test_fixed_candidates_first_token_follows_target() -> None:
    """Top-k style fixed candidates (one-hot proposals, SGLang's rule) are lossless too."""
    p, _ = _distributions(3, 0.8, 0.95)
    tree = DraftTree((0, 1, 4, 2), (-1, 0, 0, 0))
    counts = torch.zeros(6)
    gen = torch.Generator().manual_seed(2)
    target = p.expand(tree.size, 6)
    for _ in range(TRIALS):
        res = verify_stochastic(tree, target, gen)
        counts[tree.tokens[res.accepted[0]] if res.accepted else res.next_token] += 1
    assert _tv(counts, p) < TV_BOUND


def test_second_token_follows_target_given_first() -> None:
    """Two levels: after an accepted first token x, the next emitted token follows p_x."""
    p0, q0 = _distributions(5, 0.9, 1.0)
    p1, q1 = _distributions(6, 0.9, 1.0)
    counts = torch.zeros(6)
    gen = torch.Generator().manual_seed(3)
    n_second = 0
    for _ in range(TRIALS):
        b = SampledTreeBuilder(root_token=0, num_steps=2, topk=2, num_nodes=4, vocab_size=6, generator=gen)
        b.add_children(0, q0)
        for node in b.expandable(1):
            b.add_children(node, q1)  # the same draft distribution under every child
        tree = b.finish()
        target = torch.stack([p0] + [p1] * (tree.size - 1))
        res = verify_stochastic(tree, target, gen)
        if res.accepted:
            seconds = [tree.tokens[n] for n in res.accepted[1:]] + [res.next_token]
            counts[seconds[0]] += 1
            n_second += 1
    assert n_second > 2000
    assert _tv(counts, p1) < 0.045  # fewer samples here than TRIALS


def test_draft_helps_acceptance_over_one_hot() -> None:
    """Using q accepts more than treating sampled drafts as one-hot when q is close to p."""
    p = torch.tensor([0.3, 0.3, 0.2, 0.2, 0.0, 0.0])
    q = torch.tensor([0.28, 0.32, 0.2, 0.2, 0.0, 0.0])
    gen = torch.Generator().manual_seed(4)
    with_q = one_hot = 0
    for _ in range(2000):
        b = SampledTreeBuilder(root_token=0, num_steps=1, topk=1, num_nodes=1, vocab_size=6, generator=gen)
        b.add_children(0, q)
        tree = b.finish()
        target = p.expand(tree.size, 6)
        with_q += bool(verify_stochastic(tree, target, gen).accepted)
        plain = DraftTree(tree.tokens, tree.parents)  # same draws, draft treated as one-hot
        one_hot += bool(verify_stochastic(plain, target, gen).accepted)
    # with q: 1 - TV(p, q) = 0.98; one-hot: E_q[p(x)] = 0.26
    assert with_q / 2000 > 0.95
    assert one_hot / 2000 < 0.35


def test_verify_others_batched_equals_each_request_alone() -> None:
    """The spec worker verifies sampled, penalised and constrained requests together (one
    processed_probs call over all their rows, one draw for every root-only tree); each request's
    result equals verifying it alone with a generator of the same seed."""
    from specdec.page_allocator import PageAllocator, PageTable
    from specdec.request import Req
    from specdec.sampling_params import SamplingParams
    from specdec.spec_worker import verify_others

    V = 300
    g = torch.Generator().manual_seed(4)
    params = [SamplingParams(temperature=0.9, top_p=0.9), SamplingParams(temperature=0.7),
              SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.8, top_p=0.95)]
    trees = [DraftTree((1,), (-1,)), DraftTree((2, 5, 6, 7), (-1, 0, 0, 1)), DraftTree((3, 8, 9), (-1, 0, 1)),
             DraftTree((4,), (-1,)), DraftTree((5, 10, 11), (-1, 0, 1))]
    logits = [torch.randn(t.size, V, generator=g) * 3 for t in trees]
    logits[1][0, 5] = logits[2][0, 8] = 9.0  # likely acceptances along the way
    draws = 40

    def reqs(seed: int) -> list[Req]:
        alloc = PageAllocator(8, 4)
        return [Req(rid=str(i), prompt_ids=[1, 2, 3], params=p, page_table=PageTable(alloc),
                    generator=torch.Generator().manual_seed(seed + i), output_ids=[8, 9])
                for i, p in enumerate(params)]

    together = reqs(100)
    alone = reqs(100)
    for _ in range(draws):  # the same generators drawn again and again: the streams stay in step
        batch = verify_others(together, trees, [None] * len(trees), logits)
        each = [verify_others([r], [t], [None], [lg])[0] for r, t, lg in zip(alone, trees, logits, strict=True)]
        assert [(b.accepted, b.next_token) for b in batch] == [(e.accepted, e.next_token) for e in each]
    # a sampled root-only tree is one draw from the processed distribution: top_k=5 keeps 5 tokens
    kept = torch.topk(logits[3][0], 5).indices.tolist()
    picks = {verify_others([r], [trees[3]], [None], [logits[3]])[0].next_token
             for seed in range(10) for r in reqs(seed)[3:4] for _ in range(5)}
    assert picks <= set(kept)
