"""Seeded sampling by an exponential race whose noise the draft shares (adaspec_hf.core.race)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from adaspec_hf.core import SpeculativeDecoder
from adaspec_hf.core.race import NO_TOKEN, RaceNoise, race_scores, race_seed, race_token
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.core.verify import accept_coupled
from adaspec_hf.policies import StaticChain, StaticTree

from conftest import VOCAB, pair, ragged_batch


def test_race_winner_is_argmax_of_p_over_noise_and_never_a_banned_token():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, float("nan"), 0.4, 0.5]])
    e = torch.tensor([[2.0, 0.1, 1.0, 1e-9]] * 3, dtype=torch.float64)
    # row 0: 0.25, 3.0, 0.2, (banned) -> 1; row 1: nothing valid; row 2: not finite
    assert race_token(p, e).tolist() == [1, NO_TOKEN, NO_TOKEN]
    assert race_scores(p, e)[0, 3] < 0


def test_noise_is_exponential_and_a_function_of_key_and_position_only():
    race = RaceNoise()
    a = race(torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3]), 5000)
    b = RaceNoise()(torch.tensor([8, 7]), torch.tensor([3, 3]), 5000)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    x = a.reshape(-1)
    assert bool((x >= 0).all())
    assert abs(float(x.mean()) - 1.0) < 0.02 and abs(float(x.var()) - 1.0) < 0.05  # Exp(1): mean 1, var 1
    # Kolmogorov-Smirnov against 1 - exp(-x)
    s = x.sort().values
    n = s.numel()
    ks = float(((torch.arange(1, n + 1, dtype=torch.float64) / n) - (1 - torch.exp(-s))).abs().max())
    assert ks < 1.63 / n ** 0.5  # the 1% critical value
    assert race_seed(1, 2) != race_seed(2, 1)


@pytest.mark.parametrize("seed", range(3))
def test_race_winner_follows_p(seed):
    """P(argmax p / E = x) = p(x): chi-square over 20,000 (key, position) races."""
    g = torch.Generator().manual_seed(seed)
    v = 6
    p = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, -1)
    n = 20_000
    keys = torch.arange(n) * 7919 + seed
    noise = RaceNoise()(keys, torch.full((n,), 11), v)
    y = race_token(p.expand(n, v), noise)
    obs = torch.bincount(y, minlength=v).double()
    chi2 = float(((obs - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5, chi2  # df = 5, p-value 0.001


def test_a_draft_racing_with_the_same_noise_agrees_far_more_than_an_independent_one():
    """The point of sharing the noise: agreement near 1 - TV(p, q) instead of sum_x q(x) p(x)."""
    g = torch.Generator().manual_seed(0)
    v, n = 50, 4000
    logits = torch.randn(v, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits + 0.3 * torch.randn(v, generator=g, dtype=torch.float64), -1)
    noise = RaceNoise()(torch.arange(n), torch.zeros(n, dtype=torch.long), v)
    agree = float((race_token(p.expand(n, v), noise) == race_token(q.expand(n, v), noise)).double().mean())
    tv = float(0.5 * (p - q).abs().sum())
    independent = float((p * q).sum())
    assert agree > (1 - tv) / (1 + tv) - 0.03
    assert agree > independent + 0.3
    # identical distributions: always the same winner
    assert bool((race_token(p.expand(n, v), noise) == race_token(p.expand(n, v), noise)).all())


def test_accept_coupled_takes_the_child_that_wins_and_reports_outcomes():
    p_root = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    e = torch.tensor([[1.0, 1.0, 0.1]], dtype=torch.float64)  # token 2 wins at depth 0 (3.0 vs 0.5, 0.2)
    tree = DraftTree.from_lists([[1, 2]], [[-1, -1]])
    probs = torch.stack([p_root, p_root, torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)])[None]
    v = accept_coupled(tree, probs, lambda d: e)
    assert v.n_accepted.tolist() == [1] and v.emitted[0, 0] == 2
    assert v.tested.tolist() == [[True, True]]
    assert v.accept_prob.tolist() == [[0.0, 1.0]]  # the outcome, not p(x)


def test_a_draft_equal_to_the_target_is_accepted_in_full_when_sampling():
    """Same distribution, same noise: every drafted token wins the target's race (an independent
    draft of the target would be accepted with p(x) only)."""
    target, _ = pair("llama", same=True)
    ids, mask = ragged_batch(3, 6, seed=2, min_len=3)
    proc = LogitsProcessorList([TemperatureLogitsWarper(1.0)])
    out = SpeculativeDecoder(target, target, StaticChain(4), do_sample=True, processors=proc,
                             generator=torch.Generator().manual_seed(0), eos_token_id=None,
                             pad_token_id=0).generate(ids, mask, 24)
    assert out.stats.drafted_tokens > 40
    assert out.stats.accepted_tokens >= 0.98 * out.stats.drafted_tokens


def test_race_siblings_accept_more_than_one_child_and_keep_the_text():
    """Trees of race-ranked siblings at T=0.7: the same text as no drafting (same seed), and more
    accepted per target pass than a chain of the race's winners."""
    target, draft = pair("llama")
    ids, mask = ragged_batch(6, 8, seed=5, min_len=4)
    proc = LogitsProcessorList([TemperatureLogitsWarper(0.7)])

    def run(policy):
        return SpeculativeDecoder(target, draft, policy, do_sample=True, processors=proc,
                                  generator=torch.Generator().manual_seed(3), eos_token_id=None,
                                  pad_token_id=0).generate(ids, mask, 32)

    plain, chain, tree = run(StaticChain(0)), run(StaticChain(3)), run(StaticTree(3, 3))
    assert torch.equal(chain.sequences, plain.sequences) and torch.equal(tree.sequences, plain.sequences)
    per_pass = [r.stats.accepted_per_step for r in (chain, tree)]
    assert per_pass[1] > per_pass[0], per_pass
    assert VOCAB > 3


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_tree_emits_exactly_the_plain_samplers_tokens(data):
    """Exact, per noise draw: whatever tree is verified, the emitted tokens are the race winners the
    plain sampler would pick along the target's own path (so the law is p's, by the race test)."""
    v = 4
    n = data.draw(st.integers(0, 7))
    parents = [data.draw(st.integers(-1, j - 1)) for j in range(n)]
    tokens = [data.draw(st.integers(0, v - 1)) for _ in range(n)]
    seed = data.draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    tree = DraftTree.from_lists([tokens], [parents])
    probs = torch.softmax(torch.randn(1, 1 + n, v, generator=g, dtype=torch.float64) * 2, -1)
    depth = int(tree.depth.max()) if n else 0
    noise = torch.empty(depth + 1, 1, v, dtype=torch.float64).exponential_(generator=g)
    got = accept_coupled(tree, probs, lambda d: noise[d])
    # the plain sampler's walk: at the current node, the winner; follow it while it is a child
    want, cur = [], 0
    for d in range(depth + 1):
        y = int(race_token(probs[:, cur], noise[d])[0])
        want.append(y)
        kids = [j for j in range(n) if parents[j] == cur - 1 and tokens[j] == y]
        if not kids or d == depth:
            break
        cur = kids[0] + 1
    k = int(got.n_emitted[0])
    assert got.emitted[0, :k].tolist() == want


@pytest.mark.parametrize("policy", [StaticTree(3, 2), "adaptive"])
def test_sampled_drafts_refuse_policies_that_read_them(policy):
    """Speculative sampling of drafts sampled from q is lossless only if no decision depends on
    them: a planner (which prunes by probability) or a tree is refused with a clear error."""
    from adaspec_hf.core.step import SpecStep
    from adaspec_hf.policies.planner import AdaptivePlanner

    from test_sim import latency

    p = AdaptivePlanner(latency()) if policy == "adaptive" else policy
    with pytest.raises(ValueError, match="draft_sampling=True needs a fixed-length chain"):
        SpecStep(p, draft_sampling=True)
    SpecStep(StaticChain(3), draft_sampling=True)  # fixed length: fine
