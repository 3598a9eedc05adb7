"""Replay a :class:`~adaspec_hf.sim.trace.Trace` against a real policy object on a cost curve.

The simulator grows draft trees level by level exactly as the drafter offers them to a policy
(candidates sorted by path probability, ``choose`` -> nodes added / expanded, then ``select``),
with candidates and outcomes read from the trace, and charges each step with the cost curve:
``overhead + draft forwards + verify(rows, 1 + widest row)``, each draft forward as wide as the most
nodes a row expands. The policy sees the same contexts and outcomes as in a real run, so its
learning (calibration, running rates, probes) runs too; only time is simulated. Decision time (the policy's own Python) is measured and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaspec_hf.core.step import TimedPolicy
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome
from adaspec_hf.policies.static import StaticChain
from adaspec_hf.sim.cost import CostCurve
from adaspec_hf.sim.trace import Trace


@dataclass
class SimStep:
    """One simulated step: what was verified, what was accepted, what it cost."""

    tree: DraftTree
    n_accepted: torch.Tensor  # (B,)
    step_time: float


def sim_step(call: TimedPolicy, rows, n_gen: list[int], ctx: StepContext, cost: CostCurve, width: int) -> SimStep:
    """Draft (as the drafter offers candidates), select, verify (from the trace) and charge one
    step of rows ``rows`` (trace rows, ``n_gen`` tokens generated each) under ``call``'s policy;
    the policy observes the outcome."""
    b = len(rows)
    remaining, length, ids = ctx.remaining, ctx.context_len, ctx.row_ids
    md = torch.minimum(call.max_depth(ctx).cpu().clamp(min=0), (remaining - 1).clamp(min=0))
    nodes, widths = ([[] for _ in range(b)], [])
    drafted_any = bool((md > 0).any())
    if drafted_any:
        nodes, widths = _grow(call, rows, n_gen, ctx, md, width)
    tree = _tree(nodes, b)
    on_path = torch.zeros_like(tree.valid)
    for i, row in enumerate(nodes):
        for j, nd in enumerate(row):
            on_path[i, j] = nd[4]
    if tree.width:
        keep = call.select(tree, ctx).cpu() & tree.valid
        on_path = torch.stack([torch.cat([on_path[i][keep[i]], torch.zeros(tree.width - int(keep[i].sum()), dtype=torch.bool)])
                               for i in range(b)])
        tree = tree.select(keep)
        on_path = on_path[:, : tree.width] & tree.valid
    accepted = on_path
    n_acc = accepted.sum(1)
    par = tree.parents
    par_ok = torch.where(par >= 0, accepted.gather(1, par.clamp(min=0)) if tree.width else par >= 0, True)
    tested = tree.valid & par_ok
    context = float(length.float().mean())
    q = 1 + (int(tree.valid.sum(1).max()) if tree.width else 0)
    # the catch-up forward, then one per expanded level, as wide as the most nodes a row expanded
    draft_time = (cost.draft(b, 1.0, context) + sum(cost.draft(b, float(w), context) for w in widths)
                  if drafted_any else 0.0)
    verify_time = cost.verify(b, q, context)
    step_time = cost.overhead + draft_time + verify_time
    call.observe(StepOutcome(tree=tree, n_accepted=n_acc, tested=tested, accept_prob=accepted.float(),
                                accepted=accepted, step_time=step_time, draft_time=draft_time,
                                verify_time=verify_time, context_len=length + n_acc + 1, row_ids=ids))
    return SimStep(tree=tree, n_accepted=n_acc, step_time=step_time)


@dataclass
class SimResult:
    policy: str
    tokens: int = 0
    time: float = 0.0  # simulated seconds (decision time excluded)
    decision_time: float = 0.0  # measured seconds inside the policy's calls
    steps: int = 0
    drafted: int = 0  # verified draft nodes, all rows
    accepted: int = 0
    row_steps: int = 0
    chosen: list[float] = field(default_factory=list)  # mean verified nodes per row, per step
    accepted_per_step: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time if self.time > 0 else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.row_steps if self.row_steps else 0.0

    @property
    def mean_draft(self) -> float:
        return self.drafted / self.row_steps if self.row_steps else 0.0

    @property
    def decision_fraction(self) -> float:
        return self.decision_time / self.time if self.time > 0 else 0.0

    def summary(self) -> dict:
        return {"policy": self.policy, "tokens": self.tokens, "sim_time_s": round(self.time, 6),
                "tokens_per_s": round(self.tokens_per_s, 3), "tokens_per_pass": round(self.tokens_per_pass, 4),
                "mean_draft": round(self.mean_draft, 4), "steps": self.steps,
                "decision_fraction": round(self.decision_fraction, 4)}


def _tree(nodes: list[list[tuple]], b: int) -> DraftTree:
    """DraftTree from per-row node lists (token, parent, depth, prob, on_path)."""
    n = max((len(r) for r in nodes), default=0)
    tok = torch.zeros(b, n, dtype=torch.long)
    par = torch.full((b, n), -1, dtype=torch.long)
    dep = torch.zeros(b, n, dtype=torch.long)
    prob = torch.zeros(b, n)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, row in enumerate(nodes):
        for j, (t, p, d, q, _) in enumerate(row):
            tok[i, j], par[i, j], dep[i, j], prob[i, j], valid[i, j] = t, p, d, q, True
    return DraftTree(tokens=tok, parents=par, depth=dep, valid=valid, draft_prob=prob,
                     sampled=torch.zeros_like(valid), draft_slot=torch.full((b, n), -1, dtype=torch.long))


def _grow(call: TimedPolicy, trace_rows, n_gen: list[int], ctx: StepContext, max_depth: torch.Tensor, width: int
          ) -> tuple[list[list[tuple]], list[int]]:
    """Nodes per row as the drafter would add them; returns (nodes, the width of each draft forward
    after the catch-up: the most nodes any row expanded at that level)."""
    b = len(trace_rows)
    nodes: list[list[tuple]] = [[] for _ in range(b)]
    # frontier per row: (node index or -1, output position predicted by its children, path prob, on path)
    frontier = [[(-1, n_gen[i], 1.0, True)] if int(max_depth[i]) > 0 else [] for i in range(b)]
    widths: list[int] = []
    limit = int(max_depth.max()) if b else 0
    for level in range(1, limit + 1):
        cands = []  # per row: sorted list of (path, prob, token, parent, on_path)
        for i, tr in enumerate(trace_rows):
            row = []
            for node, pos, path, on in frontier[i]:
                if pos >= tr.length:
                    continue
                for c in range(min(width, tr.top_tokens.shape[1])):
                    p = float(tr.top_probs[pos, c])
                    tok = int(tr.top_tokens[pos, c])
                    row.append((path * p, p, tok, node, on and tok == tr.tokens[pos], pos))
            row.sort(key=lambda x: -x[0])  # stable: ties keep the frontier order, as the drafter's argsort
            cands.append(row)
        c = max((len(r) for r in cands), default=0)
        c_path = torch.zeros(b, c)
        c_prob = torch.zeros(b, c)
        c_par = torch.full((b, c), -1, dtype=torch.long)
        for i, row in enumerate(cands):
            for j, (pp, p, _, par, _, _) in enumerate(row):
                c_path[i, j], c_prob[i, j], c_par[i, j] = pp, p, par
        lctx = LevelContext(level, c_path, c_prob, _tree(nodes, b), ctx, max_depth, cand_parent=c_par)
        n_add, n_exp = call.choose(lctx)
        avail = (c_path > 0).sum(1)
        n_add = torch.minimum(n_add.clamp(min=0).cpu(), avail) * (max_depth >= level)
        n_exp = torch.minimum(n_exp.clamp(min=0).cpu(), n_add) * (max_depth > level)
        if int(n_add.max()) == 0:
            break
        new_frontier = [[] for _ in range(b)]
        for i, row in enumerate(cands):
            for j, (pp, p, tok, par, on, pos) in enumerate(row[: int(n_add[i])]):
                nodes[i].append((tok, par, level, p, on))
                if j < int(n_exp[i]):
                    new_frontier[i].append((len(nodes[i]) - 1, pos + 1, pp, on))
        if int(n_exp.max()) == 0 or level == limit:
            break
        widths.append(int(n_exp.max()))
        frontier = new_frontier
    return nodes, widths


def simulate(policy: DraftPolicy, trace: Trace, cost: CostCurve, *, batch: int = 1,
             max_new_tokens: int | None = None, include_decision_time: bool = False,
             ends_together: bool = True) -> SimResult:
    """Run ``policy`` over ``trace`` in batches of ``batch`` rows (each batch one ``generate`` call:
    rows leave as they finish); return the simulated totals. ``ends_together=False`` tells the policy
    what an engine would (finished rows are replaced, so no row's tokens count less)."""
    res = SimResult(policy=policy.name)
    call = TimedPolicy(policy)
    for start in range(0, len(trace.rows), batch):
        group = trace.rows[start: start + batch]
        limit = [min(r.length, max_new_tokens or r.length) for r in group]
        n_gen = [1] * len(group)  # the first token comes from the prefill (not charged: same for every policy)
        res.tokens += len(group)
        active = [i for i in range(len(group)) if n_gen[i] < limit[i]]
        call.reset()
        step = 0
        while active:
            step += 1
            rows = [group[i] for i in active]
            b = len(rows)
            ids = torch.tensor(active, dtype=torch.long)
            length = torch.tensor([group[i].prompt_len + n_gen[i] for i in active], dtype=torch.long)
            remaining = torch.tensor([limit[i] - n_gen[i] for i in active], dtype=torch.long)
            ctx = StepContext(rows=b, context_len=length, remaining=remaining, sampling=trace.sampling, step=step,
                              row_ids=ids, ends_together=ends_together)  # a batch replays one generate call
            st = sim_step(call, rows, [n_gen[i] for i in active], ctx, cost, max(1, policy.max_children))
            n_acc, tree, step_time = st.n_accepted, st.tree, st.step_time
            emit = torch.minimum(n_acc + 1, remaining).tolist()
            res.steps += 1
            res.time += step_time
            res.row_steps += b
            res.drafted += int(tree.valid.sum()) if tree.width else 0
            res.accepted += int(n_acc.sum())
            res.chosen.append(float(tree.valid.sum(1).float().mean()) if tree.width else 0.0)
            res.accepted_per_step.append(float(n_acc.float().mean()))
            for i, e in zip(active, emit):
                n_gen[i] += e
                res.tokens += e
            active = [i for i in active if n_gen[i] < limit[i]]
    res.decision_time = call.seconds
    if include_decision_time:
        res.time += call.seconds
    return res


def best_static(trace: Trace, cost: CostCurve, *, batch: int = 1, max_k: int = 12, max_new_tokens: int | None = None
                ) -> tuple[int, dict[int, SimResult]]:
    """Every static chain length 0..max_k simulated; (best k, results by k)."""
    results = {k: simulate(StaticChain(k), trace, cost, batch=batch, max_new_tokens=max_new_tokens)
               for k in range(max_k + 1)}
    best = max(results, key=lambda k: results[k].tokens_per_s)
    return best, results
