"""The offline trace simulator and the oracle: fidelity against real runs, and deterministic
planner checks on synthetic traces (no timing anywhere: costs come from a fixed curve)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaspec_hf.core import SpeculativeDecoder
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ObservedCosts
from adaspec_hf.policies import StaticChain, StaticTree
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.sim import GpuShapedCost, ProfileCost, Trace, oracle_chain, record_trace, simulate, synthetic_trace
from adaspec_hf.sim.simulate import best_static
from conftest import pair


def latency(ratio: float = 10.0, growth: float = 0.02) -> LatencyModel:
    """Verify 10 ms (+2% per query token x row), draft ``1/ratio`` of it; corrections off."""
    t, d = [], []
    for r in (1, 2, 4, 8, 16, 32):
        for q in (1, 2, 4, 8, 16, 32):
            for c in (1, 4096):
                t.append([r, q, c, 0.01 * (1 + growth * r * q)])
                d.append([r, q, c, 0.01 / ratio * (1 + growth * r * q)])
    return LatencyModel.from_points(t, d, overhead=0.0005, bounds=(1.0, 1.0))


def planner(lat: LatencyModel, **kw) -> AdaptivePlanner:
    return AdaptivePlanner(lat, observed=ObservedCosts(min_count=10**9), **kw)


def walk_static(row, k: int, n: int) -> tuple[int, int]:
    """(steps, accepted) of static-k along one row, computed directly from run lengths."""
    t, steps, acc = 1, 0, 0
    while t < n:
        kk = min(k, n - t - 1)
        a = min(kk, row.run_length(t))
        t += a + 1
        steps += 1
        acc += a
    return steps, acc


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_static_chain_replay_matches_the_run_lengths(k):
    tr = synthetic_trace(3, 120, 0.7, seed=k)
    res = simulate(StaticChain(k), tr, ProfileCost(latency()))
    expect = [walk_static(r, k, r.length) for r in tr.rows]
    assert res.steps == sum(s for s, _ in expect) and res.accepted == sum(a for _, a in expect)
    assert res.tokens == sum(r.length for r in tr.rows)


def test_replay_reproduces_a_real_run():
    """Greedy static-4 and a static tree on real (tiny) models: the simulator's accepted tokens per
    step are the real decoder's, step for step."""
    target, draft = pair("llama")
    prompts = [[5, 17, 33, 8, 41, 9], [11, 12, 13, 14]]
    tr = record_trace(target, draft, prompts, max_new_tokens=40)
    for policy in (StaticChain(4), StaticTree(3, 2)):
        sim = simulate(copy.deepcopy(policy), tr, ProfileCost(latency()))
        real_acc = []
        for p, row in zip(prompts, tr.rows):
            ids = torch.tensor([p])
            out = SpeculativeDecoder(target, draft, copy.deepcopy(policy), pad_token_id=0).generate(ids, None, 40)
            assert out.new_tokens[0] == row.tokens  # speculation never changes the output
            real_acc += [s.accepted[0] for s in out.stats.steps]
        assert sim.accepted_per_step == [float(a) for a in real_acc], policy.name


def test_trace_round_trips(tmp_path):
    tr = synthetic_trace(2, 30, 0.5, seed=3)
    back = Trace.load(tr.save(tmp_path / "t.json"))
    assert [r.tokens for r in back.rows] == [r.tokens for r in tr.rows]
    assert np.allclose(back.rows[0].top_probs, tr.rows[0].top_probs, atol=1e-6)
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format"):
        Trace.load(tmp_path / "bad.json")


def test_oracle_bounds_every_static_length():
    tr = synthetic_trace(2, 150, 0.7, seed=5)
    cost = ProfileCost(latency())
    tok, sec = oracle_chain(tr, cost)
    _, statics = best_static(tr, cost)
    assert tok == sum(r.length for r in tr.rows)
    assert all(tok / sec >= r.tokens_per_s - 1e-9 for r in statics.values())
    assert tok / sec > max(r.tokens_per_s for r in statics.values())  # foresight is worth something here


def test_high_acceptance_cheap_draft_drafts_near_the_optimum():
    """Acceptance 0.9 and draft 1/10 of verify: the planner's mean draft length is within 1 of
    the best static k, and its speed within 5% of it."""
    tr = synthetic_trace(4, 200, 0.9, seed=1)
    cost = ProfileCost(latency(ratio=10))
    k, statics = best_static(tr, cost)
    res = simulate(planner(latency(ratio=10)), tr, cost)
    assert abs(res.mean_draft - k) <= 1.0, (res.mean_draft, k)
    assert res.tokens_per_s >= 0.95 * statics[k].tokens_per_s


