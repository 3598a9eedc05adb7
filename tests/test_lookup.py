"""Prompt lookup: n-gram matching, tries, merging with draft trees, and losslessness of decoding
with lookup alone and merged with a draft model (greedy and sampling), through the core decoder,
``generate(adaptive=True, prompt_lookup=True)`` and the serving engine."""
from __future__ import annotations

import pytest
import torch

import conftest

import adaspec_hf
from adaspec_hf import Engine
from adaspec_hf.core import CombinedProposer, DraftModelProposer, LookupProposer, SpeculativeDecoder
from adaspec_hf.core.lookup import LOOKUP_TRUSTED, find_matches, lookup_tree, merge_trees
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ModeState
from adaspec_hf.policies import StaticChain, StaticTree
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.profiling import profile

from conftest import ARCHS, VOCAB, pair, ragged_batch

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ matching
def _t(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])


def test_longest_ngram_wins_and_most_recent_first():
    tokens, lengths = _t([[5, 6, 7, 8, 9, 6, 7, 4, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2, 3]])
    starts, n = find_matches(tokens, lengths, max_ngram=3, min_ngram=1)
    # row 0: "6 7" occurs at 1 and 5 (then 8 and 4 follow); no 3-gram "4 6 7" earlier
    assert n.tolist()[0] == 2
    assert starts[0, :2].tolist() == [7, 3] and starts[0, 2:].eq(-1).all()
    # row 1: "1 2 3" recurs; the suffix itself (at 6) is no match
    assert n.tolist()[1] == 3
    assert starts[1, :2].tolist() == [6, 3]


def test_no_match_and_too_short_rows_give_no_nodes():
    tokens, lengths = _t([[5, 6, 7, 8], [9]])
    tree = lookup_tree(tokens, lengths, torch.tensor([4, 4]))
    assert tree.width == 0 and tree.lookup is not None


def test_chain_follows_the_best_supported_continuation_within_the_depth_bound():
    tokens, lengths = _t([[1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 5, 1, 2, 3]])
    tree = lookup_tree(tokens, lengths, torch.tensor([3]), max_children=1)
    # three earlier "1 2 3": followed by 5, 5, 4 -> the chain takes 5 (2 of 3), then 1, 2
    assert tree.tokens[0].tolist() == [5, 1, 2]
    assert tree.parents[0].tolist() == [-1, 0, 1]
    strength = 3 / 4
    assert tree.draft_prob[0, 0].item() == pytest.approx(strength * 2 / 3)
    assert tree.draft_prob[0, 1].item() == pytest.approx(strength)
    assert tree.lookup.all() and not tree.sampled.any() and tree.draft_slot.eq(-1).all()


def test_tree_branches_where_continuations_diverge():
    tokens, lengths = _t([[1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]])
    tree = lookup_tree(tokens, lengths, torch.tensor([2]), max_children=2)
    assert sorted(tree.tokens[0, :2].tolist()) == [4, 5]  # both children of the root
    assert tree.parents[0, :2].tolist() == [-1, -1]
    assert tree.depth[0].tolist() == [1, 1, 2, 2]
    assert torch.equal(tree.compute_depth(), tree.depth)


def test_a_loop_is_continued_around_its_period():
    tokens, lengths = _t([[7, 8, 9, 7, 8]])
    tree = lookup_tree(tokens, lengths, torch.tensor([7]))
    # "7 8" recurs at 0; what followed (9 7 8) runs into the end: the loop 9 7 8 goes on
    assert tree.tokens[0].tolist() == [9, 7, 8, 9, 7, 8, 9]
    far = lookup_tree(*_t([[1, 2, 3, 4, 5, 6, 1, 2]]), torch.tensor([3]))
    assert far.tokens[0].tolist() == [3, 4, 5]  # an older occurrence has its own continuation


