"""The planner: picks 0 when verification is expensive, deepens when drafts are always accepted,
per-row lengths, and greedy equivalence with the planner on."""
from __future__ import annotations

import itertools

import pytest
import torch

from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.core import SpeculativeDecoder
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ObservedCosts
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.policies.smartspec import SmartSpec

NO_MEASURED = dict(observed=ObservedCosts(min_count=10**9))  # trust the injected latency model only
from adaspec_hf.policies import LevelContext, StepContext
from adaspec_hf.core.tree import DraftTree

from conftest import ARCHS, pair, ragged_batch

ROWS, TOKENS, CONTEXTS = (1, 2, 4, 8), (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48), (8, 64, 512)


def synthetic_latency(target_fn, draft_fn, overhead=1e-4) -> LatencyModel:
    grid = list(itertools.product(ROWS, TOKENS, CONTEXTS))
    return LatencyModel.from_points(
        target=[[r, t, c, target_fn(r, t, c)] for r, t, c in grid],
        draft=[[r, t, c, draft_fn(r, t, c)] for r, t, c in grid], overhead=overhead)


def flat_target() -> LatencyModel:  # fresh per use: planners correct their latency model online
    return synthetic_latency(lambda r, t, c: 0.010, lambda r, t, c: 0.0002)


def steep_target() -> LatencyModel:
    return synthetic_latency(lambda r, t, c: 0.010 * r * t, lambda r, t, c: 0.0002)


def test_picks_zero_when_verification_is_expensive():
    target, draft = pair("llama", "sdpa", same=True)  # drafts always accepted...
    planner = AdaptivePlanner(steep_target(), **NO_MEASURED)  # ...but every verified token costs a full forward
    ids, mask = ragged_batch(3, 6, 0)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = SpeculativeDecoder(target, draft, planner, eos_token_id=2, pad_token_id=0).generate(ids, mask, 20)
    assert torch.equal(out.sequences, ref)
    # only the idle probes draft (every 8th idle step, 1 then 2 tokens), nothing else
    probes = sum(1 for s in out.stats.steps if sum(s.drafted))
    assert probes <= len(out.stats.steps) // planner.probe_every
    assert out.stats.drafted_tokens <= 3 * (1 + 2)


def test_deepens_when_drafts_are_always_accepted():
    target, draft = pair("llama", "sdpa", same=True)
    acc = AcceptanceModel()
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4000, generator=g)
    acc.update(p, torch.ones(4000, dtype=torch.long), torch.ones(4000))  # stream: everything accepted
    planner = AdaptivePlanner(flat_target(), acc, **NO_MEASURED)
    ids, mask = ragged_batch(2, 6, 1)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=60, do_sample=False)
    out = SpeculativeDecoder(target, draft, planner, eos_token_id=2, pad_token_id=0).generate(ids, mask, 60)
    assert torch.equal(out.sequences, ref)
    assert out.stats.mean_draft_len > 4
    assert out.stats.tokens_per_step > 4


def test_level_decisions_follow_confidence():
    """Doubtful rows stop drafting; a confident row keeps the batch drafting. (In a padded batch a
    doubtful row's nodes below the confident row's width cost nothing, so they ride along.)"""
    ctx = StepContext(rows=2, context_len=torch.tensor([20, 20]), remaining=torch.tensor([50, 50]),
                      sampling=False, step=1, row_ids=torch.tensor([0, 1]))

    calibrated = AcceptanceModel()  # a calibration where acceptance = draft probability
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4000, generator=g)
    calibrated.update(p, torch.ones(4000, dtype=torch.long), (torch.rand(4000, generator=g) < p).float())

    def decide(p0, p1):
        planner = AdaptivePlanner(steep_target_mild(), calibrated, **NO_MEASURED)
        depth = planner.max_depth(ctx)
        lctx = LevelContext(level=1, cand_path_prob=torch.tensor([[p0], [p1]]),
                            cand_prob=torch.tensor([[p0], [p1]]), partial=DraftTree.empty(2), step=ctx,
                            max_depth=depth, cand_parent=torch.tensor([[-1], [-1]]))
        return [t.tolist() for t in planner.choose(lctx)]

    n_add, n_exp = decide(0.02, 0.03)
    assert n_add == [0, 0] and n_exp == [0, 0]
    n_add, n_exp = decide(0.99, 0.03)
    assert n_add[0] == 1 and n_exp[0] == 1