def test_hopeless_draft_is_not_used():
    tr = synthetic_trace(4, 200, 0.05, seed=2)
    cost = ProfileCost(latency(ratio=10))
    res = simulate(planner(latency(ratio=10)), tr, cost)
    vanilla = simulate(StaticChain(0), tr, cost)
    assert res.mean_draft <= 0.3  # only the rare probes
    assert res.tokens_per_s >= 0.95 * vanilla.tokens_per_s
    off = simulate(planner(latency(ratio=10), probe_every=0), tr, cost)
    assert off.mean_draft < 0.05


def test_probes_that_do_not_pay_back_off_at_a_large_batch():
    """16 rows of a draft accepted 10% of the time: each probe verifies 16-64 nodes and nearly always
    gets one right, which is no reason to probe again soon; the gap must still grow to its cap."""
    from adaspec_hf.policies.planner import PROBE_MAX_GAP

    tr = synthetic_trace(16, 400, 0.1, seed=5)
    cost = ProfileCost(latency(ratio=10))
    p = planner(latency(ratio=10))
    res = simulate(p, tr, cost, batch=16)
    assert p.probe_gap == PROBE_MAX_GAP
    assert p.probes <= 3 + res.steps // PROBE_MAX_GAP + 5  # 8, 16, 32, 64, 64, ... idle steps apart
    vanilla = simulate(StaticChain(0), tr, cost, batch=16)
    assert res.tokens_per_s >= 0.97 * vanilla.tokens_per_s


def test_probes_are_priced_at_a_large_batch():
    """A draft that is never right, 16 rows, short calls (64 tokens) on a curve where wide verifies
    are dear: the first probes of every call (8, 16, 32 idle steps apart) cost ~5% of the time
    unless a probe waits for its price; priced, the planner stays within 3% of no speculation."""
    from adaspec_hf.policies.planner import PROBE_BUDGET

    lat = latency(ratio=10, growth=0.05)
    cost = ProfileCost(lat)
    p = planner(lat)
    simulate(p, synthetic_trace(16, 64, 0.0, confidence=0.3, seed=9), cost, batch=16)  # learns the draft is hopeless
    tr = synthetic_trace(16, 64, 0.0, confidence=0.3, seed=10)
    res = simulate(p, tr, cost, batch=16)
    vanilla = simulate(StaticChain(0), tr, cost, batch=16)
    assert 1 <= sum(c > 0 for c in res.chosen) <= 2  # it does still probe (unpriced: 3 probes, 0.94x vanilla)
    assert res.tokens_per_s >= (1 - PROBE_BUDGET * 0.6) * vanilla.tokens_per_s


def test_a_call_is_planned_for_its_slowest_row():
    """Two rows the draft predicts well next to two it does not, on a GPU-shaped curve: a generate
    call ends with its slowest row, so drafting deep for the easy rows (whose levels delay the hard
    ones too) must not be what the planner does; weighing rows by their steps left does it."""
    from adaspec_hf.sim.trace import Trace

    easy, hard = synthetic_trace(2, 120, 0.95, seed=3), synthetic_trace(2, 120, 0.45, seed=4)
    tr = Trace([easy.rows[0], hard.rows[0], easy.rows[1], hard.rows[1]], False, {})
    cost = GpuShapedCost()
    t, d = cost.as_latency_points()
    lat = LatencyModel.from_points(t, d, overhead=cost.overhead, bounds=(1.0, 1.0))
    best = max(simulate(StaticChain(k), tr, cost, batch=4).tokens_per_s for k in range(11))
    weighed = simulate(planner(lat), tr, cost, batch=4)
    flat = simulate(planner(lat), tr, cost, batch=4, ends_together=False)  # every row counted alike
    assert weighed.tokens_per_s >= 1.04 * flat.tokens_per_s  # measured 0.95 vs 0.89 of the best static
    assert weighed.tokens_per_s >= 0.93 * best
    assert weighed.mean_draft < flat.mean_draft


