"""The goodput planner's rules for chains, in float32 numpy.

Why a second implementation: a chain offers one candidate per row per level, so each decision is a
handful of B-vectors, and torch's per-op overhead (tens of ops per level, up to ~12 levels a step)
cost a sizeable share of a CPU step. These functions compute exactly what the general (tree) path
computes for chains, in the same float precision; a test checks that both choose the same nodes
step for step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from adaspec_hf.core.context import LevelContext
from adaspec_hf.core.tree import DraftTree
from adaspec_hf.policies.selection import best_prefix_np, best_width_one_row

if TYPE_CHECKING:
    from adaspec_hf.policies.planner import AdaptivePlanner


def plan_chain_level(self: "AdaptivePlanner", ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`_plan_level` for chains in float32 numpy (same rule, same float precision)."""
    b, c = ctx.cand_prob.shape
    if c == 0:
        self._step.level_v = np.zeros(b, dtype=np.float32)
        z = torch.zeros(b, dtype=torch.long)
        return z, z.clone()
    return _plan_one_row(self, ctx) if b == 1 else _plan_rows(self, ctx)


def _plan_rows(self: "AdaptivePlanner", ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The level's decision for every row at once (B-vectors)."""
    st = self._step
    b = ctx.cand_prob.shape[0]
    f32 = np.float32
    p = ctx.cand_prob[:, 0].float().numpy()
    alive = ctx.cand_path_prob[:, 0].numpy() > 0
    allowed = ctx.max_depth.cpu().numpy() >= ctx.level
    pred = self.acceptance.predict_np(p, ctx.level)
    n = self.acceptance.n_total
    w = f32(n / (n + self.calibration_warmup))
    alpha = st.alpha.astype(f32)
    row_pred = np.minimum(np.maximum(pred * st.row_scale, f32(0)), f32(1)).astype(f32)  # clip, cheaper on B-vectors
    a = np.maximum(w * row_pred + (f32(1) - w) * alpha, row_pred)  # each chain node is its parent's top child
    v = np.where(alive & allowed, st.chain_last * a, f32(0)).astype(f32)
    st.level_v = v
    # what each row's tokens are worth to the call (see AdaptivePlanner._row_weights)
    v = (v * st.row_weight).astype(f32)
    if ctx.level == 1:
        ids = ctx.step.row_ids.tolist() if ctx.step.row_ids is not None else list(range(b))
        rw = self.config.row_ema
        for r, best_v in zip(ids, st.level_v.tolist()):
            self.first_value[r] = (1 - rw) * self.first_value.get(r, best_v) + rw * best_v
    verify = st.verify_f32()
    spent = f32(self._spent())
    have_n = st.chain_n
    base_tokens = f32(st.row_weight.sum()) + f32(st.chain_sum.sum())
    # the options, as the tree rule prices them (selection.best_prefix_np): keep the verify as wide
    # as it is, every shorter row taking its candidate for free, or one token wider, every row
    n_add, best_g, t_best = best_prefix_np(v[:, None], have_n, base_tokens, verify, spent)
    self.predicted_time = float(t_best)
    n_exp = np.zeros(b, dtype=np.int64)
    extra = f32(st.draft1)
    tokens_now = base_tokens + f32(np.where(n_add > 0, v, f32(0)).sum())
    rest = np.where((v > 0) & (n_add == 0), v, f32(0)).astype(f32)  # candidates this level's rule leaves out
    if ctx.level < self.cap and lookahead_pays(rest, alpha, have_n + n_add, tokens_now,
                                               spent - extra, extra, verify, self.cap - ctx.level + 1, f32(best_g)):
        n_add = np.maximum(n_add, (rest > 0).astype(np.int64))  # this level is drafted already: its first is free
        n_exp = n_add.copy()
    elif n_add.any() and ctx.level < self.cap:
        child = np.where(n_add > 0, v, f32(0)) * alpha
        counts = have_n + n_add
        more, g, _ = best_prefix_np(child[:, None], counts, tokens_now, verify, spent + extra)
        if g > f32(best_g) and more.any():
            n_exp = np.minimum(more, n_add)
        elif lookahead_pays(child, alpha, counts, f32(tokens_now), spent, extra, verify, self.cap - ctx.level,
                            f32(best_g)):
            n_exp = np.minimum((child > 0).astype(np.int64), n_add)
    st.level_expands = bool(n_exp.any())
    dev = ctx.cand_prob.device
    return torch.from_numpy(n_add).to(dev), torch.from_numpy(n_exp).to(dev)

def _plan_one_row(self: "AdaptivePlanner", ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`plan_chain_level` for one row, on float32 scalars: the same float32 operations in the
    same order (a test checks the decisions agree step for step). Why: in the decoding loop, whose
    forwards leave the CPU's caches cold, the ~40 numpy calls of a level on one-element arrays
    measured ~0.23 ms, i.e. ~1.3 ms of a batch-1 step of ~45 ms."""
    st = self._step
    f32 = np.float32
    level = ctx.level
    alive = ctx.cand_path_prob.item() > 0  # (1, 1): .item() skips an indexing op
    allowed = ctx.max_depth.item() >= level
    pred = self.acceptance.predict_one(ctx.cand_prob.item(), level)
    n = self.acceptance.n_total
    w = f32(n / (n + self.calibration_warmup))
    alpha = f32(st.alpha[0])
    row_pred = min(max(pred * st.row_scale[0], f32(0)), f32(1))
    a = max(w * row_pred + (f32(1) - w) * alpha, row_pred)
    v = st.chain_last[0] * a if alive and allowed else f32(0)
    st.level_v = np.asarray([v], dtype=f32)
    v = v * st.row_weight[0]
    if level == 1:
        r = int(ctx.step.row_ids[0]) if ctx.step.row_ids is not None else 0
        rw, best_v = self.config.row_ema, float(st.level_v[0])
        self.first_value[r] = (1 - rw) * self.first_value.get(r, best_v) + rw * best_v
    verify = st.verify_f32()
    spent = f32(self._spent())
    have = int(st.chain_n[0])
    base_tokens = f32(st.row_weight[0]) + f32(st.chain_sum[0])
    add, best_g, t_best = best_width_one_row([float(v)], have, base_tokens, verify, spent)
    self.predicted_time = float(t_best)
    exp = 0
    extra = f32(st.draft1)
    tokens_now = base_tokens + (v if add else f32(0))
    rest = v if v > 0 and not add else f32(0)
    if level < self.cap and _lookahead_one(rest, alpha, have + add, tokens_now, spent - extra, extra, verify,
                                           self.cap - level + 1, f32(best_g)):
        add = max(add, int(rest > 0))
        exp = add
    elif add and level < self.cap:
        child = v * alpha
        more, g, _ = best_width_one_row([float(child)], have + add, tokens_now, verify, spent + extra)
        if g > f32(best_g) and more:
            exp = min(more, add)
        elif _lookahead_one(child, alpha, have + add, f32(tokens_now), spent, extra, verify, self.cap - level,
                            f32(best_g)):
            exp = min(int(child > 0), add)
    st.level_expands = exp > 0
    dev = ctx.cand_prob.device
    return torch.tensor([add], device=dev), torch.tensor([exp], device=dev)


def _lookahead_one(child: np.float32, alpha: np.float32, count: int, tokens: np.float32, spent: np.float32,
                   extra: np.float32, verify: np.ndarray, levels_left: int, g_best) -> bool:
    """:func:`lookahead_pays` for one row, on float32 scalars (same operations, same order)."""
    if levels_left < 2 or not child > 0:
        return False
    top = len(verify) - 1
    level_v = child
    for j in range(1, levels_left + 1):
        tokens = tokens + level_v
        t = spent + np.float32(j) * extra + verify[min(count + j, top)]
        if j > 1 and tokens / t > g_best:
            return True
        level_v = level_v * alpha
    return False


def lookahead_pays(child: np.ndarray, alpha: np.ndarray, counts: np.ndarray, tokens: np.float32, spent: np.float32,
                   extra: np.float32, verify: np.ndarray, levels_left: int, g_best) -> bool:
    """Would ``j`` more levels of nodes under the rows of ``child`` pay, for some ``j`` from 2 to
    ``levels_left``? ``child`` holds the first of those levels' values (0: a row not continued),
    deeper ones are valued at the row's running rate per level, each level costs ``extra``. Why
    beyond one level: a verify time that jumps at some widths and is nearly flat after them (this
    CPU's, from one query token to two; a profile's noisy kinks) stops a rule that looks one level
    ahead in front of every jump. What is drafted on this hope is pruned by the final selection
    if the real draft probabilities do not bear it out."""
    on = child > 0
    if levels_left < 2 or not on.any():
        return False
    f32 = np.float32
    top = len(verify) - 1
    level_v = np.where(on, child, f32(0)).astype(f32)
    alpha = alpha.astype(f32)
    for j in range(1, levels_left + 1):
        tokens = tokens + f32(level_v.sum())
        t = spent + f32(j) * extra + verify[min(int((counts + j * on).max()), top)]
        if j > 1 and tokens / t > g_best:
            return True
        level_v = level_v * alpha
    return False


def select_chain(self: "AdaptivePlanner", tree: DraftTree) -> torch.Tensor | None:
    """:meth:`select` for chains from the recorded per-level values; None if the tree is not
    the chain the planner recorded (then the general path runs)."""
    st = self._step
    if st.chain_values is None or not st.chain_values or tree.tokens.device.type != "cpu":
        return None
    vals = np.stack(st.chain_values, 1)  # (B, levels), node j of a row = level j + 1
    if vals.shape[1] != tree.width or not np.array_equal(tree.valid.sum(1).numpy(), st.chain_n):
        return None
    # the values are the general path's (calibrated path probability x row weight): clamped to be
    # non-increasing as it clamps them, and chosen by the same exact per-width rule
    vals = np.minimum.accumulate(np.maximum(vals, np.float32(0)), axis=1)  # float32 in, float32 out
    n, _, t = best_prefix_np(vals, np.zeros(st.rows, dtype=np.int64), float(st.row_weight.sum()),
                             st.verify_f32(), self._spent())
    self.predicted_time = float(t)
    return torch.from_numpy(np.arange(tree.width)[None, :] < n[:, None]) & tree.valid