def steep_target_mild() -> LatencyModel:
    return synthetic_latency(lambda r, t, c: 0.010 + 0.0005 * r * (t - 1), lambda r, t, c: 0.0002)


def test_high_load_stops_speculating():
    """Same acceptance, but a verify cost that grows with rows x tokens: the planner drafts at
    batch 1 and stops at batch 8 by itself."""
    lat = synthetic_latency(lambda r, t, c: 0.004 + 0.003 * max(r * t - 4, 0), lambda r, t, c: 0.0003)
    acc = AcceptanceModel()
    acc.update(torch.full((2000,), 0.8), torch.ones(2000, dtype=torch.long), (torch.rand(2000) < 0.8).float())

    def depth_for(rows):
        planner = AdaptivePlanner(lat, acc, **NO_MEASURED)
        ctx = StepContext(rows=rows, context_len=torch.full((rows,), 30), remaining=torch.full((rows,), 50),
                          sampling=False, step=1, row_ids=torch.arange(rows))
        for r in range(rows):
            planner.alpha[r] = 0.8
        return int(planner.max_depth(ctx).max())

    assert depth_for(1) > 0
    assert depth_for(8) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["adaptive", "adaptive-tree", "smartspec"])
def test_greedy_equivalence_with_planner(arch, policy):
    target, draft = pair(arch)
    acc = AcceptanceModel()
    if policy == "smartspec":
        planner = SmartSpec(flat_target(), acc)
    else:
        planner = AdaptivePlanner(flat_target(), acc, tree=policy == "adaptive-tree")
    ids, mask = ragged_batch(5, 9, 3)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = SpeculativeDecoder(target, draft, planner, eos_token_id=2, pad_token_id=0).generate(ids, mask, 30)
    assert torch.equal(out.sequences, ref)
    assert out.stats.drafted_tokens > 0


def test_drafters_partial_validity_is_the_partial_trees():
    """The tree planner reads the nodes-so-far validity without building the partial tree: at every
    level of a ragged batch and at batch 1, the same mask as the built tree's, and the record held
    (the numpy path priced the levels)."""
    from adaspec_hf.policies import tree_plan

    target, _ = pair(ARCHS[0])  # drafting with the target itself: every node accepted, deep trees
    checked = {"levels": 0, "recorded": 0}
    real = tree_plan._recorded_for

    def recorded_for(self, valid_t):
        out = real(self, valid_t)
        checked["recorded"] += out is not None
        return out

    class Checking(AdaptivePlanner):
        def choose(self, ctx):
            cheap = ctx.valid
            assert torch.equal(cheap, ctx.partial().valid)
            checked["levels"] += int(cheap.shape[1] > 0)
            return super().choose(ctx)

    tree_plan._recorded_for = recorded_for
    try:
        for rows in (5, 1):
            ids, mask = ragged_batch(rows, 9, 3)
            planner = Checking(flat_target(), AcceptanceModel(), tree=True)
            SpeculativeDecoder(target, target, planner, eos_token_id=2, pad_token_id=0).generate(ids, mask, 40)
    finally:
        tree_plan._recorded_for = real
    assert checked["levels"] >= 5 and checked["recorded"] >= 5, checked