def test_gpu_shaped_cost_makes_width_free_until_the_budget():
    c = GpuShapedCost(base=0.02, budget=64, per_token=0.001)
    assert c.verify(1, 1, 0) == c.verify(8, 8, 0) == 0.02 and c.verify(8, 9, 0) > 0.02
    t, d = c.as_latency_points()
    lat = LatencyModel.from_points(t, d, overhead=c.overhead, bounds=(1.0, 1.0))
    assert abs(lat.target_time(4, 8, 64) - 0.02) < 1e-3


def jump_latency(jump_at: int = 3) -> LatencyModel:
    """Verify 10 ms up to ``jump_at - 1`` query tokens per row, then 20 ms and nearly flat (this
    CPU's shape: the built-in pair's verify goes from ~45 ms at one token to ~62 ms at two, then
    +~1.5 ms a token); draft 0.5 ms a level; corrections off."""
    t, d = [], []
    for r in (1, 2, 4):
        for q in (1, 2, 3, 4, 6, 8, 12, 16):
            for c in (1, 4096):
                t.append([r, q, c, (0.010 if q < jump_at else 0.020 + 0.0001 * q) * r])
                d.append([r, q, c, 0.0005])
    return LatencyModel.from_points(t, d, overhead=0.0005, bounds=(1.0, 1.0))


@pytest.mark.parametrize("jump_at", [2, 3, 4])
def test_a_jump_in_the_verify_cost_does_not_stop_the_planner(jump_at):
    """Acceptance 0.9 on a cost curve that jumps then stays flat: going past the jump pays several
    times over, but the first node past it does not. A rule that looks one level ahead stops in
    front of the jump; with the look-ahead the planner drafts near the best static length."""
    tr = synthetic_trace(2, 200, 0.9, seed=3)
    cost = ProfileCost(jump_latency(jump_at))
    k, statics = best_static(tr, cost)
    assert k >= 6  # deep drafting is what pays here
    res = simulate(planner(jump_latency(jump_at)), tr, cost)
    assert res.mean_draft >= jump_at + 1, res.mean_draft
    assert res.tokens_per_s >= 0.9 * statics[k].tokens_per_s, (res.tokens_per_s, statics[k].tokens_per_s)


def test_lookahead_prices_deeper_levels_at_the_running_rate():
    from adaspec_hf.policies.chain import lookahead_pays

    f = np.float32
    verify = np.asarray([0.010, 0.010, 0.020] + [0.0201] * 10, dtype=f)  # by nodes: a jump at the 2nd
    g_now = f(1.9) / f(0.0105)  # one node (value 0.9) verified, before the jump
    args = dict(counts=np.asarray([1]), tokens=f(1.9), spent=f(0.0005), extra=f(0.0005), verify=verify,
                levels_left=10, g_best=g_now)
    assert lookahead_pays(np.asarray([0.81], dtype=f), np.asarray([0.9], dtype=f), **args)
    assert not lookahead_pays(np.asarray([0.81], dtype=f), np.asarray([0.2], dtype=f), **args)  # a row that fails soon
    assert not lookahead_pays(np.asarray([0.0], dtype=f), np.asarray([0.9], dtype=f), **args)  # nothing to continue
    assert not lookahead_pays(np.asarray([0.81], dtype=f), np.asarray([0.9], dtype=f), **{**args, "levels_left": 1})


@pytest.mark.parametrize("batch,curve", [(1, "smooth"), (3, "smooth"), (1, "jump"), (3, "jump")])
def test_chain_fast_path_decides_as_the_general_path(batch, curve):
    """The numpy chain path is an implementation detail: identical chosen lengths, step for step
    (on a jump in the verify cost too, where the look-ahead decides)."""
    tr = synthetic_trace(3, 120, 0.75, seed=11)
    lat = latency(ratio=20) if curve == "smooth" else jump_latency(3)
    fast, slow = planner(lat), planner(lat)
    slow._chain_fast = lambda ctx: False
    slow._select_chain = lambda tree: None
    a = simulate(fast, tr, ProfileCost(lat), batch=batch)
    b = simulate(slow, tr, ProfileCost(lat), batch=batch)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert a.mean_draft > 1.0  # it did draft: the comparison is not vacuous