def test_lookup_options_are_validated():
    with pytest.raises(ValueError, match="max_ngram"):
        LookupProposer(max_ngram=0)
    with pytest.raises(ValueError, match="exceeds"):
        LookupProposer(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="prompt_lookup"):
        adaspec_hf.AdaptiveConfig(prompt_lookup="yes")
    with pytest.raises(ValueError, match="lookup_min_ngram"):
        adaspec_hf.AdaptiveConfig(lookup_max_ngram=2, lookup_min_ngram=3)


# ------------------------------------------------------------------------------------------- merging
def test_merge_keeps_shared_prefixes_once_and_marks_the_added_nodes():
    base = DraftTree.from_lists([[10, 11, 12], [20]], [[-1, 0, 1], [-1]])
    base.draft_slot = torch.tensor([[5, 6, -1], [7, -1, -1]])
    extra = DraftTree.from_lists([[10, 11, 13, 14], [21, 22]], [[-1, 0, 1, 2], [-1, 0]])
    merged = merge_trees(base, extra)
    # row 0: 10 -> 11 shared, 13 -> 14 added under 11; row 1: 21 -> 22 added beside 20
    assert merged.n_nodes.tolist() == [5, 3]
    assert merged.tokens[0, :5].tolist() == [10, 11, 12, 13, 14]
    assert merged.parents[0, :5].tolist() == [-1, 0, 1, 1, 3]
    assert merged.lookup[0, :5].tolist() == [False, False, False, True, True]
    assert merged.draft_slot[0, :5].tolist() == [5, 6, -1, -1, -1]
    assert merged.tokens[1, :3].tolist() == [20, 21, 22] and merged.parents[1, :3].tolist() == [-1, -1, 1]
    assert torch.equal(merged.compute_depth(), merged.depth)
    kept = merged.select(merged.valid & ~merged.lookup)
    assert kept.n_nodes.tolist() == [3, 1] and not kept.lookup.any()


# --------------------------------------------------------------------------------------- losslessness
def repetitive_batch(batch: int, seed: int):
    """Ragged prompts that repeat their own last tokens (so lookup finds matches)."""
    ids, mask = ragged_batch(batch, 10, seed, min_len=4)
    ids = torch.cat([ids, ids[:, -5:], ids[:, -5:]], 1)
    mask = torch.cat([mask, torch.ones(batch, 10, dtype=torch.long)], 1)
    return ids, mask


def reference(target, ids, mask, n, eos=2):
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=eos)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["lookup", "combined"])
@pytest.mark.parametrize("policy", [lambda: StaticChain(4), lambda: StaticTree(3, 2)], ids=["chain", "tree"])
def test_greedy_identical_to_generate(arch, mode, policy):
    target, draft = pair(arch)
    ids, mask = repetitive_batch(4, 5)
    ref = reference(target, ids, mask, 24)
    prop = LookupProposer() if mode == "lookup" else CombinedProposer(DraftModelProposer(), LookupProposer())
    dec = SpeculativeDecoder(target, None if mode == "lookup" else draft, policy(), eos_token_id=2, pad_token_id=0,
                             proposer=prop)
    out = dec.generate(ids, mask, 24)
    assert torch.equal(out.sequences, ref)
    assert out.stats.drafted_tokens > 0


def test_eager_attention_and_eos_midway():
    target, _ = pair("llama", "eager")
    ids, mask = repetitive_batch(3, 9)
    full = reference(target, ids, mask, 20, eos=None)
    eos = int(full[0, ids.shape[1] + 5])
    ref = reference(target, ids, mask, 20, eos=eos)
    out = SpeculativeDecoder(target, None, StaticChain(6), eos_token_id=eos, pad_token_id=0,
                             proposer=LookupProposer(max_ngram=2)).generate(ids, mask, 20)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("mode", ["lookup", "combined"])
