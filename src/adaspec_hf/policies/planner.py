"""The adaptive planner: how many tokens (and which tree nodes) to draft, per step and per row.

Goodput of a step = expected emitted tokens of all rows / predicted step time, where

* expected tokens of a row = 1 + sum over its verified nodes of the calibrated path probability
  (acceptance model: draft probability -> acceptance probability, product along the path), and
* step time = overhead + draft forwards + one target forward over ``1 + max_r n_r`` query tokens per
  row (the batch is padded to its widest row) from the latency model profiled on this machine.

AdaSpec's stepwise rule: after each draft level, with the real draft probabilities in hand, add the
prefix of candidates (best calibrated path probability first, across rows) that maximises goodput,
and draft one more level only while the predicted goodput of doing so rises. Zero drafted tokens is
always an option, so under load speculation shrinks and switches off by itself: no thresholds.
"""
from __future__ import annotations

import logging
import math
import weakref

import numpy as np
import torch

from adaspec_hf.efficiency.acceptance import AcceptanceModel
from adaspec_hf.efficiency.latency import LatencyModel
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext, StepOutcome
from adaspec_hf.policies.selection import best_prefix, goodput_budget
from adaspec_hf.core.tree import DraftTree

logger = logging.getLogger("adaspec_hf")

CHOSEN_HISTORY = 4096  # per-step statistics kept by a planner (a long-running engine steps forever)


