"""Select what to verify: per row a connected subtree, across the batch a goodput-optimal budget.

Path values (calibrated path probabilities) never increase from a node to its children, so the N
best nodes of a row (ties broken parent-first) always form a connected subtree, and that subtree
maximises the expected accepted tokens for N nodes. Across the batch, the verify cost is set by
the widest row (the batch is padded), so for each width every row keeps all the nodes that fit,
and the widths are scored in one vectorised pass against a cost curve.

The arithmetic is float32 numpy: these are (B, N) arrays of a few dozen nodes, scored once per draft
level, where torch's per-op overhead cost a CPU step several milliseconds. The torch-facing
functions convert at the edges.
"""
from __future__ import annotations

import numpy as np
import torch

from adaspec_hf.core.tree import DraftTree

F32 = np.float32
MIN_OPTION_VALUE = 1e-9  # expected tokens below which a node is no option: where width is free, which of two
# ways of computing a deep path's product underflows first would otherwise decide whether it is verified


def best_prefix_np(values: np.ndarray, base_counts: np.ndarray, base_tokens: float, verify_cost: np.ndarray,
                   fixed_cost: float) -> tuple[np.ndarray, float, float]:
    """Per-row counts ``n`` maximising (base_tokens + taken values) / (fixed + verify_cost[width]).

    ``values`` (B, C): each row's options in the order they must be taken (non-increasing, 0 = none);
    ``base_counts`` (B,) nodes each row already has; ``verify_cost[q]`` is the target forward time
    with ``q + 1`` query tokens per row. Returns (n, goodput, step time); ties go to the smaller budget.

    Exact for a padded verify, whose cost is set by the widest row alone: for each width, every row
    takes all its options that fit (they cost nothing more), and the best width wins. A prefix of
    the options sorted across the batch, as before, could not take one row's node without first
    taking every better one of other rows, some of which widen the verify: at 16 rows, a near-done
    row's top child (worth little, see the planner's row weights) fell behind the runners-up that
    widened the verify, and was dropped where it was free (replayed, trees at 16 rows: 0.92x chains).
    """
    b, c = values.shape
    verify_cost = np.asarray(verify_cost, dtype=F32)
    top = len(verify_cost) - 1
    v = np.asarray(values, dtype=F32)
    base = np.asarray(base_counts, dtype=np.int64)
    if b == 1:
        n, g, t = best_width_one_row(v[0].tolist(), int(base[0]), base_tokens, verify_cost, fixed_cost)
        return np.asarray([n], dtype=np.int64), g, t
    avail = (v > MIN_OPTION_VALUE).sum(1) if c else np.zeros(b, dtype=np.int64)  # leading: non-increasing
    # float64 sums: on a flat cost a deep node's ~1e-6 tokens vanish into a float32 sum of ~100, and
    # the rounding, not the node, would decide whether it is kept
    cum = np.zeros((b, c + 1))
    if c:
        np.cumsum(np.where(np.arange(c)[None, :] < avail[:, None], v, F32(0)), axis=1, dtype=np.float64, out=cum[:, 1:])
    w0 = int(base.max()) if b else 0
    widths = np.arange(w0, max(w0, int((base + avail).max()) if b else 0) + 1)
    counts = np.clip(widths[:, None] - base[None, :], 0, avail[None, :])  # (options, B)
    tokens = float(base_tokens) + np.take_along_axis(cum, counts.T, axis=1).sum(0)
    times = F32(fixed_cost) + verify_cost[np.minimum(widths, top)]
    best = int(np.argmax(tokens / times))
    return counts[best], float(tokens[best] / times[best]), float(times[best])


def best_width_one_row(v: list[float], base: int, base_tokens: float, verify_cost: np.ndarray,
                       fixed_cost: float) -> tuple[int, float, float]:
    """:func:`best_prefix_np` for one row in plain Python, the same float operations in the same
    order (float64 running sums, float32 times): at batch 1 the planner calls it twice a draft
    level, and a dozen numpy calls on one-element arrays cost ~1% of the step."""
    top = len(verify_cost) - 1
    fixed = F32(fixed_cost)
    base_tokens = float(base_tokens)
    t = float(fixed + verify_cost[min(base, top)])
    best_n, best_g, best_t = 0, base_tokens / t, t
    acc = 0.0
    for n, x in enumerate(v, 1):
        if not x > MIN_OPTION_VALUE:
            break
        acc += x
        t = float(fixed + verify_cost[min(base + n, top)])
        if (base_tokens + acc) / t > best_g:
            best_n, best_g, best_t = n, (base_tokens + acc) / t, t
    return best_n, best_g, best_t