def test_sampling_is_the_same_draw_whatever_is_drafted(mode):
    """Sampled tokens are position-keyed draws of the target's distribution: with the same seed,
    lookup drafts (deterministic children, the existing rule) give exactly the tokens of no drafts."""
    target, draft = pair("llama")
    ids, mask = repetitive_batch(5, 3)
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    proc = LogitsProcessorList([TemperatureLogitsWarper(0.7)])

    def run(policy, proposer, d):
        g = torch.Generator().manual_seed(11)
        return SpeculativeDecoder(target, d, policy, do_sample=True, processors=proc, generator=g,
                                  eos_token_id=None, pad_token_id=0, proposer=proposer).generate(ids, mask, 20)

    plain = run(StaticChain(0), None, draft)
    prop = LookupProposer() if mode == "lookup" else CombinedProposer(DraftModelProposer(), LookupProposer())
    spec = run(StaticTree(4, 2), prop, None if mode == "lookup" else draft)
    assert torch.equal(spec.sequences, plain.sequences)
    assert spec.stats.drafted_tokens > 0


def test_sampled_lookup_tokens_follow_the_target_distribution():
    """End to end, statistically: the second token (the first one verification emits, behind a lookup
    draft in nearly every row) is distributed as the target's marginal sum_x1 p(x1) p(x2 | x1)."""
    target, _ = pair("llama")
    g0 = torch.Generator().manual_seed(4)
    body = (torch.randperm(VOCAB - 3, generator=g0) + 3)[None]
    ids = torch.cat([body, body[:, :7]], 1)  # every token recurs: any first token has a 1-gram match
    n = 2500
    batch = ids.repeat(n, 1)
    out = SpeculativeDecoder(target, None, StaticChain(3), do_sample=True, generator=torch.Generator().manual_seed(2),
                             eos_token_id=None, pad_token_id=0,
                             proposer=LookupProposer()).generate(batch, torch.ones_like(batch), 3)
    assert out.stats.drafted_tokens > 0.9 * n
    with torch.no_grad():
        p1 = torch.softmax(target(ids).logits[0, -1].double(), -1)
        ctx = torch.cat([ids.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)
        p2 = (p1[:, None] * torch.softmax(target(ctx).logits[:, -1].double(), -1)).sum(0)
    second = out.sequences[:, ids.shape[1] + 1]
    observed = torch.bincount(second, minlength=VOCAB).double()
    expected = n * p2
    small = expected < 5  # pooled into one bin, as the chi-square approximation needs
    obs, exp = observed[~small], expected[~small]
    if bool(small.any()):
        obs, exp = torch.cat([obs, observed[small].sum()[None]]), torch.cat([exp, expected[small].sum()[None]])
    chi2, df = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    assert chi2 < df + 4.5 * (2 * df) ** 0.5  # ~4.5 sigma above the mean df: p < 1e-4


# ------------------------------------------------------------------------------------------ planner
def test_each_proposer_has_its_own_calibration():
    mode = ModeState()
    p = torch.full((200,), 0.5)
    d = torch.ones(200, dtype=torch.long)
    lookup = torch.arange(200) % 2 == 0
    outcome = lookup.float()  # lookup nodes always accepted, draft nodes never
    for _ in range(5):
        mode.update(p, d, outcome, lookup)
    pred = mode.predict(p[:2], d[:2], lookup[:2])
    assert pred[0] > 0.8 and pred[1] < 0.2


def _lookup_latency(verify_growth: float = 0.0005) -> LatencyModel:
    target = [[r, t, c, 0.01 + verify_growth * r * t] for r in (1, 4, 16) for t in (1, 4, 16) for c in (1, 512)]
    return LatencyModel.from_points(target, [], overhead=0.0005, bounds=(1.0, 1.0))


def test_target_only_latency_model_charges_no_draft_forward():
    lat = _lookup_latency()
    assert lat.draft_time(4, 8, 100) == 0.0
    assert lat.target_time(4, 8, 100) > 0


def test_planner_verifies_a_repeating_row_deep_and_skips_a_row_without_matches():
    target, _ = pair("llama")
    planner = AdaptivePlanner(_lookup_latency(), max_depth=8)
    # row 0: the target's own greedy text, which falls into a loop, so the target does continue the
    # repeat (a hand-written repeat it did not follow made the outcome hang on the RNG state left by
    # earlier tests); row 1: a seeded permutation, no repeats at all
    g = torch.Generator().manual_seed(0)
    start = torch.randint(3, 90, (1, 8), generator=g)
    looping = reference(target, start, torch.ones_like(start), 28, eos=None)
    assert len(set(looping[0, -18:].tolist())) < 18  # the precondition: it repeats
    ids = torch.cat([looping, (torch.randperm(80, generator=g)[:36] + 3)[None]])
    out = SpeculativeDecoder(target, None, planner, eos_token_id=None, pad_token_id=0,
                             proposer=LookupProposer(free_depth=8)).generate(ids, torch.ones_like(ids), 30)
    assert torch.equal(out.sequences, reference(target, ids, torch.ones_like(ids), 30, eos=None))
    assert out.stats.drafted_tokens > 0 and out.stats.accepted_tokens > 0


def test_probe_verifies_only_its_own_length_of_free_lookup_levels():
    planner = AdaptivePlanner(_lookup_latency(), max_depth=8)
    from adaspec_hf.policies import StepContext

    ctx = StepContext(rows=1, context_len=torch.tensor([20]), remaining=torch.tensor([50]), sampling=False, step=1)
    planner.idle_steps = planner.probe_gap  # due for a probe
    depth = planner.max_depth(ctx)
    assert planner._probing and int(depth[0]) >= 1
    tree = DraftTree.from_lists([[5, 6, 7, 8, 9]], [[-1, 0, 1, 2, 3]])
    keep = planner.select(tree, ctx)
    assert int(keep.sum()) == int(depth[0])


def test_trusted_lookup_skips_the_draft_model():
    class Recording(DraftModelProposer):
        depths: list = []

        def propose(self, batch, src, policy, ctx, max_depth, process, prefix_of, free_depth=None):
            self.depths.append(max_depth.tolist())
            return super().propose(batch, src, policy, ctx, max_depth, process, prefix_of)

    class Trusting(StaticChain):
        def node_values(self, tree):
            return torch.where(tree.valid, torch.tensor(LOOKUP_TRUSTED), torch.tensor(0.0))

    target, draft = pair("llama")
    ids = torch.tensor([[4, 5, 6, 7] * 6, [9, 8, 30, 41, 52, 63, 74, 85, 96, 3, 13, 23, 33, 43, 53, 63, 73, 83, 93,
                                         94, 95, 97, 98, 99]])
    prop = CombinedProposer(Recording(), LookupProposer())
    ref = reference(target, ids, torch.ones_like(ids), 6, eos=None)
    out = SpeculativeDecoder(target, draft, Trusting(3), eos_token_id=None, pad_token_id=0,
                             proposer=prop).generate(ids, torch.ones_like(ids), 6)
    assert torch.equal(out.sequences, ref)
    assert prop.skipped_rows > 0
    assert any(0 in d for d in Recording.depths)  # a row with a trusted lookup chain skipped the draft model


# --------------------------------------------------------------------------------------- entry points
def test_generate_with_prompt_lookup_alone_and_with_a_draft(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    target, draft = pair("qwen2")
    adaspec_hf.enable(target)
    try:
        ids, mask = repetitive_batch(3, 4)
        ref = reference(target, ids, mask, 16)
        kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=2,
                  adaptive=True)
        assert torch.equal(target.generate(ids, prompt_lookup=True, **kw), ref)
        assert target.adaspec_config.prompt_lookup and target.adaspec_stats.policy == "adaptive"
        assert torch.equal(target.generate(ids, prompt_lookup=True, assistant_model=draft, **kw), ref)
        # HF's own prompt-lookup options: a fixed length N, any batch size
        assert torch.equal(target.generate(ids, prompt_lookup_num_tokens=4, max_matching_ngram_size=2, **kw), ref)
        assert target.adaspec_stats.policy == "static-4" and target.adaspec_config.lookup_max_ngram == 2
        with pytest.raises(ValueError, match="prompt_lookup=True"):
            target.generate(ids, **kw)
        with pytest.raises(ValueError, match="prompt_lookup=True"):
            target.generate(ids, draft_policy="static-3", **kw)
        with pytest.raises(ValueError, match="conflicts"):
            target.generate(ids, prompt_lookup_num_tokens=4, draft_policy="static-2", **kw)
        with pytest.raises(ValueError, match="prompt-lookup option"):
            target.generate(ids, max_matching_ngram_size=2, assistant_model=draft, **kw)
    finally:
        adaspec_hf.disable(target)


def test_engine_serves_with_prompt_lookup_alone():
    target, _ = pair("llama")
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13] * 4, [40, 41, 42, 43, 44, 45]]
    with Engine(target, None, policy=StaticChain(4), prompt_lookup=True, max_rows=2, seed=0) as engine:
        hs = [engine.submit(p, max_new_tokens=12) for p in prompts]
    for h, p in zip(hs, prompts):
        x = torch.tensor([p])
        want = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert h.result().token_ids == want
    with pytest.raises(ValueError, match="prompt_lookup=True"):
        Engine(target, None, policy=StaticChain(4), start=False)


