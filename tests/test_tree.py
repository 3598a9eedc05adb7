"""Trees: masks and positions (target and draft), selection, static shapes."""
from __future__ import annotations

import random

import pytest
import torch

from adaspec_hf.core.proposer import TreeDrafter
from adaspec_hf.core.kv import KVState
from adaspec_hf.policies import StaticTree, StepContext
from adaspec_hf.core.processing import Processing
from adaspec_hf.policies.registry import make_policy
from adaspec_hf.policies.selection import goodput_budget, top_n_subtree
from adaspec_hf.core.tree import DraftTree

from conftest import ARCHS, pair, ragged_batch


def random_tree(rng: random.Random, n: int, vocab: int = 101) -> tuple[list[int], list[int]]:
    toks, pars = [], []
    for j in range(n):
        pars.append(rng.randint(-1, j - 1))
        toks.append(rng.randint(3, vocab - 1))
    return toks, pars


def path_of(tree: DraftTree, b: int, j: int) -> list[int]:
    out = []
    while j >= 0:
        out.append(int(tree.tokens[b, j]))
        j = int(tree.parents[b, j])
    return out[::-1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_tree_verify_logits_equal_sequential(arch, attn):
    """One masked forward over a whole tree gives each node the logits of its own path."""
    target, _ = pair(arch, attn)
    rng = random.Random(0)
    ids, mask = ragged_batch(3, 7, 1, min_len=2)
    trees = [random_tree(rng, n) for n in (6, 0, 4)]
    tree = DraftTree.from_lists([t for t, _ in trees], [p for _, p in trees])
    kv = KVState(target)
    kv.prefill(ids[:, :-1], mask[:, :-1])
    length = mask.sum(1)  # pending token = last prompt token, at position length-1
    q = 1 + tree.width
    tokens = torch.cat([ids[:, -1:], tree.tokens], 1)
    positions = (length - 1)[:, None] + torch.cat([torch.zeros(3, 1, dtype=torch.long), tree.depth], 1)
    vis = torch.zeros(3, q, q, dtype=torch.bool)
    vis[:, 0, 0] = True
    vis[:, 1:, 0] = tree.valid
    vis[:, 1:, 1:] = tree.ancestors()
    vis[:, torch.arange(1, q), torch.arange(1, q)] = True
    logits = kv.forward(tokens, positions, vis)
    for b in range(3):
        real = ids[b, mask[b] == 1].tolist()
        for j in range(-1, int(tree.n_nodes[b])):
            seq = real + (path_of(tree, b, j) if j >= 0 else [])
            ref = target(torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(logits[b, j + 1], ref, atol=1e-4), (b, j)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
@torch.no_grad()
def test_drafter_tree_probabilities_equal_sequential(arch):
    """Nodes grown level by level over the draft's cache (tree mask, holes) carry the draft's
    probability of their token given their own path."""
    _, draft = pair(arch)
    ids, mask = ragged_batch(2, 6, 3, min_len=2)
    kv = KVState(draft)
    kv.prefill(ids[:, :-1], mask[:, :-1])
    length = mask.sum(1)
    drafter = TreeDrafter(kv, sampling=False)
    root = drafter.catch_up(ids[:, -1:], length - 1, torch.ones(2, dtype=torch.long))
    policy = StaticTree(3, 2)
    ctx = StepContext(rows=2, context_len=length, remaining=torch.tensor([50, 50]), sampling=False, step=1)
    tree = drafter.grow(root, policy, ctx, policy.max_depth(ctx), Processing(None),
                        lambda rows, paths: [(int(r), p) for r, p in zip(rows, paths)])
    assert int(tree.n_nodes.min()) == 6 and int(tree.depth.max()) == 3
    for b in range(2):
        real = ids[b, mask[b] == 1].tolist()
        for j in range(int(tree.n_nodes[b])):
            path = path_of(tree, b, j)
            probs = torch.softmax(draft(torch.tensor([real + path[:-1]])).logits[0, -1], -1)
            assert abs(float(probs[path[-1]]) - float(tree.draft_prob[b, j])) < 1e-4
    # siblings are distinct, nodes are topologically ordered
    assert bool((tree.parents < torch.arange(tree.width)[None, :]).all())


def test_top_n_subtree_is_connected_and_optimal():
    rng = random.Random(1)
    for _ in range(50):
        toks, pars = random_tree(rng, rng.randint(1, 12))
        tree = DraftTree.from_lists([toks], [pars])
        local = torch.rand(1, tree.width, generator=torch.Generator().manual_seed(rng.randint(0, 999)))
        tree.draft_prob = local
        values = tree.path_prob()
        n = rng.randint(0, tree.width)
        keep = top_n_subtree(tree, values, torch.tensor([n]))
        assert int(keep.sum()) == n
        sub = tree.select(keep)  # raises if a kept node lost an ancestor
        assert int(sub.n_nodes[0]) == n
        # optimal: no other connected subtree of size n has a larger value (values are monotone)
        top = torch.sort(values[0], descending=True).values[:n].sum()
        assert torch.isclose(values[0][keep[0]].sum(), top)


def test_static_tree_policy_by_name_and_errors():
    assert make_policy("tree-4x3").name == "tree-4x3"
    with pytest.raises(ValueError):
        make_policy("tree-0x3")


def test_goodput_budget_is_optimal_over_every_per_row_split():
    """The padded verify costs what its widest row does, so the best selection is found exactly:
    no choice of per-row top-n counts beats it (a prefix of the nodes sorted across the batch
    could not keep one row's free node without every better node of the others)."""
    import itertools

    rng = random.Random(3)
    cost = torch.tensor([0.010 + 0.002 * q + (0.004 if q == 2 else 0.0) for q in range(40)])  # non-monotone
    for _ in range(30):
        rows = [random_tree(rng, rng.randint(0, 6)) for _ in range(3)]
        tree = DraftTree.from_lists([t for t, _ in rows], [p for _, p in rows])
        tree.draft_prob = torch.rand(tree.tokens.shape) * tree.valid
        values = tree.path_prob() * torch.tensor([1.0, 0.2, 0.6])[:, None]  # rows worth unequal amounts
        keep, g, _ = goodput_budget(tree, values, cost, 0.003)
        assert keep.sum() <= tree.valid.sum()
        chosen = (3 + float(values[keep].sum())) / (0.003 + float(cost[int(keep.sum(1).max())]))
        assert abs(chosen - g) <= 1e-5 * g  # the reported goodput is the kept nodes'
        sizes = tree.valid.sum(1).tolist()
        for ns in itertools.product(*[range(s + 1) for s in sizes]):
            alt_keep = top_n_subtree(tree, values, torch.tensor(ns))
            alt = (3 + float(values[alt_keep].sum())) / (0.003 + float(cost[max(ns)]))
            assert alt <= g * (1 + 1e-6)


def test_one_row_selection_is_the_general_rule():
    """best_prefix_np's plain-Python path for one row returns what the batched rule returns for
    that row beside an empty one (same counts, same goodput, bit for bit)."""
    import numpy as np

    from adaspec_hf.policies.selection import best_prefix_np

    rng = np.random.default_rng(4)
    for _ in range(300):
        c = int(rng.integers(0, 6))
        v = -np.sort(-rng.random(c).astype(np.float32) * (rng.random(c) > 0.2))[None, :]
        base = int(rng.integers(0, 4))
        verify = (0.01 + 0.002 * np.arange(12) + rng.random(12) * 0.004).astype(np.float32)
        tokens = float(rng.random() * 3)
        one = best_prefix_np(v, np.array([base]), tokens, verify, 0.003)
        two = best_prefix_np(np.concatenate([v, np.zeros_like(v)]), np.array([base, 0]), tokens, verify, 0.003)
        assert one[0][0] == two[0][0] and one[1] == two[1] and one[2] == two[2]


def test_one_row_budget_is_the_array_rule():
    """goodput_budget_one_row keeps what goodput_budget_np keeps for one row (ties among values,
    invalid padding, nothing worth verifying), with the same goodput and step time, bit for bit."""
    import numpy as np

    from adaspec_hf.policies.selection import goodput_budget_np, goodput_budget_one_row

    rng = np.random.default_rng(8)
    kept_some = 0
    for _ in range(400):
        n = int(rng.integers(1, 14))
        v = (rng.random(n) * rng.choice([1.0, 0.3, 1e-10], n)).astype(np.float32)
        v[rng.random(n) < 0.2] = v[0]  # ties
        valid = rng.random(n) > 0.2
        verify = (0.01 + 0.002 * np.arange(16) + rng.random(16) * 0.004).astype(np.float32)
        base = float(1 + rng.random())
        want = goodput_budget_np(v[None, :], valid[None, :], verify, 0.003, base)
        got = goodput_budget_one_row(v.tolist(), valid.tolist(), verify, 0.003, base)
        assert got[0] == want[0][0].tolist() and got[1] == want[1] and got[2] == want[2]
        kept_some += any(got[0])
    assert 50 < kept_some < 400
