"""What the goodput planner learns from a verified step's outcome: the pair's acceptance
calibration (one per kind of node), each row's running acceptance rate and calibration factor, and
the pair's running rate that new rows start from.

Apart from :mod:`adaspec_hf.policies.planner` because it is the one job that reads outcomes, not
plans: the planner's decisions only read the state this writes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from adaspec_hf.core.context import StepOutcome
from adaspec_hf.core.tree import top_among_siblings_np

if TYPE_CHECKING:
    from adaspec_hf.policies.planner import AdaptivePlanner

_ZERO = np.float32(0.0)  # a node outside the sum, as np.where(model, pred, 0) leaves it
ROW_PRIOR_NODES = 4.0  # pseudo-nodes at the pair's rate a new row starts with (a few steps of its own outweigh them)


def learn_acceptance(planner: "AdaptivePlanner", outcome: StepOutcome) -> None:
    """Fold a step with drafted nodes into the calibrations and the per-row rates.

    In numpy: a step verifies a few dozen nodes, where torch's per-op overhead was most of this. At
    batch 1 on Python scalars (:func:`_learn_one_row`), the same arithmetic in the same order."""
    tree = outcome.tree
    if tree.batch == 1 and tree.lookup is None and tree.valid.device.type == "cpu":
        _learn_one_row(planner, outcome)
    else:
        _learn_arrays(planner, outcome)


def _learn_arrays(planner: "AdaptivePlanner", outcome: StepOutcome) -> None:
    """:func:`learn_acceptance` on (B, N) numpy arrays."""
    tree = outcome.tree
    valid = tree.valid.cpu().numpy()
    tested = outcome.tested.cpu().numpy() & valid
    target_t = outcome.accept_prob if outcome.accept_prob.dtype.is_floating_point else outcome.accepted
    y = target_t.detach().float().cpu().numpy()
    accepted = outcome.accepted.cpu().numpy().astype(bool)
    prob = tree.draft_prob.detach().float().cpu().numpy()
    depth = tree.depth.cpu().numpy()
    # per-row acceptance of tried draft-model nodes (for chains: the geometric MLE) and, apart,
    # of prompt-lookup nodes: each has its own calibration and must not drag the other's rate
    ids = outcome.row_ids.tolist() if outcome.row_ids is not None else list(range(tree.batch))
    if tree.lookup is not None:
        is_l = tree.lookup.cpu().numpy()
        model, look = tested & ~is_l, tested & is_l
    else:  # draft-model nodes only (the usual case: two masks fewer a step)
        is_l, model, look = None, tested, None
    # what the calibrations predicted for the tested nodes, before they learn from them
    runner = None  # a draft-model chain: every node is its parent's only (so top) child
    if tree.lookup is not None or planner.max_children > 1:
        keys = np.where(valid, tree.parents.cpu().numpy(), -2 - np.arange(tree.width)[None, :])
        runner = ~top_among_siblings_np(prob, keys)  # not its parent's top child
    pred_all = planner.mode.predict_np(prob, np.maximum(depth, 1), is_l, runner)
    # a row's rate and calibration factor are those of top children: they price going one level
    # deeper (the planner's look-ahead, a chain's next node). Counting a tree's tested runners-up,
    # accepted far less often, made a tree row's rate look like a hopeless draft's, and the tree
    # planner stopped drafting on text where it paid
    if runner is not None:
        model = model & ~runner
    predicted, got = np.where(model, pred_all, 0).sum(1).tolist(), np.where(model, y, 0).sum(1).tolist()
    if tree.lookup is not None:
        planner.row_lookup.observe(ids, np.where(look, y, 0), np.where(look, pred_all, 0), look)
    if tested.any():
        planner.mode.update_np(prob[tested], depth[tested], y[tested],
                               None if is_l is None else is_l[tested],
                               None if runner is None else runner[tested])
    _learn_rows(planner, ids, model.sum(1).tolist(), (accepted & model).sum(1).tolist(), got, predicted)


def _learn_one_row(planner: "AdaptivePlanner", outcome: StepOutcome) -> None:
    """:func:`learn_acceptance` for one row of draft-model nodes, on Python scalars: a step tests a
    handful of nodes, and the array path's ~40 numpy calls cost ~0.3-0.5 ms a step between forwards
    that leave the CPU's caches cold (a tenth of the tree planner's decision time). The same values
    bit for bit: float32 predictions by :meth:`AcceptanceModel.predict_one`, the float32 sums by the
    same numpy reduction, the calibrations' statistics in the same order (a test checks all of it)."""
    tree = outcome.tree
    target_t = outcome.accept_prob if outcome.accept_prob.dtype.is_floating_point else outcome.accepted
    valid = tree.valid[0].tolist()
    tested = [t and v for t, v in zip(outcome.tested[0].tolist(), valid)]
    y = target_t[0].detach().float().tolist()
    accepted = outcome.accepted[0].tolist()
    prob = tree.draft_prob[0].detach().float().tolist()
    depth = tree.depth[0].tolist()
    runner = None
    if planner.max_children > 1:  # top_among_siblings_np on one row: the first most probable of each key
        best: dict[int, int] = {}
        keys = [par if ok else -2 - i for i, (par, ok) in enumerate(zip(tree.parents[0].tolist(), valid))]
        for i, k in enumerate(keys):
            j = best.get(k)
            if j is None or prob[i] > prob[j]:
                best[k] = i
        runner = [best[k] != i for i, k in enumerate(keys)]
    mode = planner.mode
    model = tested if runner is None else [t and not r for t, r in zip(tested, runner)]
    pred = [mode.acceptance.predict_one(p, max(d, 1)) if m else _ZERO for p, d, m in zip(prob, depth, model)]
    predicted = float(np.asarray([pred], dtype=np.float32).sum(1)[0])
    got = float(np.asarray([[v if m else 0.0 for v, m in zip(y, model)]], dtype=np.float32).sum(1)[0])
    idx = [i for i, t in enumerate(tested) if t]
    if idx:
        mode.update_lists([prob[i] for i in idx], [depth[i] for i in idx], [y[i] for i in idx],
                          None if runner is None else [runner[i] for i in idx])
    n = sum(model)
    _learn_rows(planner, outcome.row_ids.tolist() if outcome.row_ids is not None else [0], [n],
                [sum(1 for a, m in zip(accepted, model) if a and m)], [got], [predicted])