def runner_up_trace(n_rows: int, length: int, seed: int) -> Trace:
    """Draft top-3 with varied confidences; the output is the draft's argmax 70% of the time, its
    runner-up 20%: a tree's second children are sometimes accepted."""
    from adaspec_hf.sim.trace import RowTrace

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        y = rng.integers(10, 1000, size=length)
        u = rng.random(length)
        rank = np.where(u < 0.7, 0, np.where(u < 0.9, 1, 3))  # 3: in none of the top-3
        top = np.stack([y + 1 + j for j in range(3)], 1)
        for j in range(3):
            top[rank == j, j] = y[rank == j]
        p1 = rng.uniform(0.3, 0.95, length)
        p2 = (1 - p1) * rng.uniform(0.3, 0.8, length)
        probs = np.stack([p1, p2, (1 - p1 - p2) * 0.5], 1)
        rows.append(RowTrace(16, y.tolist(), top, probs))
    return Trace(rows, False, {"synthetic": "runner-ups"})


@pytest.mark.parametrize("batch,curve", [(1, "smooth"), (3, "smooth"), (1, "jump"), (3, "flat")])
def test_tree_numpy_path_decides_as_the_torch_path(batch, curve):
    """The tree planner's recorded node values (numpy) are an implementation detail: identical
    trees, step for step, to pricing every level from the partial tree with torch."""
    tr = runner_up_trace(3, 100, seed=12)
    lat = {"smooth": latency(ratio=20), "jump": jump_latency(3), "flat": latency(ratio=30, growth=0.0)}[curve]
    fast, slow = planner(lat, tree=True), planner(lat, tree=True)
    slow.record_trees = False
    a = simulate(fast, tr, ProfileCost(lat), batch=batch)
    b = simulate(slow, tr, ProfileCost(lat), batch=batch)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert a.mean_draft > 1.5 and a.drafted > a.accepted + a.steps  # trees with runners-up: not vacuous
    assert fast._step.tree_levels is not None or fast._step.probe  # the record held to the end


def test_fruitless_probes_back_off():
    """A draft that is never right is re-tested ever more rarely (the gap doubles up to a bound)."""
    from adaspec_hf.policies.planner import PROBE_MAX_GAP

    tr = synthetic_trace(1, 400, 0.0, confidence=0.3, seed=4)
    p = planner(latency(ratio=10))
    res = simulate(p, tr, ProfileCost(latency(ratio=10)))
    assert 3 <= p.probes <= 2 + res.steps // PROBE_MAX_GAP + 5  # 8, 16, 32, 64, 64, ... idle steps apart
    assert p.probe_gap == PROBE_MAX_GAP


def test_row_rate_is_a_ratio_of_node_counts():
    """At acceptance 0.9 per node the row's rate estimate is near 0.9; a mean of per-step ratios
    j / (j + 1) would sit near 0.8."""
    tr = synthetic_trace(1, 600, 0.9, seed=6)
    p = planner(latency(ratio=10))
    simulate(p, tr, ProfileCost(latency(ratio=10)))
    acc, tried = p._row_counts[0]
    assert abs(acc / tried - 0.9) < 0.08


def test_a_tree_rows_rate_is_its_top_childrens():
    """A tree planner tests runners-up that are (here) never accepted: the row's rate, which prices
    going one level deeper, must stay the top children's 0.9, not drop toward a hopeless draft's
    (it did: the tree planner then stopped drafting on text where drafting paid)."""
    tr = synthetic_trace(1, 600, 0.9, seed=6, confidence=0.9, width=2)
    lat = latency(ratio=30, growth=0.0)  # wide verifies are free here: the tree drafts runners-up
    p = planner(lat, tree=True)
    res = simulate(p, tr, ProfileCost(lat))
    assert res.mean_draft > 2 * res.accepted / res.steps  # many drafted nodes are runners-up...
    acc, tried = p._row_counts[0]
    assert acc / tried > 0.8  # ...and left out of the rate (counted, it sat near 0.5)


def test_uncertain_low_rate_rows_keep_drafting_when_it_pays():
    """Acceptance 0.35 with an over-confident draft and a cheap draft: short drafts pay, and the
    planner must not talk itself out of them on a few unlucky nodes."""
    tr = synthetic_trace(4, 150, 0.35, confidence=0.7, seed=8)
    cost = ProfileCost(latency(ratio=20, growth=0.01))
    k, statics = best_static(tr, cost)
    assert k >= 1  # the premise: drafting pays here
    res = simulate(planner(latency(ratio=20, growth=0.01)), tr, cost)
    assert res.mean_draft >= 0.5 and res.tokens_per_s >= 0.95 * statics[k].tokens_per_s