def test_idle_probes_measure_wider_verifies():
    """With a profile that says wide verifies are ruinous, the planner still probes now and then
    (1, 2, 4 tokens), so that real measurements can correct the profile; each probe waits for its
    price (here 1, 2 and 4 plain steps) over the probe budget. Replayed offline: the step costs
    are the profile's own, so nothing here depends on this machine's timing."""
    from adaspec_hf.sim import ProfileCost, simulate, synthetic_trace
    from adaspec_hf.policies.planner import PROBE_BUDGET, PROBE_LENGTHS

    lat = steep_target()
    planner = AdaptivePlanner(lat)
    res = simulate(planner, synthetic_trace(1, 300, 1.0), ProfileCost(lat))
    drafted = [c for c in res.chosen if c]
    assert planner.probes >= 3 and drafted[:3] == [float(k) for k in PROBE_LENGTHS]
    at = [i for i, c in enumerate(res.chosen) if c]
    assert at[0] >= 1 / PROBE_BUDGET - 1 and at[1] - at[0] >= 2 / PROBE_BUDGET  # a 1-token probe costs a step
    assert len(drafted) == planner.probes  # only probes drafted: the profile says nothing else pays
    assert planner.observed.get(1, 2) is not None  # a probe measured a 2-token verify


def test_measured_costs_override_the_profile():
    """A measurement below the profile is believed at once; one above it only once confirmed."""
    lat = steep_target()
    planner = AdaptivePlanner(lat)
    profile_q2, profile_q3 = lat.target_time(1, 2, 10), lat.target_time(1, 3, 10)
    planner.observed.add(1, 2, profile_q2 / 10, profile_q2)
    assert planner._costs(1, 10, 3)[1] == pytest.approx(profile_q2 / 10)
    planner.observed.add(1, 3, profile_q3 * 10, profile_q3)  # one noisy step
    assert planner._costs(1, 10, 3)[2] == pytest.approx(profile_q3)
    for _ in range(planner.observed.confirm):
        planner.observed.add(1, 3, profile_q3 * 10, profile_q3)
    assert planner._costs(1, 10, 3)[2] == pytest.approx(profile_q3 * 10)


def test_kept_cost_factors_equal_rebuilt_ones():
    """The per-width factors are kept across steps and patched by each measurement: the same as
    building them afresh from the table, whatever the order of measurements and reads."""
    import numpy as np

    rng = np.random.default_rng(5)
    kept = ObservedCosts(confirm=3)
    for _ in range(300):
        rows, q = int(rng.integers(1, 3)), int(rng.integers(1, 60))
        kept.add(rows, q, float(rng.uniform(0.5, 2.0)), 1.0)
        if rng.random() < 0.3:
            max_q = int(rng.integers(1, 70))
            fresh = ObservedCosts(confirm=3)
            fresh.table = dict(kept.table)
            assert np.array_equal(kept.factors(rows, max_q), fresh.factors(rows, max_q))
    assert any(n >= 3 for _, n in kept.table.values()) and any(n < 3 for _, n in kept.table.values())


def test_measured_shapes_follow_the_machine_drift():
    """Drift is not a shape's cost: q=3 measured during a fast spell (half the profile's time, when
    every shape ran at half) must not stay cheaper than q=2 once the machine is back at full speed."""
    lat = steep_target()
    planner = AdaptivePlanner(lat)
    for q in (2, 3):
        for _ in range(planner.observed.confirm):
            planner.observed.add(1, q, lat.target_time(1, q, 10), lat.target_time(1, q, 10))
    lat.observe("target", 1, 3, 10, 0.5 * lat.target_time(1, 3, 10))  # the fast spell: the drift correction moves
    fast = lat.correction("target")
    planner.observed.add(1, 3, 0.5 * lat.base_time("target", 1, 3, 10), lat.target_time(1, 3, 10))
    for _ in range(20):  # back to full speed, q=2 chosen from now on
        lat.observe("target", 1, 2, 10, lat.base_time("target", 1, 2, 10))
    assert lat.correction("target") > fast
    costs = planner._costs(1, 10, 3)
    assert costs[2] == pytest.approx(lat.target_time(1, 3, 10), rel=0.3)
    assert costs[2] > costs[1]  # the steep profile's order survives the spell


