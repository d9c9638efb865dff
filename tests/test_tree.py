"""Hand-drawn draft trees: masks, positions, paths and pruning order written out literally."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import (
    Candidate,
    DraftTree,
    children,
    depths,
    first_child_next_sibling,
    path_to,
    positions,
    prune_tree,
    static_rank_tree,
    tree_from_candidates,
    tree_mask,
)


def test_one_node_tree() -> None:
    t = DraftTree((42,), (-1,))
    assert tree_mask(t).tolist() == [[True]]
    assert positions(t, 10).tolist() == [10]
    assert children(t) == [[]]
    assert path_to(t, 0) == [0]


def test_three_node_chain() -> None:
    #  0 -> 1 -> 2
    t = DraftTree.chain([7, 8, 9])
    assert t.parents == (-1, 0, 1)
    assert tree_mask(t).int().tolist() == [
        [1, 0, 0],
        [1, 1, 0],
        [1, 1, 1],
    ]
    assert positions(t, 5).tolist() == [5, 6, 7]
    assert path_to(t, 2) == [0, 1, 2]


def test_seven_node_tree() -> None:
    #            0
    #         /  |  \
    #        1   2   3
    #       / \      |
    #      4   5     6
    t = DraftTree((10, 11, 12, 13, 14, 15, 16), (-1, 0, 0, 0, 1, 1, 3))
    assert depths(t) == [0, 1, 1, 1, 2, 2, 2]
    assert positions(t, 100).tolist() == [100, 101, 101, 101, 102, 102, 102]
    assert children(t) == [[1, 2, 3], [4, 5], [], [6], [], [], []]
    assert tree_mask(t).int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [1, 0, 0, 1, 0, 0, 1],
    ]
    assert path_to(t, 5) == [0, 1, 5]
    assert path_to(t, 6) == [0, 3, 6]


def test_tree_rejects_child_before_parent() -> None:
    with pytest.raises(ValueError, match="parents must come before children"):
        DraftTree((1, 2, 3), (-1, 2, 0))
    with pytest.raises(ValueError, match="root"):
        DraftTree((1, 2), (0, 0))


def test_pruning_keeps_best_nodes_parents_first() -> None:
    # candidates as the drafter records them (root children first, then their children)
    cands = [
        Candidate(-0.1, 50, -1),  # c0
        Candidate(-1.0, 51, -1),  # c1
        Candidate(-0.3, 60, 0),  # c2: child of c0, cumulative -0.3
        Candidate(-2.5, 61, 0),  # c3
        Candidate(-1.2, 70, 1),  # c4: child of c1
        Candidate(-0.6, 80, 2),  # c5: child of c2
    ]
    t = tree_from_candidates(root_token=9, candidates=cands, num_nodes=4)
    # best 4 by score: c0 (-0.1), c2 (-0.3), c5 (-0.6), c1 (-1.0); kept in candidate order
    assert t.tokens == (9, 50, 51, 60, 80)
    assert t.parents == (-1, 0, 0, 1, 3)


def test_pruning_tie_prefers_parent() -> None:
    cands = [Candidate(-1.0, 5, -1), Candidate(-1.0, 6, 0), Candidate(-1.0, 7, -1)]
    t = tree_from_candidates(root_token=0, candidates=cands, num_nodes=2)
    assert t.tokens == (0, 5, 6)
    assert t.parents == (-1, 0, 1)


def test_static_rank_tree_shape_for_sglang_default() -> None:
    # rank r weighs 0.75 * 0.3^r: (0,)=.75 (0,0)=.56 (0,0,0)=.42 (0,0,0,0)=.32
    # (0,0,0,0,0)=.24 (1,)=.225 (0,1)=.169 | next (0,0,1)=.127 is left out
    shape = static_rank_tree(num_steps=5, topk=4, num_nodes=7)
    assert shape == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)]
    # closed under parents and elder siblings
    kept = set(shape)
    for p in shape:
        assert len(p) == 1 or p[:-1] in kept
        assert p[-1] == 0 or (*p[:-1], p[-1] - 1) in kept


def test_static_rank_tree_chain() -> None:
    assert static_rank_tree(num_steps=3, topk=1, num_nodes=3) == [(0,), (0, 0), (0, 0, 0)]


def test_draft_probs_rows_travel_with_tree() -> None:
    probs = torch.rand(3, 5)
    t = DraftTree((1, 2, 3), (-1, 0, 0), probs)
    assert t.draft_probs is probs


# ---- link arrays and pruning (structured outputs), as properties over random trees -------------


@st.composite
def _trees_and_keeps(draw: st.DrawFn) -> tuple[DraftTree, list[bool]]:
    n = draw(st.integers(1, 24))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, 99), min_size=n, max_size=n))
    keep = [True, *draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))]
    return DraftTree(tuple(tokens), tuple(parents)), keep


@settings(max_examples=200, deadline=None)
@given(_trees_and_keeps())
def test_links_and_pruning_properties(case: tuple[DraftTree, list[bool]]) -> None:
    tree, keep = case
    first, sibling = first_child_next_sibling(tree)
    # walking first-child / next-sibling links visits each node's children in node order
    for node in range(tree.size):
        kids, c = [], int(first[node])
        while c != -1:
            kids.append(c)
            c = int(sibling[c])
        assert kids == [i for i in range(1, tree.size) if tree.parents[i] == node]
    pruned = prune_tree(tree, keep)
    survivors = [i for i in range(tree.size) if all(keep[a] for a in path_to(tree, i))]
    assert pruned.tokens == tuple(tree.tokens[i] for i in survivors)
    index = {old: new for new, old in enumerate(survivors)}
    assert pruned.parents == tuple(-1 if i == 0 else index[tree.parents[i]] for i in survivors)
