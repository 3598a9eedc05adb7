"""The goodput planner's rules for token trees, in float32 numpy.

Why numpy: a tree level's decision is a few (B, C) arrays of a few dozen candidates, and the torch
version (re-deriving every drafted node's calibrated path through a (B, N, N) ancestor matrix at each
level, then sorting and scoring) cost the tree planner 7-13% of a CPU step and most of a simulated
GPU step. Here a node's calibrated path value is recorded when it is added (its parent's value times
its own calibrated acceptance), so a level only prices its new candidates.

One decision rule serves both value sources: :func:`plan_tree_level` takes the candidates' values
from :func:`recorded_values` when the partial tree is the one the planner recorded, and from the
planner's torch path otherwise (prompt-lookup nodes, another drafter's layout); a test checks that
both choose the same nodes step for step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from adaspec_hf.core.context import LevelContext
from adaspec_hf.core.tree import DraftTree, top_among_siblings_np
from adaspec_hf.policies.chain import _lookahead_one, lookahead_pays
from adaspec_hf.policies.selection import best_prefix_np, best_width_one_row, goodput_budget_np, goodput_budget_one_row

if TYPE_CHECKING:
    from adaspec_hf.policies.planner import AdaptivePlanner

F32 = np.float32
MIN_NODE_ACCEPTANCE = 1e-6  # a node's acceptance floor in path values (as the torch path's log-space product)


def _layouts(st) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of the recorded nodes as level blocks (the drafter's partial tree), joined once
    per level (each level's decision and the step's selection read it)."""
    if st.tree_joined is None:
        if not st.tree_levels:
            z = np.zeros((st.rows, 0), dtype=F32)
            st.tree_joined = z, z.astype(bool)
        else:
            st.tree_joined = (np.concatenate([v for v, _ in st.tree_levels], 1),
                              np.concatenate([o for _, o in st.tree_levels], 1))
    return st.tree_joined