def _learn_rows(planner: "AdaptivePlanner", ids: list[int], n_tested: list[int], n_acc: list[int],
                got: list[float], predicted: list[float]) -> None:
    """Per row, fold a step's tested top children into its running rate and calibration factor, and
    the step's into the pair's running rate."""
    w = planner.config.row_ema
    for r, n, a in zip(ids, n_tested, n_acc):
        if n:
            # a ratio of decayed sums, not a decayed mean of ratios: a chain step's a / n
            # (j accepted of j + 1 tested) is biased low, and averaging per-step ratios
            # weights a 1-node step like a 9-node one
            acc, tried = planner._row_counts.get(r, (planner.prior * ROW_PRIOR_NODES, ROW_PRIOR_NODES))
            acc, tried = (1 - w) * acc + w * a, (1 - w) * tried + w * n
            planner._row_counts[r] = (acc, tried)
            planner.alpha[r] = acc / tried
    for r, n, g, pr in zip(ids, n_tested, got, predicted):
        if n:
            acc, pred = planner._row_calib.get(r, (1.0, 1.0))
            planner._row_calib[r] = ((1 - w) * acc + w * g, (1 - w) * pred + w * pr)
    total = sum(n_tested)
    if total:
        w = planner.config.pair_rate_ema
        planner.mode.running_rate = (1 - w) * planner.prior + w * sum(n_acc) / total