def test_sampled_replay_reproduces_a_real_run(monkeypatch):
    """T=0.7: the trace's race-ranked candidates are what the drafter proposes under the same key,
    so a static chain replays the real decoder's accepted tokens step for step; a tree, whose nodes
    off the output path the trace approximates (it has no draft distribution there), within 10%."""
    import adaspec_hf.core.decoder as decoder
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    target, draft = pair("llama")
    prompts = [[5, 17, 33, 8, 41, 9], [11, 12, 13, 14]]
    tr = record_trace(target, draft, prompts, max_new_tokens=30, do_sample=True, temperature=0.7, seed=40)
    proc = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    for policy in (StaticChain(3), StaticTree(3, 2)):
        sim = simulate(copy.deepcopy(policy), tr, ProfileCost(latency()))
        real_acc = []
        for i, (p, row) in enumerate(zip(prompts, tr.rows)):
            monkeypatch.setattr(decoder, "draw_keys", lambda n, g, _k=40 + i: torch.full((n,), _k))
            out = SpeculativeDecoder(target, draft, copy.deepcopy(policy), do_sample=True, processors=proc,
                                     pad_token_id=0).generate(torch.tensor([p]), None, 30)
            assert out.new_tokens[0] == row.tokens  # the trace's sample is the engine's under that key
            real_acc += [s.accepted[0] for s in out.stats.steps]
        if isinstance(policy, StaticChain):
            assert sim.accepted_per_step == [float(a) for a in real_acc], policy.name
        else:
            assert abs(sum(sim.accepted_per_step) - sum(real_acc)) <= 0.1 * sum(real_acc), (
                sum(sim.accepted_per_step), sum(real_acc))
        assert sum(real_acc) > 0



def wide_draft_latency(ratio: float = 20.0) -> LatencyModel:
    """Verify 10 ms (+1% per query token x row); a draft forward costs 1/ratio of it per query token
    (a draft whose forward grows with its width, as the perfect draft's profile does)."""
    t, d = [], []
    for r in (1, 2, 4, 8, 16, 32):
        for q in (1, 2, 4, 8, 16, 32):
            for c in (1, 4096):
                t.append([r, q, c, 0.01 * (1 + 0.01 * r * q)])
                d.append([r, q, c, 0.01 / ratio * q * (1 + 0.01 * r)])
    return LatencyModel.from_points(t, d, overhead=0.0005, bounds=(1.0, 1.0))


def test_a_tree_that_expands_one_node_a_level_pays_a_one_token_forward():
    """A draft that is always right but unsure of it (top probability 0.3): the best tree is the
    chain, expanded one node a level. Priced as a forward of every child it could expand, the tree
    planner stopped levels short of the chain planner (perfect draft, batch 1, replayed: 0.87x);
    each forward is priced, and simulated, at its real width."""
    tr = synthetic_trace(2, 300, 1.0, confidence=0.3, width=4, seed=13)
    lat = wide_draft_latency()
    chain = simulate(planner(lat), tr, ProfileCost(lat))
    tree = simulate(planner(lat, tree=True), tr, ProfileCost(lat))
    assert chain.mean_draft > 6  # deep chains pay here: the comparison is not vacuous
    assert tree.tokens_per_s >= 0.97 * chain.tokens_per_s, (tree.summary(), chain.summary())


def test_the_simulator_charges_a_draft_forward_at_its_width():
    """StaticTree(2, 2) expands two nodes at its first level: that forward is charged as two tokens."""
    tr = synthetic_trace(1, 40, 1.0, confidence=0.6, width=2, seed=14)
    lat = wide_draft_latency()
    cost = ProfileCost(lat)
    res = simulate(StaticTree(2, 2), tr, cost)
    catch_up, wide = cost.draft(1, 1.0, 20.0), cost.draft(1, 2.0, 20.0)
    assert wide > 1.5 * catch_up
    per_step = (res.time - res.steps * cost.overhead) / res.steps
    verify = [cost.verify(1, q, 20.0) for q in range(1, 8)]
    assert per_step >= catch_up + wide + min(verify) - 1e-9


@pytest.mark.parametrize("curve,accept", [("smooth", 0.75), ("jump", 0.75), ("smooth", 0.95), ("jump", 0.4)])
def test_one_row_chain_path_decides_as_the_vector_path(monkeypatch, curve, accept):
    """At batch 1 the chain planner works on float32 scalars: the same decisions, step for step, as
    its B-vector path, on a jump in the verify cost too (where the look-ahead decides)."""
    from adaspec_hf.policies import chain

    tr = synthetic_trace(1, 200, accept, seed=21)
    lat = latency(ratio=20) if curve == "smooth" else jump_latency(3)
    a = simulate(planner(lat), tr, ProfileCost(lat), batch=1)
    monkeypatch.setattr(chain, "_plan_one_row", chain._plan_rows)
    b = simulate(planner(lat), tr, ProfileCost(lat), batch=1)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert a.mean_draft > 1.0