def test_profile_of_a_target_alone_times_no_draft():
    target, _ = pair("llama")
    prof = profile(target, None, rows=(1,), tokens=(1, 2), contexts=(8,), repeats=1, progress=False)
    assert prof.draft == [] and len(prof.target) == 2 and prof.key["draft"] == "no-draft"
    assert LatencyModel(prof).draft_time(1, 4, 8) == 0.0


@pytest.mark.parametrize("policy", ["smartspec", "adaptive-tree", "slo", "heuristic", "confidence"])
def test_every_policy_runs_with_both_proposers_merged(tmp_path, monkeypatch, policy):
    monkeypatch.setenv("ADASPEC_HF_CACHE", str(tmp_path))
    target, draft = pair("llama")
    ids, mask = repetitive_batch(2, 8)
    ref = reference(target, ids, mask, 12)
    out = adaspec_hf.adaptive_generate(target, ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                       pad_token_id=0, eos_token_id=2, assistant_model=draft, prompt_lookup=True,
                                       draft_policy=policy)
    assert torch.equal(out, ref)


def test_planner_skips_the_draft_where_the_lookup_is_the_better_buy():
    """Goodput, not a threshold: a row whose lookup expects many tokens skips the draft forwards,
    a row with nothing to look up keeps them; with every row's lookup strong, no draft runs."""
    from adaspec_hf.policies import StepContext

    planner = AdaptivePlanner(_lookup_latency(), max_depth=6)
    planner.latency.tables["draft"] = planner.latency.tables["target"]  # a draft as dear as the target
    ctx = StepContext(rows=2, context_len=torch.tensor([40, 40]), remaining=torch.tensor([50, 50]), sampling=False,
                      step=1)
    planner.max_depth(ctx)
    strong = torch.tensor([[0.95, 0.9, 0.85, 0.8, 0.75, 0.7], [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]])
    assert planner.skip_draft(strong, torch.tensor([6, 6])).all()
    planner = AdaptivePlanner(_lookup_latency(), max_depth=6)
    planner.max_depth(ctx)  # a cheap draft (no draft table: free forwards)
    mixed = torch.tensor([[0.95, 0.9, 0.85, 0.8, 0.75, 0.7], [0.0] * 6])
    assert planner.skip_draft(mixed, torch.tensor([6, 0])).tolist() == [True, False]


def test_the_example_runs_offline(tmp_path):
    """examples/prompt_lookup.py (tiny random models when no pair is built) checks its own outputs."""
    out = conftest.run_example("prompt_lookup.py", tmp_path)
    assert "lookup alone" in out and "static-10" in out
