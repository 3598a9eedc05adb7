"""The greedy acceptance rule on hand-built trees (the sampling rules: test_sampling.py)."""
from __future__ import annotations

import torch

from adaspec_hf.core.tree import DraftTree
from adaspec_hf.core.verify import accept_greedy

V = 12


def scores_with_argmax(argmax: list[list[int]]) -> torch.Tensor:
    """(B, 1+N, V) scores whose argmax at verify index i of row b is ``argmax[b][i]``."""
    b, q = len(argmax), max(len(a) for a in argmax)
    s = torch.zeros(b, q, V)
    for i, row in enumerate(argmax):
        for j, t in enumerate(row):
            s[i, j, t] = 1.0
    return s


def test_a_fully_matching_chain_is_accepted_with_the_bonus_token():
    tree = DraftTree.from_lists([[5, 6, 7]], [[-1, 0, 1]])
    v = accept_greedy(tree, scores_with_argmax([[5, 6, 7, 9]]))
    assert v.n_accepted.tolist() == [3]
    assert v.path.tolist() == [[0, 1, 2]]
    assert v.emitted.tolist() == [[5, 6, 7, 9]]
    assert v.source.tolist() == [[0, 1, 2, 3]]  # each token from its parent's logits
    assert v.accepted.tolist() == [[True, True, True]]
    assert v.n_emitted.tolist() == [4]


def test_a_miss_at_the_root_emits_the_targets_token():
    tree = DraftTree.from_lists([[5, 6]], [[-1, 0]])
    v = accept_greedy(tree, scores_with_argmax([[4, 6, 1]]))
    assert v.n_accepted.tolist() == [0]
    assert v.emitted[0, 0].item() == 4 and v.source[0, 0].item() == 0
    assert v.tested.tolist() == [[True, False]]  # the child of a rejected node is never tried
    assert v.accepted.tolist() == [[False, False]]


def test_the_matching_branch_of_a_tree_is_followed():
    # root -> {4 (node 0), 5 (node 1)}; node 0 -> 8 (node 2); node 1 -> 8 (node 3), 3 (node 4)
    tree = DraftTree.from_lists([[4, 5, 8, 8, 3]], [[-1, -1, 0, 1, 1]])
    # target: after root 5, after node 1 -> 3, after node 4 -> 10
    v = accept_greedy(tree, scores_with_argmax([[5, 0, 3, 0, 0, 10]]))
    assert v.n_accepted.tolist() == [2]
    assert v.path.tolist() == [[1, 4]]
    assert v.emitted.tolist() == [[5, 3, 10]]  # bonus: the target's argmax after node 4 (index 5)
    assert v.source.tolist() == [[0, 2, 5]]
    assert v.tested.tolist() == [[True, True, False, True, True]]
    assert v.accepted.tolist() == [[False, True, False, False, True]]


def test_rows_of_different_sizes_and_an_empty_tree():
    tree = DraftTree.from_lists([[5, 6], [], [7]], [[-1, 0], [], [-1]])
    v = accept_greedy(tree, scores_with_argmax([[5, 1, 2], [9, 0, 0], [7, 11, 0]]))
    assert v.n_accepted.tolist() == [1, 0, 1]
    assert v.emitted.tolist() == [[5, 1, 0], [9, 0, 0], [7, 11, 0]]
    assert v.n_emitted.tolist() == [2, 1, 2]
    empty = accept_greedy(DraftTree.empty(2), scores_with_argmax([[3], [8]]))
    assert empty.n_accepted.tolist() == [0, 0] and empty.emitted.tolist() == [[3], [8]]


def test_a_padded_node_is_never_accepted():
    tree = DraftTree.from_lists([[5, 6], [5]], [[-1, 0], [-1]])  # row 1: node 1 is padding (token 0)
    v = accept_greedy(tree, scores_with_argmax([[5, 6, 1], [5, 0, 0]]))
    assert v.accepted[1].tolist() == [True, False]
    assert v.n_accepted.tolist() == [2, 1]
    assert v.emitted[1].tolist() == [5, 0, 0]  # bonus after row 1's node 0: argmax 0 at index 1
