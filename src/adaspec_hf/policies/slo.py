"""The SLO-first planner: rows behind their per-request TPOT objective are served first, the rest
at maximal goodput (AdaServe's speculate -> select -> verify on top of the goodput planner)."""
from __future__ import annotations

import numpy as np
import torch

from adaspec_hf.core.tree import DraftTree
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.policies.selection import best_prefix, top_n_subtree


SLO_WEIGHT = 2.0
"""What one expected token of a row behind its TPOT track counts, against a row on track, when the
SLO phase weighs raising its plan against what the raise costs the batch: enough to buy a behind row
a wider verify or a deeper draft that slows the others a little, never one that costs the batch
more tokens than twice what it gives the row."""


class SLOPlanner(AdaptivePlanner):
    """AdaServe's speculate -> select -> verify on top of :class:`AdaptivePlanner`'s goodput model.

    Each step, a row with a TPOT objective that is behind its track (it needs more than the one token
    a step always yields: ``tokens_needed = elapsed / tpot - produced`` at the end of the step) and
    can still meet it is served first:

    * Draft: such rows get more nodes and one more level while their calibrated expected tokens fall
      short of the need and the raise lifts the *batch's* SLO-weighted goodput (a behind row's
      tokens count ``SLO_WEIGHT`` times): a deeper draft or a wider verify delays every row.
    * Select, phase 1: neediest row first, each gets the prefix of its nodes (by calibrated path
      probability) that maximises its own token rate, up to the node that covers its need, within
      ``token_budget`` phase-1 nodes per step. Speculation that would slow a row down is never forced.
    * Select, phase 2: the remaining nodes of all rows, best path probability first, while the
      batch's predicted goodput (expected tokens / predicted step time) rises.

    Rows without an SLO, on track, or past saving are best effort at maximal goodput: then the step
    is exactly :class:`AdaptivePlanner`'s (same latency and acceptance models, same corrections).
    """

    def __init__(self, latency, acceptance=None, *, tree: bool = False, **kw):
        super().__init__(latency, acceptance, tree=tree, **kw)
        self.name = "slo-tree" if tree else "slo"
        self.token_budget = self.config.token_budget
        self.min_node_value = self.config.min_node_value

    def reset(self) -> None:
        super().reset()
        self._need: torch.Tensor | None = None
        self.slo_nodes = 0  # nodes selected by phase 1 (statistics)
        self.behind_rows = 0  # row-steps behind their TPOT track that phase 1 served

    # ------------------------------------------------------------------------------ helpers
    def _verify_at(self, q: int) -> float:
        verify = self._step.verify
        return float(verify[min(int(q), len(verify) - 1)])

    def _best_prefix(self, values: list[float], have_val: float, have_n: int, width: int, spent: float) -> int:
        """Nodes (a prefix of ``values``) maximising the row's own rate (1 + expected) / step time."""
        best_k, best = 0, (1.0 + have_val) / (spent + self._verify_at(max(width, have_n)))
        acc = have_val
        for k, v in enumerate(values, 1):
            acc += v
            rate = (1.0 + acc) / (spent + self._verify_at(max(width, have_n + k)))
            if rate > best:
                best_k, best = k, rate
        return best_k

    # ----------------------------------------------------------------------------- decisions
    def max_depth(self, ctx: StepContext) -> torch.Tensor:
        depth = super().max_depth(ctx)
        self._need = None
        if not self._probing:  # a probe step is measured as the base planner drafted it
            depth = self._slo_depth(ctx, depth)
        return depth

    def _slo_depth(self, ctx: StepContext, depth: torch.Tensor) -> torch.Tensor:
        need = ctx.tokens_needed
        if need is None:
            return depth
        extra = (need.float().cpu() - 1.0).clamp(min=0.0)
        if not bool((extra > 0).any()):
            return depth
        # would drafting raise a behind row's own token rate at its running acceptance?
        st = self._step
        rows, context = st.rows, st.context
        alpha = np.asarray(st.alpha, dtype=float)
        ks = np.arange(1, self.cap + 1)
        verify = np.asarray(st.verify, dtype=float)
        times = self.latency.overhead + ks * self._draft_cost(rows, 1, context) + verify[np.minimum(ks, len(verify) - 1)]
        gains = np.cumsum(alpha[:, None] ** ks[None, :], axis=1)
        pays = ((1.0 + gains) / times[None, :]).max(1) > 1.0 / (self.latency.overhead + verify[0])
        behind = (extra > 0) & torch.as_tensor(pays)
        # a row that cannot meet its objective any more (even at its best plausible tokens per step)
        # is served best effort: phase 1 is for the requests it can still save
        rate = ctx.rate_needed
        if rate is not None:
            behind &= rate.float().cpu() <= torch.as_tensor(1.0 + gains[:, -1], dtype=torch.float32)
        if not bool(behind.any()):
            return depth
        self.behind_rows += int(behind.sum())
        self._need = torch.where(behind, extra, torch.zeros_like(extra))
        return torch.where(behind.to(depth.device), torch.full_like(depth, self.cap), depth)

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probing:
            return DraftPolicy.choose(self, ctx)
        n_add, n_exp = self._plan_level(ctx)
        if self._need is not None:
            n_add, n_exp = self._serve_behind(ctx, n_add, n_exp)
        self._commit_level(n_add, n_exp)
        return n_add, n_exp

    def _serve_behind(self, ctx: LevelContext, n_add: torch.Tensor, n_exp: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raise the goodput plan of this level for rows behind their TPOT track, neediest first.

        Every raise is judged by the batch, not by the row: more nodes widen everyone's verify and
        another draft level delays every row, so a raise is taken only while it lifts the batch's
        SLO-weighted goodput (expected tokens, a behind row's counted ``SLO_WEIGHT`` times, per
        predicted step second). Judged by the row's own rate alone, the raises of many behind rows
        slowed the whole batch until more rows fell behind (simulated serving, GPU-shaped cost)."""
        st = self._step
        v, node_path = self._candidate_values(ctx)
        have = node_path.sum(1) if ctx.tree.width else torch.zeros(v.shape[0], device=v.device)
        need = self._need.to(v.device)
        have_n = ctx.tree.valid.sum(1) if ctx.tree.width else torch.zeros_like(n_add)
        short = need - have
        spent = self._spent()
        width = int((have_n + n_add).max())
        e = min(self.max_children, v.shape[1]) if self.tree else 1
        alpha = st.alpha
        short_l, have_l, need_l = short.tolist(), have.tolist(), need.tolist()
        have_n_l, add_l, exp_l = have_n.tolist(), n_add.tolist(), n_exp.tolist()
        depth_l, v_l = ctx.max_depth.tolist(), v.tolist()
        weight = [SLO_WEIGHT if x > 0 else 1.0 for x in need_l]
        tokens = sum(w * (1.0 + h + sum(vals[:k])) for w, h, vals, k in zip(weight, have_l, v_l, add_l))
        drafting = any(x > 0 for x in exp_l)  # the next level is drafted anyway: more expansions cost no forward
        extra_draft = self._draft_cost(st.rows, e, st.context)
        for r in sorted(range(len(short_l)), key=lambda i: -short_l[i]):
            if short_l[r] <= 0:
                break
            vals = v_l[r]
            taken = sum(vals[: add_l[r]])  # the row's expected tokens from this level's nodes so far
            # more nodes for the row, up to the one that covers its need, while the batch gains
            while add_l[r] < len(vals) and taken < short_l[r] and vals[add_l[r]] >= self.min_node_value:
                k = add_l[r] + 1
                wider = max(width, have_n_l[r] + k)
                gain = weight[r] * vals[k - 1]
                if (tokens + gain) / (spent + self._verify_at(wider)) <= tokens / (spent + self._verify_at(width)):
                    break
                add_l[r], tokens, width, taken = k, tokens + gain, wider, taken + vals[k - 1]
            k = add_l[r]
            got = have_l[r] + taken
            if k and got < need_l[r] and depth_l[r] > ctx.level and exp_l[r] < min(k, e):
                child = weight[r] * max(vals[: min(k, e)]) * float(alpha[r])
                cost = 0.0 if drafting else extra_draft
                now = tokens / (spent + self._verify_at(width))
                more = (tokens + child) / (spent + cost + self._verify_at(max(width, have_n_l[r] + k + 1)))
                if more > now:
                    exp_l[r] = min(k, e)
                    drafting = True
        n_add = torch.tensor(add_l, dtype=n_add.dtype, device=n_add.device)
        n_exp = torch.minimum(torch.tensor(exp_l, dtype=n_exp.dtype, device=n_exp.device), n_add)
        return n_add, n_exp

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        st = self._step
        if tree.width == 0 or st is None or self._probing or self._need is None:
            return super().select(tree, ctx)
        b, n = tree.tokens.shape
        dev = tree.tokens.device
        # calibrated path values never grow from a node to its children: a row's best k nodes form
        # a connected subtree, so "k nodes" is the whole decision per row
        values = self._calibrated_path(tree).to(dev).masked_fill(~tree.valid, 0.0)
        sv = torch.sort(values, dim=1, descending=True, stable=True).values
        cum = torch.cumsum(sv, dim=1)
        spent = self._spent()
        budget = self.token_budget if self.token_budget is not None else b * n
        # phase 1: rows behind their track, neediest first, as many nodes as raise their own rate
        need_l, sv_l = self._need.tolist(), sv.tolist()
        forced = [0] * b
        used, width = 0, 0
        for r in sorted(range(b), key=lambda i: -need_l[i]):
            if need_l[r] <= 0 or used >= budget:
                break
            vals, acc = [], 0.0
            for x in sv_l[r]:
                if x < self.min_node_value or acc >= need_l[r] or used + len(vals) >= budget:
                    break
                vals.append(x)
                acc += x
            k = self._best_prefix(vals, 0.0, 0, width, spent)
            forced[r] = k
            used += k
            width = max(width, k)
        self.slo_nodes += used
        f = torch.tensor(forced, dtype=torch.long, device=dev)
        # phase 2: every remaining node of every row, best first, while the batch's goodput rises
        ar = torch.arange(n, device=dev)[None, :]
        src = (ar + f[:, None]).clamp(max=n - 1)
        rest = torch.where(ar + f[:, None] < n, sv.gather(1, src), torch.zeros_like(sv))
        base = float(b) + float(torch.where(f > 0, cum.gather(1, (f - 1).clamp(min=0)[:, None])[:, 0],
                                            torch.zeros(b, device=dev)).sum())
        extra, _, t = best_prefix(rest, f.float(), base, torch.as_tensor(st.verify), spent)
        self.predicted_time = t
        return top_n_subtree(tree, values, f + extra)