def test_top_children_and_runners_up_have_their_own_calibration():
    """At the same draft probability a parent's top child and its runners-up are accepted at very
    different rates (with a draft that is the target, 1 and 0): one calibration pooled over both
    undervalued deep chains and overvalued siblings, so trees grew wide instead of deep."""
    from adaspec_hf.core.tree import top_among_siblings
    from adaspec_hf.efficiency.state import ModeState

    prob = torch.tensor([[0.4, 0.3, 0.3, 0.2]])
    parent = torch.tensor([[-1, -1, 0, 0]])
    assert top_among_siblings(prob, parent).tolist() == [[True, False, True, False]]
    mode = ModeState()
    p = torch.full((400,), 0.3)
    d = torch.ones(400, dtype=torch.long)
    runner = torch.arange(400) % 2 == 1
    for _ in range(5):
        mode.update(p, d, (~runner).float(), None, runner)
    pred = mode.predict(p[:2], d[:2], None, runner[:2])
    assert pred[0] > 0.8 and pred[1] < 0.1


def test_chain_and_tree_planners_keep_their_own_draft_level_cost():
    """Planners of one pair share its measured costs, but a draft level's measured seconds include
    the planner's own per-step work, so a chain and a tree planner taking turns (a benchmark, a
    notebook trying both) each price levels at their own figure, not the other's."""
    from adaspec_hf.sim import ProfileCost, simulate, synthetic_trace

    lat = steep_target_mild()
    shared = ObservedCosts(min_count=1)
    chain = AdaptivePlanner(lat, observed=shared)
    tree = AdaptivePlanner(lat, observed=shared, tree=True, max_children=2)
    assert (chain.cost_kind, tree.cost_kind) == ("chain", "tree")
    bare = chain._draft_cost(1, 1, 10)
    trace = synthetic_trace(1, 80, 0.8, seed=1)
    simulate(tree, trace, ProfileCost(lat, level_extra=0.004))
    tree_level = shared.draft_per_level(1, "tree")
    assert tree_level is not None and shared.draft_per_level(1, "chain") is None
    assert chain._draft_cost(1, 1, 10) == bare < tree._draft_cost(1, 1, 10)
    simulate(chain, trace, ProfileCost(lat))
    assert shared.draft_per_level(1, "tree") == tree_level
    assert shared.draft_per_level(1, "chain") is not None and chain._draft_cost(1, 1, 10) < tree._draft_cost(1, 1, 10)


def test_tree_planner_looks_ahead_with_its_first_levels_runners_up():
    """A row whose top children are accepted too rarely for any chain to pay past the verify's jump
    from one token to two may still pay as a tree: its first level's runners-up are further chances
    at the same position. The chain planner stays idle there; the tree planner drafts once it has
    seen what the runners-up are worth, and not when they are worth little."""
    ctx = StepContext(rows=1, context_len=torch.tensor([20]), remaining=torch.tensor([50]), sampling=True, step=1,
                      row_ids=torch.tensor([0]), ends_together=True)
    depth = {}
    for name, tree, siblings in (("chain", False, 0.5), ("tree, runners-up unseen", True, None),
                                 ("tree", True, 0.5), ("tree, worthless runners-up", True, 0.02)):
        jump = synthetic_latency(lambda r, t, c: 0.010 if t == 1 else 0.013, lambda r, t, c: 0.0002)
        planner = AdaptivePlanner(jump, tree=tree, **NO_MEASURED)
        planner._row_counts[0] = (20.0, 100.0)  # the row's top children: accepted at 0.2
        planner.first_value[0] = 0.2
        if tree and siblings is not None:
            planner.first_siblings[0] = siblings
        depth[name] = int(planner.max_depth(ctx)[0])
    assert depth == {"chain": 0, "tree, runners-up unseen": 0, "tree": planner.cap, "tree, worthless runners-up": 0}