def best_prefix(values: torch.Tensor, base_counts: torch.Tensor, base_tokens: float, verify_cost,
                fixed_cost: float) -> tuple[torch.Tensor, float, float]:
    """:func:`best_prefix_np` on tensors (returns the counts as a long tensor on ``values``' device)."""
    n, g, t = best_prefix_np(values.detach().float().cpu().numpy(), base_counts.detach().cpu().numpy(),
                             base_tokens, np.asarray(torch.as_tensor(verify_cost).cpu()), fixed_cost)
    return torch.from_numpy(n).to(values.device), g, t


def monotone_np(values: np.ndarray, parents: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Clamp each node's value to at most its parent's (guards against non-monotone calibration)."""
    v = np.where(valid, values, F32(0)).astype(F32)
    rows = np.arange(v.shape[0])
    for j in range(v.shape[1]):  # parents precede children
        p = parents[:, j]
        v[:, j] = np.where(p >= 0, np.minimum(v[:, j], v[rows, np.maximum(p, 0)]), v[:, j])
    return v


def top_n_np(values: np.ndarray, valid: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(B, N) mask of each row's ``n[b]`` best nodes of monotone ``values`` (ties: the earlier node,
    so a parent before its children): closed under ancestors."""
    b, w = values.shape
    order = np.argsort(-np.where(valid, values, F32(-1)), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(w), (b, w)), axis=1)
    return (rank < np.asarray(n)[:, None]) & valid


def top_n_subtree(tree: DraftTree, values: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of each row's ``n[b]`` best nodes by ``values``; closed under ancestors."""
    if tree.width == 0:
        return tree.valid.clone()
    valid = tree.valid.cpu().numpy()
    v = monotone_np(values.detach().float().cpu().numpy(), tree.parents.cpu().numpy(), valid)
    return torch.from_numpy(top_n_np(v, valid, n.cpu().numpy())).to(tree.valid.device)


def goodput_budget_np(values: np.ndarray, valid: np.ndarray, verify_cost: np.ndarray, fixed_cost: float,
                      base_tokens: float | None = None) -> tuple[np.ndarray, float, float]:
    """:func:`goodput_budget` for monotone numpy values: (keep mask, goodput, step time).
    ``base_tokens``: what the rows emit with nothing verified (default: one token per row)."""
    b = values.shape[0]
    v = np.where(valid, values, F32(0)).astype(F32)
    sorted_v = -np.sort(-v, axis=1)
    n, g, t = best_prefix_np(sorted_v, np.zeros(b, dtype=np.int64), float(b) if base_tokens is None else base_tokens,
                             verify_cost, fixed_cost)
    return top_n_np(v, valid, n), g, t


def goodput_budget_one_row(values: list[float], valid: list[bool], verify_cost: np.ndarray, fixed_cost: float,
                           base_tokens: float) -> tuple[list[bool], float, float]:
    """:func:`goodput_budget_np` for one row in plain Python (float32 values as floats), the same
    ranking and the same float operations: at batch 1 a tree step's selection is a dozen numpy
    calls on (1, N) arrays, ~0.1 ms in the decoding loop."""
    v = [x if ok else 0.0 for x, ok in zip(values, valid)]
    n, g, t = best_width_one_row(sorted(v, reverse=True), 0, base_tokens, verify_cost, fixed_cost)
    # the n best valid nodes, ties to the earlier node (a parent before its children), as top_n_np
    order = sorted(range(len(v)), key=lambda j: -(v[j] if valid[j] else -1.0))
    keep = [False] * len(v)
    for j in order[:n]:
        keep[j] = valid[j]
    return keep, g, t


def goodput_budget(
    tree: DraftTree,
    values: torch.Tensor,
    verify_cost,
    fixed_cost: float,
    base_tokens: float | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Choose per-row connected subtrees maximising (base + selected values) / (fixed + verify),
    ``base_tokens`` defaulting to one token per row.

    Returns the (B, N) selection mask, the predicted goodput and the predicted step time.
    """
    b = tree.batch
    base = float(b) if base_tokens is None else base_tokens
    verify = np.asarray(torch.as_tensor(verify_cost).cpu(), dtype=F32)
    if tree.width == 0:
        _, g, t = best_prefix_np(np.zeros((b, 0), dtype=F32), np.zeros(b, dtype=np.int64), base, verify, fixed_cost)
        return tree.valid.clone(), g, t
    valid = tree.valid.cpu().numpy()
    v = monotone_np(values.detach().float().cpu().numpy(), tree.parents.cpu().numpy(), valid)
    keep, g, t = goodput_budget_np(v, valid, verify, fixed_cost, base)
    return torch.from_numpy(keep).to(tree.valid.device), g, t
