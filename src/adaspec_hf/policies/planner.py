"""The adaptive planner: how many tokens (and which tree nodes) to draft, per step and per row.

Goodput of a step = expected emitted tokens of all rows / predicted step time, where

* expected tokens of a row = 1 + sum over its verified nodes of the calibrated path probability
  (acceptance model: draft probability -> acceptance probability, product along the path), and
* step time = overhead + draft forwards + one target forward over ``1 + max_r n_r`` query tokens per
  row (the batch is padded to its widest row) from the latency model profiled on this machine.

AdaSpec's stepwise rule: after each draft level, with the real draft probabilities in hand, add the
candidates that maximise goodput (for each verify width, every row's best candidates that fit it;
the best width wins), and draft one more level only while the predicted goodput of doing so rises.
Zero drafted tokens is always an option, so under load speculation shrinks and switches off by
itself: no thresholds.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from adaspec_hf.config import AdaptiveConfig
from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.efficiency.state import ModeState, ObservedCosts, RowLookup
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome
from adaspec_hf.policies.chain import plan_chain_level, select_chain
from adaspec_hf.policies.choice import skip_draft
from adaspec_hf.policies.learning import ROW_PRIOR_NODES, learn_acceptance
from adaspec_hf.policies.selection import goodput_budget
from adaspec_hf.policies.tree_plan import (commit_tree_level, plan_tree_level, recorded_values, select_tree,
                                           tree_lookahead)
from adaspec_hf.core.tree import DraftTree, top_among_siblings

logger = logging.getLogger("adaspec_hf")

CHOSEN_HISTORY = 4096  # per-step statistics kept by a planner (a long-running engine steps forever)
ROW_SCALE_BOUNDS = (1.0, 4.0)  # a row may be easier than the pair's calibration says (a loop, a quote), never judged harder on a few nodes
PROBE_MAX_GAP = 64  # idle steps between probes after repeated fruitless ones (the gap doubles up to this)
PROBE_LENGTHS = (1, 2, 4)  # chain lengths a probe cycles through: cheap, and spanning the likely optimum
PROBE_BUDGET = 0.05  # a probe waits at least its predicted price (in plain steps) / this many idle steps:
# fruitless probes then cost at most ~5% of the time. At batch 1 on this CPU the doubling gap is longer
# anyway; at 16 rows one probe widens every row's verify and costs 0.6-1.6 plain steps, and the first
# probes of a short call (8, 16, 32 steps apart) cost a random draft 6% (simulated: 0.94x vanilla)


@dataclass
class PlanStep:
    """The planner's view of the step being planned, built once in :meth:`AdaptivePlanner.max_depth`
    and read by the later calls of the same step (choose per level, select)."""

    rows: int
    context: float  # mean committed tokens per row
    verify: np.ndarray  # predicted verify seconds for 1..len query tokens per row
    alpha: np.ndarray  # (rows,) running acceptance rate per row
    draft_levels: int = 0  # levels drafted beyond the first, decided so far
    probe: int = 0  # chain length of a probe step (0: a planned step)
    draft1: float = 0.0  # predicted seconds of one draft forward of one token per row (constant within a step)
    row_scale: np.ndarray | None = None  # (rows,) per-row calibration factor of top-child acceptance
    lookup_scale: np.ndarray | None = None  # (rows,) per-row factor of prompt-lookup acceptance
    draft_gain: np.ndarray | None = None  # (rows, cap) look-ahead's expected accepted tokens of a k-level chain
    row_weight: np.ndarray | None = None  # (rows,) what a row's tokens are worth to the call (see _row_weights)
    # chains only (the numpy fast path): per row, nodes drafted so far, the calibrated path value of
    # the last one and their sum, and the values per level (to select without rebuilding them)
    chain_n: np.ndarray | None = None
    chain_last: np.ndarray | None = None
    chain_sum: np.ndarray | None = None
    chain_values: list | None = None
    level_v: np.ndarray | None = None  # this level's candidate values, until choose() commits them
    level_expands: bool | None = None  # whether this level's decision expands any row (chain path)
    # trees (the numpy path): per level drafted, the nodes' calibrated path values and validity, as
    # the drafter lays them out (None: not recorded, the torch path prices), and this level's
    # candidates' path values until choose() commits them
    tree_levels: list | None = None
    level_nodes: np.ndarray | None = None
    verify32: np.ndarray | None = None  # verify in float32, once converted (see verify_f32)
    tree_joined: tuple | None = None  # tree_levels joined into (values, valid), until a level is added
    draft_widths: dict = dataclasses.field(default_factory=dict)  # width -> predicted seconds of a draft level

    def __post_init__(self) -> None:
        if self.row_weight is None:
            self.row_weight = np.ones(self.rows, dtype=np.float32)

    def verify_f32(self) -> np.ndarray:
        """``verify`` in float32, as the numpy rules price it: converted once a step, read at every level."""
        if self.verify32 is None:
            self.verify32 = self.verify.astype(np.float32)
        return self.verify32


class AdaptivePlanner(DraftPolicy):
    """Goodput-maximising draft policy (chains by default; ``tree=True`` for token trees)."""

    needs_profile = True
    trims = True
    record_trees = True  # price tree levels from recorded node values (numpy); False: the torch path throughout

    def __init__(self, latency: LatencyModel, acceptance: AcceptanceModel | None = None, *, tree: bool = False,
                 config: AdaptiveConfig | None = None, observed: ObservedCosts | None = None,
                 mode: ModeState | None = None, **overrides):
        """``config`` holds every tunable (see :class:`~adaspec_hf.config.AdaptiveConfig`); keyword
        ``overrides`` replace its fields (``max_depth=6``). ``observed`` / ``mode``: the pair's
        measured costs and acceptance state, shared across calls (see
        :class:`~adaspec_hf.efficiency.state.PairState`); fresh ones when omitted."""
        config = config if config is not None else AdaptiveConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.latency = latency
        self.mode = mode if mode is not None else ModeState(acceptance if acceptance is not None else AcceptanceModel())
        if acceptance is not None:
            self.mode.acceptance = acceptance
        self.acceptance = self.mode.acceptance
        self.tree = tree
        self.cap = self.depth_limit = self.config.max_depth
        self.max_children = self.config.max_children if tree else 1
        self.name = "adaptive-tree" if tree else "adaptive"
        # whose measured per-level draft cost this planner reads and writes (ObservedCosts.add_draft)
        self.cost_kind = "tree" if tree else "chain"
        self.probe_every = self.config.probe_every
        self.observed = observed if observed is not None else ObservedCosts(
            ema=self.config.cost_ema, confirm=self.config.cost_confirm)
        self.row_prior = self.config.row_prior
        self.calibration_warmup = self.config.calibration_warmup
        self.reset()

    @property
    def prior(self) -> float:
        """Prior acceptance rate of a new row: the pair's running rate, carried across calls."""
        rate = self.mode.running_rate
        return self.row_prior if rate is None else rate

    def reset(self) -> None:
        self.alpha: dict[int, float] = {}  # per-row EMA of the acceptance rate of drafted nodes
        self.first_value: dict[int, float] = {}  # per-row EMA of the best level-1 candidate's value
        self.first_siblings: dict[int, float] = {}  # trees: per-row EMA of the level-1 runners-up's summed value
        self._row_counts: dict[int, tuple[float, float]] = {}  # per-row decayed (accepted, tested) node counts
        self._row_calib: dict[int, tuple[float, float]] = {}  # per-row decayed (accepted, predicted) over tested top children
        self.row_lookup = RowLookup()
        self.probe_gap = self.probe_every
        self.idle_steps = 0
        self.probes = 0
        self.predicted_time: float | None = None
        self._step: PlanStep | None = None
        self.chosen: list[float] = []  # mean verified nodes per row, per step (statistics)

    def forget(self, row_id: int) -> None:
        self.alpha.pop(row_id, None)
        self.first_value.pop(row_id, None)
        self.first_siblings.pop(row_id, None)
        self._row_counts.pop(row_id, None)
        self._row_calib.pop(row_id, None)
        self.row_lookup.forget(row_id)

    # ------------------------------------------------------------------ costs
    def _costs(self, rows: int, context: float, max_q: int) -> np.ndarray:
        """Verify time for 1..max_q query tokens per row: the profile's curve (with the latency model's
        running drift correction) times what was measured here for each shape, relative to it
        (:meth:`ObservedCosts.factors`)."""
        return self.latency.target_curve(rows, context, max_q)[1:] * self.observed.factors(rows, max_q)

    def _draft_cost(self, rows: int, tokens: float, context: float) -> float:
        """One draft level: the profile's forward plus what a level has cost here beyond a bare
        one-token forward (the drafter's and the policy's work, ~2.5 ms a level on the built-in
        pair on a CPU, against a 0.9 ms forward: left out, the planner drafted deeper than paid).
        Added, not scaled: that work does not grow with the level's width."""
        bare = self.latency.draft_time(rows, max(tokens, 1.0), context)
        seen = self.observed.draft_per_level(rows, self.cost_kind)
        return bare + max(seen - self.latency.draft_time(rows, 1.0, context), 0.0) if seen else bare

    # ---------------------------------------------------------------- decisions
    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        rows = ctx.rows
        context = float(ctx.context_len.float().mean())
        ids = ctx.row_ids.tolist() if ctx.row_ids is not None else list(range(rows))
        alpha = np.asarray([self.alpha.get(r, self.prior) for r in ids])
        # look ahead with what level-1 decisions have been seeing, so we do not pay a draft forward
        # whose candidates the stepwise rule then rejects
        # optimism under uncertainty for the look-ahead alone: a row whose rate rests on few nodes
        # drafts again and so gathers the evidence that corrects it (a pessimistic estimate that
        # stops drafting would never be revised); a rate of 0 or 1 gets no bonus
        hopeful = np.asarray([self._optimistic(r) for r in ids])
        lead = np.minimum(hopeful, np.asarray([self.first_value.get(r, 1.0) for r in ids]))
        width = self.cap * self.max_children
        verify = self._costs(rows, context, 1 + width)
        draft1 = self._draft_cost(rows, 1, context)
        scale = np.asarray([self._row_scale(r) for r in ids], dtype=np.float32)
        # Optimistic look-ahead with each row's running acceptance: would any chain length pay?
        ks = np.arange(1, self.cap + 1)
        row_gains = np.cumsum(lead[:, None] * hopeful[:, None] ** np.arange(0, self.cap)[None, :], axis=1)
        weight = self._row_weights(ctx, alpha)
        self._step = PlanStep(rows=rows, context=context, verify=verify, alpha=alpha, draft1=draft1, row_scale=scale,
                              row_weight=weight,
                              lookup_scale=self.row_lookup.scales(ids), draft_gain=row_gains,
                              chain_n=np.zeros(rows, dtype=np.int64), chain_last=np.ones(rows, dtype=np.float32),
                              chain_sum=np.zeros(rows, dtype=np.float32), chain_values=[],
                              tree_levels=[] if self.tree and self.record_trees else None)
        gains = (row_gains * weight[:, None]).sum(0)
        worth = float(weight.sum())
        goodput = (gains + worth) / (self.latency.overhead + ks * draft1 + verify[ks])
        if self.tree and self.first_siblings:
            goodput = np.maximum(goodput, tree_lookahead(self, ids, row_gains, weight, worth, ks, draft1, verify))
        best_k = int(ks[np.argmax(goodput)]) if goodput.max() > worth / (self.latency.overhead + verify[0]) else 0
        length = min(PROBE_LENGTHS[self.probes % len(PROBE_LENGTHS)], self.cap)
        if self.probe_every and self.idle_steps >= self.probe_gap and (
                self.idle_steps >= (self._probe_time(length, length) / self._probe_time(0, 0) - 1) / PROBE_BUDGET):
            # nothing drafted for a while: try a short chain to re-measure the acceptance and the
            # real cost of wider verify steps, so bad estimates cannot stick
            self.probes += 1
            self._step.probe = length
            self.idle_steps = 0
            return torch.full((rows,), self._step.probe, dtype=torch.long, device=ctx.context_len.device)
        self.predicted_time = self.latency.overhead + float(verify[0])
        if best_k == 0:
            return torch.zeros(rows, dtype=torch.long, device=ctx.context_len.device)
        return torch.full((rows,), self.cap, dtype=torch.long, device=ctx.context_len.device)

    def _row_weights(self, ctx: StepContext, alpha: np.ndarray) -> np.ndarray:
        """What each row's tokens are worth to a ``generate`` call: its expected steps to finish
        (tokens left over what a chain at its running rate emits per step) over the slowest row's.
        The call ends when its slowest row does; a row that will finish well before it gains the
        call little by drafting deep, while every draft level it asks for delays the slowest row
        too. Unweighted, the planner drafted for its easy rows and the call ran longer than at the
        best fixed length (simulated on this pair's traces, 16 rows: 0.94x on this CPU's profile,
        0.88x on the GPU-shaped curve; weighted 1.00x and 0.93x). An engine refills finished rows
        (``ends_together`` False): there every row's tokens count the same."""
        if not ctx.ends_together or ctx.rows < 2:
            return np.ones(ctx.rows, dtype=np.float32)
        a = np.minimum(alpha, 0.99)
        per_step = (1 - a ** (self.cap + 1)) / (1 - a)
        steps = ctx.remaining.cpu().numpy().astype(float) / per_step
        return (steps / max(steps.max(), 1e-9)).astype(np.float32)

    def _calibrated_path(self, tree: DraftTree) -> torch.Tensor:
        if tree.width == 0:
            return torch.zeros(tree.batch, 0)
        alpha = torch.as_tensor(self._step.alpha if self._step is not None else [self.prior] * tree.batch,
                                dtype=torch.float32)
        parents = torch.where(tree.valid, tree.parents, -2 - torch.arange(tree.width, device=tree.parents.device))
        row_alpha = alpha.to(tree.draft_prob.device)[:, None].expand_as(tree.draft_prob)
        acc = self._acceptance(tree.draft_prob.float(), tree.depth.clamp(min=1), row_alpha, parents, tree.lookup)
        acc = acc.clamp(1e-6, 1.0)
        logp = torch.log(acc).masked_fill(~tree.valid, 0.0)
        anc = tree.ancestors().float()
        return torch.exp(torch.bmm(anc, logp[:, :, None])[:, :, 0]).masked_fill(~tree.valid, 0.0)

    def _optimistic(self, row_id: int) -> float:
        """The row's rate plus one standard error of it (binomial, over its decayed node count)."""
        acc, tried = self._row_counts.get(row_id, (self.prior * ROW_PRIOR_NODES, ROW_PRIOR_NODES))
        a = acc / tried
        return min(1.0, a + (a * (1 - a) / tried) ** 0.5)

    def _row_scale(self, row_id: int) -> float:
        """How much more (or less) a row's top children are accepted than the pair's calibration
        predicts: the pair-wide map from draft probability to acceptance learns slowly and cannot
        know that *this* text is easy (a loop, a quote) or hard; one pseudo-node at ratio 1 keeps a
        new row at the calibration."""
        acc, pred = self._row_calib.get(row_id, (1.0, 1.0))
        lo, hi = ROW_SCALE_BOUNDS
        return min(max(acc / max(pred, 1e-6), lo), hi)

    def _acceptance(self, draft_prob: torch.Tensor, depth: torch.Tensor, row_alpha: torch.Tensor,
                    parent: torch.Tensor, lookup: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated acceptance. Each node's *top* child is the calibration scaled by its row's
        factor (:meth:`_row_scale`), and until the calibration has data it leans on the row's
        running acceptance rate (a high-entropy draft whose argmax agrees would otherwise never be
        tried); lower-ranked siblings keep the calibrated estimate, since at most one sibling can
        be accepted."""
        top = top_among_siblings(draft_prob, parent)
        pred = self.mode.predict(draft_prob, depth, lookup, ~top).to(draft_prob.device)
        scale = self._step.row_scale if self._step is not None and self._step.row_scale is not None else None
        scale = torch.ones(pred.shape[0]) if scale is None else torch.from_numpy(scale)
        row_pred = (pred * scale.to(pred.device, pred.dtype)[:, None]).clamp(0.0, 1.0)
        n = self.acceptance.n_total
        w = n / (n + self.calibration_warmup)
        blend = w * row_pred + (1 - w) * row_alpha.to(pred.dtype)
        out = torch.where(top, torch.maximum(blend, row_pred), pred)
        if lookup is None:  # else prompt-lookup nodes: their own calibration and row factor, not the draft's
            return out
        ls = getattr(self._step, "lookup_scale", None)  # None: no step planned, or SmartSpec's own step
        ls = torch.ones(pred.shape[0]) if ls is None else torch.from_numpy(ls)
        return torch.where(lookup.to(out.device), (pred * ls.to(pred.device, pred.dtype)[:, None]).clamp(0, 1), out)

    @property
    def _probing(self) -> bool:
        return self._step is not None and self._step.probe > 0

    def _spent(self) -> float:
        """Predicted seconds of the step before verify: overhead, catch-up and the levels decided."""
        st = self._step
        return self.latency.overhead + st.draft1 * (1 + st.draft_levels)

    def _candidate_values(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) calibrated path value of this level's candidates (parent's calibrated path x
        calibrated acceptance, non-increasing along each row as the drafter orders them), and
        (B, N) the calibrated path values of the nodes drafted so far."""
        b, c = ctx.cand_path_prob.shape
        dev = ctx.cand_path_prob.device
        tree = ctx.tree
        node_path = self._calibrated_path(tree).to(dev)
        ones = torch.ones(b, c, device=dev)
        parent = ctx.cand_parent if ctx.cand_parent is not None else torch.full((b, c), -1, device=dev)
        par_val = torch.where(parent >= 0, node_path.gather(1, parent.clamp(min=0)) if tree.width else ones, ones)
        alpha_rows = torch.as_tensor(self._step.alpha, dtype=torch.float32, device=dev)[:, None].expand(b, c)
        cand_parent = torch.where(ctx.cand_path_prob > 0, parent, -2 - torch.arange(c, device=dev))
        a = self._acceptance(ctx.cand_prob.float(), torch.full_like(parent, ctx.level), alpha_rows, cand_parent)
        v = (par_val * a).masked_fill(ctx.cand_path_prob <= 0, 0.0)
        v = torch.cummin(v, dim=1).values  # a row's candidates are taken in the drafter's order
        return v * (ctx.max_depth >= ctx.level)[:, None], node_path

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probing:
            return DraftPolicy.choose(self, ctx)
        n_add, n_exp = self._plan_level(ctx)
        self._commit_level(n_add, n_exp)
        return n_add, n_exp

    def _chain_fast(self, ctx: LevelContext) -> bool:
        """Chains take a numpy path: a handful of B-vectors per level, where torch's per-op
        overhead (tens of ops per level, ~12 levels a step) would cost a sizeable share of a step."""
        return not self.tree and ctx.cand_prob.shape[1] <= 1 and ctx.cand_prob.device.type == "cpu"

    def _commit_level(self, n_add: torch.Tensor, n_exp: torch.Tensor) -> None:
        st = self._step
        expands = st.level_expands if st.level_expands is not None else bool((n_exp > 0).any())
        st.level_expands = None
        if expands:
            st.draft_levels += 1
        if st.level_v is not None:  # the chain path's bookkeeping of what was added
            add = n_add.numpy() > 0 if n_add.device.type == "cpu" else n_add.cpu().numpy() > 0
            v = np.where(add, st.level_v, np.float32(0.0)).astype(np.float32)
            worth = v * st.row_weight
            st.chain_values.append(worth)
            st.chain_n = st.chain_n + add
            st.chain_sum = st.chain_sum + worth
            st.chain_last = np.where(add, v, st.chain_last)
            st.level_v = None
        if st.tree_levels is not None or st.level_nodes is not None:
            commit_tree_level(st, n_add.cpu().numpy())

    def _plan_level(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_add, n_expand) per row maximising predicted goodput; no side effect on the plan."""
        if self._chain_fast(ctx):
            return plan_chain_level(self, ctx)
        st = self._step
        st.level_v = None
        rec = recorded_values(self, ctx) if st.tree_levels is not None else None
        if rec is not None:
            v, st.level_nodes, node_path = rec
        else:  # priced by the torch path (prompt-lookup nodes, another layout, an accelerator)
            vt, path = self._candidate_values(ctx)
            v, node_path, st.level_nodes = vt.float().cpu().numpy(), path.float().cpu().numpy(), None
        n_add, n_exp = plan_tree_level(self, ctx, v, node_path)
        dev = ctx.cand_prob.device
        return torch.from_numpy(n_add).to(dev), torch.from_numpy(n_exp).to(dev)

    def _select_chain(self, tree: DraftTree) -> torch.Tensor | None:
        return select_chain(self, tree)

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        """Final budget over everything drafted: per-row top-N connected subtrees, N by goodput."""
        st = self._step
        if tree.width == 0 or st is None or self._probing:
            # a probe is verified as drafted (to measure it), to its own depth only: free lookup levels are not probed
            return tree.valid & (tree.depth <= st.probe) if self._probing else tree.valid
        keep = select_tree(self, tree) if self.tree else self._select_chain(tree)
        if keep is not None:
            return keep
        weight = torch.from_numpy(st.row_weight).to(tree.tokens.device)
        values = self._calibrated_path(tree).to(tree.tokens.device) * weight[:, None]
        keep, _, t = goodput_budget(tree, values, torch.as_tensor(st.verify), self._spent(), float(st.row_weight.sum()))
        self.predicted_time = t
        return keep

    def node_values(self, tree: DraftTree) -> torch.Tensor:
        return self._calibrated_path(tree) if self._step is not None else DraftPolicy.node_values(self, tree)

    def skip_draft(self, values: torch.Tensor, n_lookup: torch.Tensor) -> torch.Tensor | None:
        return skip_draft(self, values, n_lookup)

    def _probe_paid(self, widest: int, outcome: StepOutcome) -> bool:
        """Did the probe's accepted tokens cover its predicted extra time (its draft levels and the
        wider verify)? Not "any token accepted": a 16-row probe verifies ~40 nodes, and even an
        unrelated draft gets one of them right, so at large batches the wait kept resetting and the
        probes cost a few percent of the time (simulated, random draft at 16 rows: 0.94x vanilla)."""
        rows = self._step.rows
        probe = self._probe_time(self._step.probe, widest)
        return (rows + float(outcome.n_accepted.sum())) / probe >= rows / self._probe_time(0, 0)

    def _probe_time(self, levels: int, nodes: int) -> float:
        """Predicted seconds of this step with ``levels`` draft levels and ``nodes`` verified per row."""
        st = self._step
        return self.latency.overhead + st.draft1 * levels + float(st.verify[min(nodes, len(st.verify) - 1)])

    # ------------------------------------------------------------------- learning
    def observe(self, outcome: StepOutcome) -> None:
        tree = outcome.tree
        st = self._step
        self.idle_steps = 0 if tree.width else self.idle_steps + 1
        widest = 0  # verified nodes of the widest row (the verify's width)
        if not tree.width:
            self.chosen.append(0.0)
        if tree.width:
            learn_acceptance(self, outcome)
            counts = tree.valid.sum(1).tolist()  # once: the statistics and the verify's width read it
            widest = max(counts)
            self.chosen.append(sum(counts) / len(counts))
        if st is not None and tree.width:
            # a probe that did not pay doubles the wait for the next one; one that did resets it
            paid = not st.probe or self._probe_paid(widest, outcome)
            self.probe_gap = self.probe_every if paid else min(2 * self.probe_gap, PROBE_MAX_GAP)
        if len(self.chosen) > CHOSEN_HISTORY:
            del self.chosen[: len(self.chosen) - CHOSEN_HISTORY // 4]
        if st is not None:
            q = 1 + widest
            predicted = self.latency.target_time(st.rows, q, st.context)  # before this step corrects it
            self.latency.observe("target", st.rows, q, st.context, outcome.verify_time)
            self.observed.add(st.rows, q, outcome.verify_time, predicted)
            self.observed.add_draft(st.rows, st.draft_levels + 1 if tree.width else 0, outcome.draft_time, self.cost_kind)