class AdaptivePlanner(DraftPolicy):
    """Goodput-maximising draft policy (chains by default; ``tree=True`` for token trees)."""

    def __init__(
        self,
        latency: LatencyModel,
        acceptance: AcceptanceModel | None = None,
        *,
        tree: bool = False,
        max_depth: int = 12,
        max_children: int = 4,
        probe_every: int = 8,
        row_prior: float = 0.6,
        observed: "ObservedCosts | None" = None,
        calibration_warmup: float = 200.0,
    ):
        self.latency = latency
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel()
        self.tree = tree
        self.cap = int(max_depth)
        self.max_children = int(max_children) if tree else 1
        self.name = "adaptive-tree" if tree else "adaptive"
        self.probe_every = probe_every
        # measured verify costs live with the (shared, per-pair) latency model across calls
        if observed is None:
            observed = getattr(latency, "observed_costs", None)
            if observed is None:
                observed = latency.observed_costs = ObservedCosts()
        self.observed = observed
        self.row_prior = row_prior
        self.calibration_warmup = calibration_warmup
        self.reset()

    @property
    def prior(self) -> float:
        """Prior acceptance rate of a new row: the pair's running rate, carried across calls."""
        return getattr(self.acceptance, "running_rate", self.row_prior)

    def reset(self) -> None:
        self.alpha: dict[int, float] = {}  # per-row EMA of the acceptance rate of drafted nodes
        self.first_value: dict[int, float] = {}  # per-row EMA of the best level-1 candidate's value
        self.idle_steps = 0
        self.probes = 0
        self._probe = 0
        self.last_predicted_time: float | None = None
        self._step: dict = {}
        self.chosen: list[float] = []  # mean verified nodes per row, per step (statistics)

    def forget(self, row_id: int) -> None:
        self.alpha.pop(row_id, None)
        self.first_value.pop(row_id, None)

    # ------------------------------------------------------------------ costs
    def _costs(self, rows: int, context: float, max_q: int) -> np.ndarray:
        """Verify time for 1..max_q query tokens per row: the profile's prediction, replaced by what
        was measured here. Contention only inflates timings, so a measurement below the profile is
        believed at once, one above it only once confirmed (a busy-machine profile must not freeze
        the decisions, and one noisy step must not either)."""
        out = []
        for q in range(1, max_q + 1):
            pred = self.latency.target_time(rows, q, context)
            seen = self.observed.get(rows, q)
            if seen is not None:
                value, n = seen
                pred = value if n >= self.observed.confirm else min(value, pred)
            out.append(pred)
        return np.asarray(out)

    def _draft_cost(self, rows: int, tokens: float, context: float) -> float:
        return self.latency.draft_time(rows, max(tokens, 1.0), context)

    # ---------------------------------------------------------------- decisions
    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        rows = ctx.rows
        context = float(ctx.context_len.float().mean())
        ids = ctx.row_ids.tolist() if ctx.row_ids is not None else list(range(rows))
        alpha = np.asarray([self.alpha.get(r, self.prior) for r in ids])
        # look ahead with what level-1 decisions have been seeing, so we do not pay a draft forward
        # whose candidates the stepwise rule then rejects
        lead = np.asarray([min(self.alpha.get(r, self.prior), self.first_value.get(r, 1.0)) for r in ids])
        width = self.cap * self.max_children
        verify = self._costs(rows, context, 1 + width)
        self._step = {"rows": rows, "context": context, "verify": verify, "draft_levels": 0,
                      "draft_tokens": 0.0, "alpha": alpha}
        # Optimistic look-ahead with each row's running acceptance: would any chain length pay?
        best_k, best_g = 0, rows / (self.latency.overhead + verify[0])
        for k in range(1, self.cap + 1):
            exp_tokens = float(np.sum((lead[:, None] * alpha[:, None] ** np.arange(0, k)[None, :]).sum(1))) + rows
            t = (self.latency.overhead + k * self._draft_cost(rows, 1, context) + verify[k])
            if exp_tokens / t > best_g:
                best_k, best_g = k, exp_tokens / t
        self._probe = 0
        if self.probe_every and self.idle_steps >= self.probe_every:
            # nothing drafted for a while: try a short chain (cycling 1, 2, 4) to re-measure the
            # acceptance and the real cost of wider verify steps, so bad estimates cannot stick
            self.probes += 1
            self._probe = min(2 ** ((self.probes - 1) % 3), self.cap)
            self.idle_steps = 0
            self._step["best_k"] = self._probe
            return torch.full((rows,), self._probe, dtype=torch.long, device=ctx.context_len.device)
        self.last_predicted_time = self.latency.overhead + float(verify[0])
        self._step["best_k"] = best_k
        if best_k == 0:
            return torch.zeros(rows, dtype=torch.long, device=ctx.context_len.device)
        return torch.full((rows,), self.cap, dtype=torch.long, device=ctx.context_len.device)

    def _calibrated_path(self, tree: DraftTree) -> torch.Tensor:
        if tree.width == 0:
            return torch.zeros(tree.batch, 0)
        alpha = torch.as_tensor(self._step.get("alpha", [self.prior] * tree.batch), dtype=torch.float32)
        parents = torch.where(tree.valid, tree.parents, -2 - torch.arange(tree.width, device=tree.parents.device))
        acc = self._acceptance(tree.draft_prob.float(), tree.depth.clamp(min=1),
                               alpha.to(tree.draft_prob.device)[:, None].expand_as(tree.draft_prob), parents)
        acc = acc.clamp(1e-6, 1.0)
        logp = torch.log(acc).masked_fill(~tree.valid, 0.0)
        anc = tree.ancestors().float()
        return torch.exp(torch.bmm(anc, logp[:, :, None])[:, :, 0]).masked_fill(~tree.valid, 0.0)

    def _acceptance(self, draft_prob: torch.Tensor, depth: torch.Tensor, row_alpha: torch.Tensor,
                    parent: torch.Tensor) -> torch.Tensor:
        """Calibrated acceptance. Until the calibration has data, each node's *top* child leans on
        its row's running acceptance rate (a high-entropy draft whose argmax agrees would otherwise
        never be tried); lower-ranked siblings keep the calibrated estimate, since at most one
        sibling can be accepted."""
        pred = self.acceptance.predict(draft_prob, depth).to(draft_prob.device)
        n = float(self.acceptance.n.sum()) if hasattr(self.acceptance, "n") else 0.0
        w = n / (n + self.calibration_warmup)
        c = draft_prob.shape[1]
        same = parent[:, :, None] == parent[:, None, :]
        idx = torch.arange(c, device=draft_prob.device)
        better = (draft_prob[:, None, :] > draft_prob[:, :, None]) | (
            (draft_prob[:, None, :] == draft_prob[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
        top = ~(same & better).any(-1)
        blend = w * pred + (1 - w) * row_alpha.to(pred.dtype)
        return torch.where(top, torch.maximum(blend, pred), pred)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probe:
            return DraftPolicy.choose(self, ctx)
        st = self._step
        b, c = ctx.cand_path_prob.shape
        dev = ctx.cand_path_prob.device
        tree = ctx.tree
        # calibrated path value of every candidate: parent's calibrated path x calibrated acceptance
        node_path = self._calibrated_path(tree).to(dev)
        parent = ctx.cand_parent if ctx.cand_parent is not None else torch.full((b, c), -1, device=dev)
        par_val = torch.where(parent >= 0, node_path.gather(1, parent.clamp(min=0)) if tree.width else
                              torch.ones(b, c, device=dev), torch.ones(b, c, device=dev))
        alpha_rows = torch.as_tensor(st["alpha"], dtype=torch.float32, device=dev)[:, None].expand(b, c)
        cand_parent = torch.where(ctx.cand_path_prob > 0, parent, -2 - torch.arange(c, device=dev))
        a = self._acceptance(ctx.cand_prob.float(), torch.full_like(parent, ctx.level), alpha_rows, cand_parent)
        v = (par_val * a).masked_fill(ctx.cand_path_prob <= 0, 0.0)
        v = torch.cummin(v, dim=1).values  # a row's candidates are taken in the drafter's order
        if ctx.level == 1 and c:
            ids = ctx.step.row_ids.tolist() if ctx.step.row_ids is not None else list(range(b))
            for r, best_v in zip(ids, v[:, 0].tolist()):
                self.first_value[r] = 0.7 * self.first_value.get(r, best_v) + 0.3 * best_v
        allowed = (ctx.max_depth >= ctx.level)
        v = v * allowed[:, None]
        have_n = tree.valid.sum(1) if tree.width else torch.zeros(b, dtype=torch.long, device=dev)
        have_val = node_path.sum(1) if tree.width else torch.zeros(b, device=dev)
        verify = st["verify"]
        rows, context = st["rows"], st["context"]
        # draft time spent so far this step (catch-up + fed levels), the same for every option
        spent = self.latency.overhead + self._draft_cost(rows, 1, context) * (1 + st["draft_levels"])

        # every prefix of the globally sorted candidate list is an option; pick the best
        n_add, g_now, t_now = best_prefix(v, have_n.float(), b + float(have_val.sum()), verify, spent)
        best = int(n_add.sum())
        tokens_now = b + float(have_val.sum()) + float((v * (torch.arange(c, device=dev)[None, :] < n_add[:, None])).sum())
        self.last_predicted_time = t_now

        # one more level? predicted children of the best nodes, at the running top-1 acceptance
        n_exp = torch.zeros_like(n_add)
        if best and ctx.level < self.cap:
            added_v = torch.where(torch.arange(c, device=dev)[None, :] < n_add[:, None], v, 0.0)
            e = min(self.max_children, c) if self.tree else 1
            top_v, _ = added_v.topk(min(e, c), dim=1)
            alpha = torch.as_tensor(st["alpha"], dtype=torch.float32, device=dev)[:, None]
            child_v = (top_v * alpha).reshape(-1)
            cv, corder = child_v.sort(descending=True)
            rows_c = (corder // top_v.shape[1])
            base_counts = (have_n + n_add).float()
            more = torch.zeros(b, device=dev)
            best_next, best_j = g_now, 0
            extra_draft = self._draft_cost(rows, float(top_v.shape[1]), context)
            for j in range(int((cv > 0).sum())):
                more[rows_c[j]] += 1
                q = int((base_counts + more).max().clamp(max=len(verify) - 1))
                g = (tokens_now + float(cv[: j + 1].sum())) / (spent + extra_draft + float(verify[q]))
                if g > best_next:
                    best_next, best_j = g, j + 1
            if best_j:
                expand_rows = torch.zeros(b, dtype=torch.long, device=dev)
                expand_rows.index_add_(0, rows_c[:best_j], torch.ones(best_j, dtype=torch.long, device=dev))
                n_exp = torch.minimum(expand_rows, n_add)
                st["draft_levels"] += 1
        return n_add, n_exp

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        """Final budget over everything drafted: per-row top-N connected subtrees, N by goodput."""
        st = self._step
        if tree.width == 0 or not st or self._probe:
            return tree.valid  # a probe is verified as drafted, to measure it
        values = self._calibrated_path(tree).to(tree.tokens.device)
        spent = self.latency.overhead + self._draft_cost(st["rows"], 1, st["context"]) * (1 + st["draft_levels"])
        keep, _, t = goodput_budget(tree, values, torch.as_tensor(st["verify"]), spent)
        self.last_predicted_time = t
        return keep

    # ------------------------------------------------------------------- learning
    def observe(self, outcome: StepOutcome) -> None:
        tree = outcome.tree
        st = self._step
        self.idle_steps = 0 if tree.width else self.idle_steps + 1
        if not tree.width:
            self.chosen.append(0.0)
        if tree.width:
            tested = outcome.tested & tree.valid
            if bool(tested.any()):
                target = outcome.accept_prob if outcome.accept_prob.dtype.is_floating_point else outcome.accepted.float()
                self.acceptance.update(tree.draft_prob[tested].float(), tree.depth[tested],
                                       target[tested].float())
            # per-row acceptance rate of tried nodes (for chains: the geometric MLE)
            ids = outcome.row_ids.tolist() if outcome.row_ids is not None else list(range(tree.batch))
            n_tested = tested.sum(1).tolist()
            n_acc = (outcome.accepted & tree.valid).sum(1).tolist()
            for r, n, a in zip(ids, n_tested, n_acc):
                if n:
                    self.alpha[r] = 0.7 * self.alpha.get(r, self.prior) + 0.3 * (a / n)
            total = sum(n_tested)
            if total:
                rate = sum(n_acc) / total
                self.acceptance.running_rate = 0.9 * self.prior + 0.1 * rate
            self.chosen.append(float(tree.valid.sum(1).float().mean()))
        if len(self.chosen) > CHOSEN_HISTORY:
            del self.chosen[: len(self.chosen) - CHOSEN_HISTORY // 4]
        if st:
            q = 1 + (int(tree.valid.sum(1).max()) if tree.width else 0)
            context = st["context"]
            self.latency.observe("target", st["rows"], q, context, outcome.verify_time)
            self.observed.add(st["rows"], q, outcome.verify_time)


class SmartSpec(AdaptivePlanner):
    """Batch-uniform draft length from goodput with one running acceptance rate (SmartSpec-like).

    Unlike :class:`AdaptivePlanner` it ignores the draft's per-token confidence and per-row
    differences: every row drafts the same ``k`` each step.
    """

    def __init__(self, latency: LatencyModel, acceptance: AcceptanceModel | None = None, max_depth: int = 8,
                 observed: "ObservedCosts | None" = None):
        super().__init__(latency, acceptance, tree=False, max_depth=max_depth, observed=observed)
        self.name = "smartspec"

    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        rows = ctx.rows
        context = float(ctx.context_len.float().mean())
        verify = self._costs(rows, context, 1 + self.cap)
        rate = self.alpha.get(0, self.row_prior)
        best_k, best_t = 0, self.latency.overhead + verify[0]
        best_g = rows / best_t
        for k in range(1, self.cap + 1):
            t = self.latency.overhead + k * self._draft_cost(rows, 1, context) + verify[k]
            g = rows * (1 + sum(rate ** i for i in range(1, k + 1))) / t
            if g > best_g:
                best_k, best_g, best_t = k, g, t
        self._step = {"rows": rows, "context": context}
        self.last_predicted_time = float(best_t)
        self.chosen.append(float(best_k))
        return torch.full((rows,), best_k, dtype=torch.long, device=ctx.context_len.device)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        return DraftPolicy.choose(self, ctx)

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        return tree.valid  # uniform k: verify everything drafted

    def forget(self, row_id: int) -> None:
        pass  # its one rate is batch-wide (key 0), not a request's

    def observe(self, outcome: StepOutcome) -> None:
        tree = outcome.tree
        if tree.width:  # one batch-wide rate, kept under a single key
            tested = int((outcome.tested & tree.valid).sum())
            if tested:
                rate = int((outcome.accepted & tree.valid).sum()) / tested
                self.alpha[0] = 0.8 * self.alpha.get(0, self.row_prior) + 0.2 * rate


class ObservedCosts:
    """EMA of measured verify times per (rows, query tokens per row), shared across calls."""

    def __init__(self, ema: float = 0.3, min_count: int = 1, confirm: int = 3):
        self.ema, self.min_count, self.confirm = ema, min_count, confirm
        self.table: dict[tuple[int, int], tuple[float, int]] = {}

    def add(self, rows: int, q: int, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        prev, n = self.table.get((rows, q), (seconds, 0))
        self.table[(rows, q)] = ((1 - self.ema) * prev + self.ema * seconds if n else seconds, n + 1)

    def get(self, rows: int, q: int) -> tuple[float, int] | None:
        """(EMA seconds, observations) once seen ``min_count`` times, else None."""
        value, n = self.table.get((rows, q), (0.0, 0))
        return (value, n) if n >= self.min_count else None


# ---------------------------------------------------------------------------------------- factory
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def planner_state(target, draft, sampling: bool = False) -> tuple[LatencyModel, AcceptanceModel]:
    """Latency model (profiled on this machine, cached on disk) and acceptance calibration for a pair,
    kept while both model objects live so that calibration carries over between ``generate`` calls.
    Keyed by the draft object itself (weakly), never by ``id(draft)``: a new draft allocated where a
    dead one was must not inherit its profile. Greedy (argmax match) and sampling (min(1, p/q))
    acceptance are different quantities: one calibration each, one latency model."""
    per_target = _STATE.get(target)
    if per_target is None:
        per_target = _STATE[target] = weakref.WeakKeyDictionary()
    state = per_target.get(draft)
    if state is None:
        from adaspec_hf.profiling.profiler import load_or_profile

        profile = load_or_profile(target, draft, quick=True)
        state = per_target[draft] = {"latency": LatencyModel(profile), "greedy": AcceptanceModel()}
    if not sampling:
        return state["latency"], state["greedy"]
    if "sampling" not in state:
        state["sampling"] = AcceptanceModel()
    return state["latency"], state["sampling"]


def make_planner(name: str, target, draft, sampling: bool = False) -> DraftPolicy:
    if target is None or draft is None:
        raise ValueError(f"draft_policy={name!r} needs both models (it profiles their latency)")
    latency, acceptance = planner_state(target, draft, sampling)
    if name == "adaptive":
        return AdaptivePlanner(latency, acceptance)
    if name == "adaptive-tree":
        return AdaptivePlanner(latency, acceptance, tree=True)
    if name == "smartspec":
        return SmartSpec(latency, acceptance)
    raise ValueError(f"unknown planner {name!r}")