@pytest.mark.parametrize("curve", ["smooth", "jump", "flat"])
def test_one_row_tree_values_are_the_vector_paths(monkeypatch, curve):
    """At batch 1 the tree planner prices a level's candidates on float32 scalars: bit for bit the
    (B, C) path's values at every level of a run with runners-up (sibling predictions, a blended
    calibration, parents at several depths), hence the same trees."""
    from adaspec_hf.policies import tree_plan

    tr = runner_up_trace(1, 150, seed=23)
    lat = {"smooth": latency(ratio=20), "jump": jump_latency(3), "flat": latency(ratio=30, growth=0.0)}[curve]
    one_row, rows = tree_plan._recorded_values_one_row, tree_plan._recorded_values_rows
    seen = {"levels": 0, "siblings": 0}

    def both(self, ctx, node_path):
        got, want = one_row(self, ctx, node_path), rows(self, ctx, node_path)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), (g, w)
        seen["levels"] += 1
        seen["siblings"] += int(ctx.cand_parent is not None and ctx.cand_prob.shape[1] > 1)
        return got

    monkeypatch.setattr(tree_plan, "_recorded_values_one_row", both)
    a = simulate(planner(lat, tree=True), tr, ProfileCost(lat), batch=1)
    monkeypatch.setattr(tree_plan, "_recorded_values_one_row", rows)
    b = simulate(planner(lat, tree=True), tr, ProfileCost(lat), batch=1)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert seen["levels"] > 50 and seen["siblings"] > 10 and a.drafted > a.accepted + a.steps  # not vacuous


@pytest.mark.parametrize("curve", ["smooth", "jump", "flat"])
def test_one_row_tree_rule_decides_as_the_vector_path(monkeypatch, curve):
    """At batch 1 the tree planner's level rule runs on scalars: at every level the same nodes
    added and expanded, and the same predicted step time, as its (B, C) path."""
    from adaspec_hf.policies import tree_plan

    tr = runner_up_trace(1, 150, seed=29)
    lat = {"smooth": latency(ratio=20), "jump": jump_latency(3), "flat": latency(ratio=30, growth=0.0)}[curve]
    one_row, rows = tree_plan._plan_tree_one_row, tree_plan._plan_tree_rows
    seen = {"levels": 0, "wide": 0}

    def both(self, ctx, v, have_n, have_val):
        want = rows(self, ctx, v, np.asarray([have_n], dtype=np.int64), have_val)
        t_want = self.predicted_time
        got = one_row(self, ctx, v, have_n, have_val)
        assert self.predicted_time == t_want
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w), (got, want)
        seen["levels"] += 1
        seen["wide"] += int(got[0][0] > 1 or got[1][0] > 1)
        return got

    monkeypatch.setattr(tree_plan, "_plan_tree_one_row", both)
    a = simulate(planner(lat, tree=True), tr, ProfileCost(lat), batch=1)
    monkeypatch.setattr(tree_plan, "_plan_tree_one_row",
                        lambda self, ctx, v, n, val: rows(self, ctx, v, np.asarray([n], dtype=np.int64), val))
    b = simulate(planner(lat, tree=True), tr, ProfileCost(lat), batch=1)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert seen["levels"] > 50 and seen["wide"] > 10  # levels that add or expand several nodes: not vacuous


def test_predict_one_equals_predict_np():
    """The scalar prediction is the array one, bit for bit (a calibrated, depth-adjusted model)."""
    from adaspec_hf.efficiency.acceptance import AcceptanceModel

    rng = np.random.default_rng(3)
    m = AcceptanceModel()
    for _ in range(40):
        p = rng.random(6)
        m.update_np(p, rng.integers(1, 9, 6), (rng.random(6) < p ** 0.5).astype(float))
    p = np.concatenate([rng.random(300), [0.0, 1.0, 0.5, 1e-9, 0.999999]]).astype(np.float32)
    for d in (0, 1, 3, 8, 40):
        want = m.predict_np(p, d)
        got = np.asarray([m.predict_one(float(x), d) for x in p], dtype=np.float32)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.array_equal(np.asarray(m.predict_list(p.tolist(), d), dtype=np.float32), want)