def _packed(values: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same nodes packed at the front of each row, in order (a packed tree's layout)."""
    n = ok.sum(1)
    width = int(n.max()) if n.size else 0
    order = np.argsort(~ok, axis=1, kind="stable")[:, :width]
    valid = np.arange(width)[None, :] < n[:, None]
    return np.where(valid, np.take_along_axis(values, order, 1), F32(0)), valid


def recorded_path(self: "AdaptivePlanner", tree: DraftTree) -> np.ndarray | None:
    """(B, N) calibrated path values of ``tree``'s nodes from the planner's record of this step, in
    ``tree``'s own layout (level blocks as the drafter builds them, or packed); None when ``tree`` is
    not what was recorded."""
    if tree.lookup is not None:
        return None
    return _recorded_for(self, tree.valid)


def _recorded_for(self: "AdaptivePlanner", valid_t: torch.Tensor) -> np.ndarray | None:
    """:func:`recorded_path` of the draft-model nodes whose validity is ``valid_t``."""
    st = self._step
    if st is None or st.tree_levels is None or valid_t.device.type != "cpu":
        return None
    values, ok = _layouts(st)
    valid = valid_t.numpy()
    if valid.shape == ok.shape and np.array_equal(valid, ok):
        return values
    values, ok = _packed(values, ok)
    return values if valid.shape == ok.shape and np.array_equal(valid, ok) else None


def recorded_values(self: "AdaptivePlanner", ctx: LevelContext) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """This level's candidates priced from the record: (B, C) decision values (non-increasing along
    a row), (B, C) path values they would have as nodes, and (B, N) those of the nodes so far; None
    when the partial tree is not the recorded one."""
    if ctx.cand_prob.device.type != "cpu" or (isinstance(ctx.partial, DraftTree) and ctx.partial.lookup is not None):
        return None
    # the partial tree of a draft-model drafter has no prompt-lookup nodes; only its validity is
    # needed (built, the tree cost ~25 µs a level at batch 1)
    node_path = _recorded_for(self, ctx.valid)
    if node_path is None:
        return None
    one_row = ctx.cand_prob.shape[0] == 1
    return (_recorded_values_one_row if one_row else _recorded_values_rows)(self, ctx, node_path)


def _recorded_values_rows(self: "AdaptivePlanner", ctx: LevelContext, node_path: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`recorded_values` for every row at once ((B, C) arrays)."""
    st = self._step
    p = ctx.cand_prob.float().numpy()
    b, c = p.shape
    alive = ctx.cand_path_prob.numpy() > 0
    parent = (ctx.cand_parent.numpy() if ctx.cand_parent is not None else np.full((b, c), -1, dtype=np.int64))
    keys = np.where(alive, parent, -2 - np.arange(c)[None, :])
    top = top_among_siblings_np(p, keys)
    mode = self.mode
    pred = mode.acceptance.predict_np(p, ctx.level)
    if not top.all():
        pred = np.where(top, pred, mode.sibling.predict_np(p, ctx.level)).astype(F32)
    row_pred = np.minimum(np.maximum(pred * st.row_scale[:, None], F32(0)), F32(1))
    n = self.acceptance.n_total
    w = F32(n / (n + self.calibration_warmup))
    blend = w * row_pred + (F32(1) - w) * st.alpha.astype(F32)[:, None]
    a = np.where(top, np.maximum(blend, row_pred), pred).astype(F32)
    if node_path.shape[1]:
        par_val = np.where(parent >= 0, np.take_along_axis(node_path, np.maximum(parent, 0), 1), F32(1))
    else:
        par_val = np.ones((b, c), dtype=F32)
    raw = np.where(alive, par_val * a, F32(0)).astype(F32)
    allowed = (ctx.max_depth.cpu().numpy() >= ctx.level)[:, None]
    v = np.minimum.accumulate(raw, axis=1) * allowed  # a row's candidates are taken in the drafter's order
    nodes = np.where(alive, par_val * np.minimum(np.maximum(a, F32(MIN_NODE_ACCEPTANCE)), F32(1)), F32(0))
    return v.astype(F32), nodes.astype(F32), node_path


def _recorded_values_one_row(self: "AdaptivePlanner", ctx: LevelContext, node_path: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`recorded_values` for one row, on float32 scalars: the same float32 operations in the
    same order (a test checks the trees agree step for step). Why: in the decoding loop the ~35
    numpy calls of a level on (1, C) arrays measured ~0.25 ms, a quarter of a batch-1 step's
    decisions; a level offers a few to a dozen candidates, a short loop of scalars."""
    st = self._step
    level = ctx.level
    p = ctx.cand_prob[0].float().tolist()
    c = len(p)
    alive = [x > 0 for x in ctx.cand_path_prob[0].tolist()]
    parent = ctx.cand_parent[0].tolist() if ctx.cand_parent is not None else [-1] * c
    best: dict[int, int] = {}  # the first most probable candidate of each parent (a dead one: its own key)
    keys = [parent[j] if alive[j] else -2 - j for j in range(c)]
    for j in range(c):
        k = best.get(keys[j])
        if k is None or p[j] > p[k]:
            best[keys[j]] = j
    top = [best[keys[j]] == j for j in range(c)]
    mode = self.mode
    pred = mode.acceptance.predict_list(p, level)
    if not all(top):
        pred = [x if t else y for x, y, t in zip(pred, mode.sibling.predict_list(p, level), top)]
    scale, alpha = st.row_scale[0], F32(st.alpha[0])
    n = self.acceptance.n_total
    w = F32(n / (n + self.calibration_warmup))
    lo, hi, floor = F32(0), F32(1), F32(MIN_NODE_ACCEPTANCE)
    allowed = ctx.max_depth.item() >= level
    path = node_path[0]
    v, nodes, low = [], [], None
    for j in range(c):
        if top[j]:
            row_pred = min(max(pred[j] * scale, lo), hi)
            a = max(w * row_pred + (hi - w) * alpha, row_pred)
        else:
            a = pred[j]
        par_val = path[parent[j]] if parent[j] >= 0 and path.shape[0] else hi
        raw = par_val * a if alive[j] else lo
        low = raw if low is None else min(low, raw)
        v.append(low if allowed else lo)
        nodes.append(par_val * min(max(a, floor), hi) if alive[j] else lo)
    return np.asarray([v], dtype=F32), np.asarray([nodes], dtype=F32), node_path


def _draft_level_cost(self: "AdaptivePlanner", width: int) -> F32:
    """Predicted seconds of a draft level ``width`` nodes wide per row: constant within a step, and
    asked for every width at every level."""
    st = self._step
    cost = st.draft_widths.get(width)
    if cost is None:
        cost = st.draft_widths[width] = F32(self._draft_cost(st.rows, float(width), st.context))
    return cost


def tree_lookahead(self: "AdaptivePlanner", ids: list[int], row_gains: np.ndarray, weight: np.ndarray,
                   worth: float, ks: np.ndarray, draft1: float, verify: np.ndarray) -> np.ndarray:
    """Goodput of a chain of each length plus its first level's runners-up, at their recent
    summed value (siblings are accepted one at most, so values add) and the verify's extra width.
    Looking ahead over chains alone, a tree planner stopped drafting whenever its row's rate
    dipped: sampled at T=0.7 on the built-in pair it drafted nothing in 13-21% of batch-1 steps,
    where the top child is accepted at ~0.5 and the next three at ~0.2, 0.1 and 0.05."""
    sib = np.asarray([self.first_siblings.get(r, 0.0) for r in ids], dtype=np.float64)
    gains = ((row_gains + sib[:, None]) * weight[:, None]).sum(0)
    wide = np.minimum(ks + self.max_children - 1, len(verify) - 1)
    return (gains + worth) / (self.latency.overhead + ks * draft1 + verify[wide])


def plan_tree_level(self: "AdaptivePlanner", ctx: LevelContext, v: np.ndarray, node_path: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(n_add, n_expand) per row maximising predicted goodput, from this level's candidate values
    ``v`` (B, C) and the path values of the nodes so far ``node_path`` (B, N)."""
    b, c = v.shape
    if ctx.level == 1 and c:
        ids = ctx.step.row_ids.tolist() if ctx.step.row_ids is not None else list(range(b))
        rw = self.config.row_ema
        for r, best_v in zip(ids, v[:, 0].tolist()):
            self.first_value[r] = (1 - rw) * self.first_value.get(r, best_v) + rw * best_v
        for r, sib in zip(ids, v[:, 1: self.max_children].sum(1).tolist()):
            self.first_siblings[r] = (1 - rw) * self.first_siblings.get(r, sib) + rw * sib
    st = self._step
    weight = st.row_weight[:, None]  # what each row's tokens are worth to the call (see AdaptivePlanner._row_weights)
    v = (v * weight).astype(F32)
    valid = ctx.valid.cpu().numpy()
    have_n = valid.sum(1).astype(np.int64)
    have_val = F32(np.where(valid, node_path * weight, F32(0)).sum()) if node_path.shape[1] else F32(0)
    if b == 1:
        return _plan_tree_one_row(self, ctx, v, int(have_n[0]), have_val)
    return _plan_tree_rows(self, ctx, v, have_n, have_val)


def _plan_tree_rows(self: "AdaptivePlanner", ctx: LevelContext, v: np.ndarray, have_n: np.ndarray, have_val: F32
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plan_tree_level` for every row at once, after its common start (``v`` (B, C) weighted
    values, ``have_n`` (B,) nodes so far per row, worth ``have_val`` in all)."""
    st = self._step
    b, c = v.shape
    verify = st.verify_f32()
    spent = F32(self._spent())  # draft time so far this step (catch-up + fed levels), the same for every option
    # for each verify width, every row's candidates that fit it are an option; pick the best width
    worth = F32(st.row_weight.sum())  # each row's bonus token
    n_add, g_now, t_now = best_prefix_np(v, have_n, worth + have_val, verify, spent)
    self.predicted_time = t_now
    taken = np.arange(c)[None, :] < n_add[:, None]
    tokens_now = worth + have_val + F32(np.where(taken, v, F32(0)).sum())
    n_exp = np.zeros(b, dtype=np.int64)
    if not c or ctx.level >= self.cap:
        return n_add, n_exp
    alpha = st.alpha.astype(F32)
    extra1 = F32(st.draft1)  # one draft level, as priced for this step in max_depth
    rest = np.where((v[:, 0] > 0) & (n_add == 0), v[:, 0], F32(0)).astype(F32)  # rows this level's rule left out
    if lookahead_pays(rest, alpha, have_n + n_add, tokens_now, spent - extra1, extra1, verify,
                      self.cap - ctx.level + 1, F32(g_now)):  # as the chain rule
        n_add = np.maximum(n_add, (rest > 0).astype(np.int64))
        return n_add, (n_add > 0).astype(np.int64)
    if not n_add.any():
        return n_add, n_exp
    # one more level? predicted children of each row's best added nodes, at its running rate. The
    # draft forward is as wide as the most nodes any row expands, so each width is priced as such:
    # priced at the widest, a tree expanding one node a level paid a 4-token forward for it and
    # stopped short of the chain's depth (perfect draft, batch 1, replayed: 0.87x the chain planner)
    e = min(self.max_children, c) if self.tree else 1
    top_v = -np.sort(-np.where(taken, v, F32(0)), axis=1)[:, :e]
    child = top_v * alpha[:, None]
    base = have_n + n_add
    more, g_next = None, F32(g_now)
    for width in range(1, e + 1):
        extra = _draft_level_cost(self, width)
        m, g, _ = best_prefix_np(child[:, :width], base, tokens_now, verify, spent + extra)
        if g > g_next and m.any():
            more, g_next = m, g
    if more is not None:
        return n_add, np.minimum(more, n_add)
    # deeper than one level? (each row's best node, as the chain rule does: one-token forwards)
    if lookahead_pays(child[:, 0], alpha, base, tokens_now, spent, extra1, verify, self.cap - ctx.level,
                      F32(g_now)):
        n_exp = np.minimum((child[:, 0] > 0).astype(np.int64), n_add)
    return n_add, n_exp


def _plan_tree_one_row(self: "AdaptivePlanner", ctx: LevelContext, v: np.ndarray, have_n: int, have_val: F32
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plan_tree_level` for one row after its common start (``v`` (1, C) weighted values,
    the row's ``have_n`` nodes worth ``have_val``): the same float operations in the same order on
    scalars (a test checks the trees agree step for step). Why: its ~40 numpy calls on (1, C)
    arrays measured ~0.13 ms a level in the decoding loop."""
    st = self._step
    c = v.shape[1]
    verify = st.verify_f32()
    spent = F32(self._spent())
    worth = F32(st.row_weight.sum())
    vals = v[0].tolist()
    n_add, g_now, t_now = best_width_one_row(vals, have_n, worth + have_val, verify, spent)
    self.predicted_time = t_now
    tokens_now = worth + have_val + F32(np.where(np.arange(c)[None, :] < n_add, v, F32(0)).sum())  # as summed there
    one = np.ones(1, dtype=np.int64)
    if not c or ctx.level >= self.cap:
        return one * n_add, one * 0
    alpha = F32(st.alpha[0])
    extra1 = F32(st.draft1)
    rest = v[0, 0] if vals[0] > 0 and n_add == 0 else F32(0)  # the row's best, if this level's rule left it out
    if _lookahead_one(rest, alpha, have_n + n_add, tokens_now, spent - extra1, extra1, verify,
                      self.cap - ctx.level + 1, F32(g_now)):
        n_add = max(n_add, int(rest > 0))
        return one * n_add, one * int(n_add > 0)
    if not n_add:
        return one * 0, one * 0
    e = min(self.max_children, c) if self.tree else 1
    top_v = sorted(v[0, :n_add].tolist(), reverse=True)[:e]
    child = [F32(x) * alpha for x in top_v] + [F32(0)] * (e - len(top_v))
    base = have_n + n_add
    more, g_next = 0, F32(g_now)
    for width in range(1, e + 1):
        extra = _draft_level_cost(self, width)
        m, g, _ = best_width_one_row([float(x) for x in child[:width]], base, tokens_now, verify, spent + extra)
        if g > g_next and m:
            more, g_next = m, g
    if more:
        return one * n_add, one * min(more, n_add)
    n_exp = 0
    if _lookahead_one(child[0], alpha, base, tokens_now, spent, extra1, verify, self.cap - ctx.level, F32(g_now)):
        n_exp = min(int(child[0] > 0), n_add)
    return one * n_add, one * n_exp


def commit_tree_level(st, n_add: np.ndarray) -> None:
    """Record the path values of the nodes this level adds (the first ``n_add[b]`` candidates of each
    row, a block as wide as the widest row's, as the drafter lays them out)."""
    nodes, st.level_nodes = st.level_nodes, None
    if st.tree_levels is None:
        return
    if nodes is None:  # this level was priced by the torch path: the record no longer holds
        st.tree_levels = None
        return
    width = int(n_add.max()) if n_add.size else 0
    if width:
        ok = np.arange(width)[None, :] < n_add[:, None]
        st.tree_levels.append((np.where(ok, nodes[:, :width], F32(0)).astype(F32), ok))
        st.tree_joined = None


def select_tree(self: "AdaptivePlanner", tree: DraftTree) -> torch.Tensor | None:
    """:meth:`select` from the recorded path values; None when ``tree`` is not the recorded one."""
    values = recorded_path(self, tree)
    if values is None:
        return None
    st = self._step
    weighted = values * st.row_weight[:, None]
    if st.rows == 1:
        keep, _, t = goodput_budget_one_row(weighted[0].tolist(), tree.valid[0].tolist(), st.verify_f32(),
                                            self._spent(), float(st.row_weight.sum()))
        self.predicted_time = t
        return torch.tensor([keep], dtype=torch.bool)
    keep, _, t = goodput_budget_np(weighted, tree.valid.numpy(), st.verify_f32(), self._spent(), float(st.row_weight.sum()))
    self.predicted_time = t
    return torch.from_numpy(keep)
