"""Select what to verify: per row a connected subtree, across the batch a goodput-optimal budget.

Path values (calibrated path probabilities) never increase from a node to its children, so the N
best nodes of a row (ties broken parent-first) always form a connected subtree, and that subtree
maximises the expected accepted tokens for N nodes. Across the batch, every prefix of the globally
sorted node list is a candidate budget; the verify cost of a prefix is set by its widest row (the
batch is padded), so all prefixes are scored in one vectorised pass against a cost curve.
"""
from __future__ import annotations

import torch

from adaspec_hf.core.tree import DraftTree


def top_n_subtree(tree: DraftTree, values: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of each row's ``n[b]`` best nodes by ``values``; closed under ancestors."""
    b, w = tree.tokens.shape
    if w == 0:
        return tree.valid.clone()
    v = _monotone(tree, values)
    # stable sort by value, then by index (parents precede children, so they win ties)
    order = torch.sort(v.masked_fill(~tree.valid, -1.0), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(w, device=order.device)[None, :].expand(b, w))
    return (rank < n[:, None]) & tree.valid


def _monotone(tree: DraftTree, values: torch.Tensor) -> torch.Tensor:
    """Clamp each node's value to at most its parent's (guards against non-monotone calibration)."""
    v = values.clone().float()
    for j in range(tree.width):  # parents precede children
        p = tree.parents[:, j]
        pv = v.gather(1, p.clamp(min=0)[:, None])[:, 0]
        v[:, j] = torch.where(p >= 0, torch.minimum(v[:, j], pv), v[:, j])
    return v.masked_fill(~tree.valid, 0.0)


def best_prefix(
    values: torch.Tensor,
    base_counts: torch.Tensor,
    base_tokens: float,
    verify_cost: torch.Tensor,
    fixed_cost: float,
) -> tuple[torch.Tensor, float, float]:
    """Per-row counts ``n`` maximising (base_tokens + taken values) / (fixed + verify_cost[width]).

    ``values`` (B, C): each row's options in the order they must be taken (non-increasing, 0 = none);
    ``base_counts`` (B,) nodes each row already has; ``verify_cost[q]`` is the target forward time
    with ``q + 1`` query tokens per row. Returns (n, goodput, step time).
    """
    b, c = values.shape
    dev = values.device
    verify_cost = torch.as_tensor(verify_cost, dtype=torch.float32, device=dev)
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[: int((flat > 0).sum())]
    k = order.shape[0]
    onehot = torch.zeros(k + 1, b, device=dev)
    if k:
        onehot[1:] = torch.nn.functional.one_hot(order // c, b).float()
    counts = torch.cumsum(onehot, 0)
    width = (counts + base_counts[None, :].float()).max(1).values.long().clamp(max=len(verify_cost) - 1)
    tokens = base_tokens + torch.cat([torch.zeros(1, device=dev), torch.cumsum(flat[order], 0)])
    times = fixed_cost + verify_cost[width]
    goodput = tokens / times
    best = int(torch.argmax(goodput))
    return counts[best].long(), float(goodput[best]), float(times[best])


def goodput_budget(
    tree: DraftTree,
    values: torch.Tensor,
    verify_cost: torch.Tensor,
    fixed_cost: float,
) -> tuple[torch.Tensor, float, float]:
    """Choose per-row connected subtrees maximising (rows + selected values) / (fixed + verify).

    Returns the (B, N) selection mask, the predicted goodput and the predicted step time.
    """
    b = tree.batch
    if tree.width == 0:
        n, g, t = best_prefix(values.new_zeros(b, 0), torch.zeros(b, device=values.device), float(b),
                              verify_cost, fixed_cost)
        return tree.valid.clone(), g, t
    v = _monotone(tree, values)
    sorted_v = torch.sort(v, dim=1, descending=True, stable=True).values
    n, g, t = best_prefix(sorted_v, torch.zeros(b, device=v.device), float(b), verify_cost, fixed_cost)
    return top_n_subtree(tree, v, n), g, t