def test_update_list_equals_update_np():
    """The scalar calibration update is the array one, bit for bit: the same statistics after many
    batches of nodes (probabilities at and beyond the ends, depths beyond the table, float targets)."""
    from adaspec_hf.efficiency.acceptance import AcceptanceModel

    rng = np.random.default_rng(11)
    for depth_adjust in (True, False):
        a, b = AcceptanceModel(depth_adjust=depth_adjust), AcceptanceModel(depth_adjust=depth_adjust)
        for _ in range(200):
            n = int(rng.integers(1, 12))
            p = np.concatenate([rng.random(n - 1), rng.choice([0.0, 1.0, 1.2, -0.1, 0.1, 0.95], 1)]).astype(np.float32)
            d = rng.integers(0, 20, n)
            y = np.where(rng.random(n) < 0.5, rng.random(n), (rng.random(n) < p).astype(float)).astype(np.float32)
            a.update_np(p, d, y)
            b.update_list(p.tolist(), d.tolist(), y.tolist())
            assert torch.equal(a.stats, b.stats) and a.seen == b.seen
            assert np.array_equal(a.predict_np(p, 3), b.predict_np(p, 3))


@pytest.mark.parametrize("tree", [False, True])
def test_one_row_learning_is_the_array_paths(monkeypatch, tree):
    """At batch 1 the planner learns from a step on Python scalars: after every step of a run (top
    children and runners-up, accepted and rejected), the calibrations, the row's rate and
    calibration factor and the pair's running rate equal the array path's, bit for bit."""
    from adaspec_hf.policies import learning

    tr = runner_up_trace(1, 150, seed=31) if tree else synthetic_trace(1, 200, 0.7, seed=31)
    lat = latency(ratio=20)
    one_row = learning._learn_one_row
    seen = {"steps": 0, "runners": 0}

    def both(planner, outcome):
        ref = copy.deepcopy(planner)
        learning._learn_arrays(ref, outcome)
        one_row(planner, outcome)
        for kind in ("acceptance", "sibling", "lookup"):
            got, want = getattr(planner.mode, kind), getattr(ref.mode, kind)
            assert torch.equal(got.stats, want.stats) and got.seen == want.seen, kind
        assert planner.mode.running_rate == ref.mode.running_rate
        assert (planner._row_counts, planner._row_calib, planner.alpha) == (ref._row_counts, ref._row_calib, ref.alpha)
        seen["steps"] += 1
        seen["runners"] += int(planner.mode.sibling.seen > 0)

    monkeypatch.setattr(learning, "_learn_one_row", both)
    a = simulate(planner(lat, tree=tree), tr, ProfileCost(lat), batch=1)
    monkeypatch.setattr(learning, "_learn_one_row", learning._learn_arrays)
    b = simulate(planner(lat, tree=tree), tr, ProfileCost(lat), batch=1)
    assert a.chosen == b.chosen and a.accepted == b.accepted and a.steps == b.steps
    assert seen["steps"] > 30 and (seen["runners"] > 10 or not tree)  # not vacuous


def test_a_profile_cost_scales_its_verify_and_adds_to_each_draft_level():
    """The replay can be charged with the loop's measured costs: every verify a multiple of the
    profile's, every draft level the profile's forward plus a constant; nothing else moves."""
    lat = latency()
    base, scaled = ProfileCost(lat), ProfileCost(lat, level_extra=0.002, verify_scale=0.8)
    for rows, q, ctx in ((1, 1, 64.0), (4, 6, 300.0), (16, 3, 1000.0)):
        assert scaled.verify(rows, q, ctx) == pytest.approx(0.8 * base.verify(rows, q, ctx))
        assert scaled.draft(rows, q, ctx) == pytest.approx(base.draft(rows, q, ctx) + 0.002)
    tr = synthetic_trace(2, 80, 0.7, seed=3)
    a, b = simulate(StaticChain(3), tr, base), simulate(StaticChain(3), tr, ProfileCost(lat, verify_scale=0.5))
    assert (a.steps, a.accepted) == (b.steps, b.accepted) and b.tokens_per_s > a.tokens_per_s
    with pytest.raises(ValueError, match="verify_scale"):
        ProfileCost(lat, verify_scale=0.0)
