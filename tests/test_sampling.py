"""Invariant 2: sampling is lossless — exact by enumeration on a tiny vocabulary, and end to end."""
from __future__ import annotations

import itertools

import pytest
import torch

from adaspec_hf.core import SpeculativeDecoder
from adaspec_hf.policies import StaticChain, ShapeFunction, TreeShape
from adaspec_hf.core.verify import accept_sampling, node_step
from adaspec_hf.core.tree import DraftTree

from conftest import pair, ragged_batch

V = 4


def dist(seed, v=V, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * sharp, -1)


def first_token_law(p, children, qs):
    """Exact law of the emitted token at a node with the given children (None q = deterministic)."""
    law = torch.zeros_like(p)
    reach, cur = 1.0, p.clone()
    for x, q in zip(children, qs):
        a, res = node_step(cur, torch.tensor(x), q)
        law[x] += reach * a
        reach = reach * (1 - a)
        cur = res
    return law + reach * cur


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("m", [1, 2, 3])
def test_deterministic_children_exact(seed, m):
    p = dist(seed)
    children = list(range(m))[::-1]  # any fixed distinct children
    law = first_token_law(p, children, [None] * m)
    assert torch.allclose(law, p, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("m", [1, 2, 3])
def test_sampled_children_exact(seed, m):
    """SpecInfer multi-step rule: marginalise over i.i.d. draft samples x_i ~ q by enumeration."""
    p, q = dist(seed), dist(seed + 100, sharp=2.0)
    law = torch.zeros_like(p)
    for xs in itertools.product(range(V), repeat=m):
        w = float(torch.prod(torch.stack([q[x] for x in xs])))
        law += w * first_token_law(p, list(xs), [q] * m)
    assert torch.allclose(law, p, atol=1e-12)


def test_two_level_tree_exact_joint():
    """Joint law of the first two emitted tokens from a depth-2 deterministic tree equals p(y1)p(y2|y1)."""
    p0 = dist(1)
    p1 = {x: dist(10 + x) for x in range(V)}
    # tree: root children [0, 2]; node 0 has children [1, 3]; node 2 has child [0]
    kids = {None: [0, 2], 0: [1, 3], 2: [0]}
    joint = torch.zeros(V, V, dtype=torch.float64)
    reach, cur = 1.0, p0.clone()
    for x in kids[None]:
        a, res = node_step(cur, torch.tensor(x), None)
        joint[x] += reach * a * first_token_law(p1[x], kids.get(x, []), [None] * len(kids.get(x, [])))
        reach, cur = reach * (1 - a), res
    for y in range(V):  # no child accepted: y drawn from the residual, second token from p1[y] plainly
        joint[y] += reach * cur[y] * p1[y]
    expected = p0[:, None] * torch.stack([p1[x] for x in range(V)])
    assert torch.allclose(joint, expected, atol=1e-12)


def test_accept_sampling_monte_carlo_matches_target():
    """The batched sampler itself (not only node_step) emits tokens distributed as p."""
    n = 40_000
    p_root = dist(3)
    tree = DraftTree.from_lists([[1, 3]] * n, [[-1, -1]] * n)
    probs = torch.zeros(n, 3, V, dtype=torch.float64)
    probs[:, 0] = p_root
    probs[:, 1] = dist(4)
    probs[:, 2] = dist(5)
    g = torch.Generator().manual_seed(0)
    verdict = accept_sampling(tree, probs, g)
    first = verdict.emitted[:, 0]
    freq = torch.bincount(first, minlength=V).double() / n
    assert torch.allclose(freq, p_root, atol=0.01)


@pytest.mark.parametrize("same", [False, True], ids=["random-draft", "agreeing-draft"])
def test_end_to_end_sampling_statistics(same):
    """Tokens emitted by verification follow the target's processed distribution. With an agreeing
    draft most tokens come from accepted drafts, so a biased acceptance rule would show."""
    target, draft = pair("llama", "sdpa", same=same)
    ids = torch.tensor([[5, 17, 33, 8]])
    n_runs, n_new = 4000, 3
    temp = 1.3
    logits = target(ids).logits[0, -1].double() / temp
    expect_first = torch.softmax(logits, -1)
    g = torch.Generator().manual_seed(1)
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    proc = LogitsProcessorList([TemperatureLogitsWarper(temp)])
    policy = ShapeFunction(lambda s, r: TreeShape([2, 2], [1]) if s % 2 else 2, max_children=2)
    firsts, seconds = [], []
    batch = ids.repeat(n_runs, 1)
    dec = SpeculativeDecoder(target, draft, policy, do_sample=True, processors=proc, generator=g,
                             eos_token_id=None, pad_token_id=0)
    out = dec.generate(batch, torch.ones_like(batch), n_new)
    # token 2 is emitted by verification (speculation happens from step 1 on)
    second = out.sequences[:, ids.shape[1] + 1]
    first = out.sequences[:, ids.shape[1]]
    # the second token's law given the first: compare the pooled empirical law with the exact mixture
    with torch.no_grad():
        ext = torch.cat([batch, first[:, None]], 1)
        cond = torch.softmax(target(ext).logits[:, -1].double() / temp, -1)
    mix = cond.mean(0)
    freq = torch.bincount(second, minlength=mix.shape[0]).double() / n_runs
    tv = 0.5 * (freq - mix).abs().sum()
    # noise floor: the same statistic for exact samples of the same size
    gc = torch.Generator().manual_seed(2)
    control = []
    for _ in range(30):
        draw = torch.multinomial(mix.float(), n_runs, replacement=True, generator=gc)
        control.append(float(0.5 * (torch.bincount(draw, minlength=mix.shape[0]).double() / n_runs - mix).abs().sum()))
    assert tv < 1.3 * max(control), f"total variation {tv:.3f} vs exact-sampling noise up to {max(control):.3f}"
    # sharper: how often the token is each row's conditional argmax, vs its exact expectation
    top = cond.argmax(-1)
    p_top = cond.gather(1, top[:, None])[:, 0]
    z = float(((second == top).double().mean() - p_top.mean()) / (p_top * (1 - p_top)).sum().sqrt() * n_runs)
    assert abs(z) < 4.5, f"argmax frequency off by {z:.1f} standard deviations"
    assert out.stats.drafted_tokens > 0
