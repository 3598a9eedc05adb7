"""Which proposer a row uses this step, by predicted goodput: prompt lookup (free), the draft model
(its forwards), both (the policy's ``select`` then verifies what pays), or the lookup alone.

Called by :class:`~adaspec_hf.core.lookup.CombinedProposer` after the lookup has proposed and before
any draft forward, with the planner's view of the step (its verify-cost curve, the cost of one draft
level and the look-ahead's expected accepted tokens of a draft chain of each length)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from adaspec_hf.policies.planner import AdaptivePlanner


def skip_draft(planner: "AdaptivePlanner", values: torch.Tensor, n_lookup: torch.Tensor) -> torch.Tensor | None:
    """(B,) rows that skip the draft model, or None (no prediction: a probe, or no plan).

    Options, each priced for the whole batch (the draft forward is one batched call): lookup alone
    for every row, or a draft chain of ``k`` levels with each row keeping whichever of its draft and
    its lookup expects more tokens. The best goodput wins; with a draft, rows whose lookup expects at
    least the draft's tokens skip it (they cost the batch nothing then)."""
    st = planner._step
    if st is None or st.probe or st.draft_gain is None:
        return None
    b = st.rows
    e_l = values.float().sum(1).cpu().numpy()  # expected accepted lookup tokens per row
    width = int(n_lookup.max()) if n_lookup.numel() else 0
    verify = st.verify
    top = len(verify) - 1
    overhead = planner.latency.overhead
    # what a draft level has cost here (measured, drafter and policy work included), as the planner priced it
    draft1 = st.draft1
    best_g = (b + float(e_l.sum())) / (overhead + verify[min(width, top)])
    best_k = 0
    for k in range(1, st.draft_gain.shape[1] + 1):
        tokens = b + float(np.maximum(e_l, st.draft_gain[:, k - 1]).sum())
        g = tokens / (overhead + k * draft1 + verify[min(max(k, width), top)])
        if g > best_g:
            best_g, best_k = g, k
    if best_k == 0:
        return torch.ones(b, dtype=torch.bool)
    return torch.from_numpy(e_l >= st.draft_gain[:, best_k - 1])
