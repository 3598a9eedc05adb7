"""SLO-aware continuous-batching engine: submit requests, stream tokens, meet latency objectives.

::

    with Engine(target, draft, tokenizer, max_rows=8) as engine:
        h = engine.submit("def main():", max_new_tokens=64, slo=SLO(tpot_ms=40, ttft_ms=500))
        for chunk in h:                      # or: async for chunk in h
            print(chunk.text, end="")
        print(h.result().tpot, h.result().slo_met)

A background thread runs the step loop until :meth:`Engine.close` (or until the engine is dropped).
Faults stay with their request or step: cache surgery and each step are all-or-nothing
(:meth:`RowBatch.atomic <adaspec_hf.core.step.RowBatch.atomic>`), so an out-of-memory error is rolled
back and retried, then fails only the newcomer or that step's rows; a request whose processor,
sampling distribution or tokenizer fails fails alone; every handle resolves. Between steps, finished and
cancelled requests leave the batch (``KVState.select_rows``) and queued ones are prefilled alone and
merged in (``KVState.append_rows``): earliest TTFT deadline first (latest start = deadline minus the
prefill time predicted by the latency model), and into a running batch only while no running
request's TPOT objective is put at risk by the bigger batch, unless the newcomer's own TTFT deadline
cannot wait. Each step is the shared
:class:`~adaspec_hf.core.step.SpecStep` (draft -> select -> verify -> commit) with per-request
tokens, sampling mode and logits processors, so greedy outputs equal ``target.generate`` for the
same prompt whatever the batch around it.

:class:`SLOPlanner` is AdaServe's selection on top of the goodput planner: each step it first
gives every request that is behind its TPOT track the draft nodes it needs (neediest first, by
calibrated path probability), then spends the rest where the batch's predicted goodput rises.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import numbers
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import (
    GenerationConfig, LogitsProcessorList, PreTrainedModel,
)

from adaspec_hf.compat import logits_processors, prepare_generation_config
from adaspec_hf.core.step import NO_TOKEN_MESSAGE, GenerationStats, RowBatch, RowSource, SpecStep, draw_keys
from adaspec_hf.serving.handle import Chunk, EngineClosed, RequestHandle, RequestResult
from adaspec_hf.core.kv import check_cache_support
from adaspec_hf.policies.planner import AdaptivePlanner
from adaspec_hf.policies.base import DraftPolicy, LevelContext, StepContext
from adaspec_hf.core.processing import Processing
from adaspec_hf.policies.selection import best_prefix, top_n_subtree
from adaspec_hf.core.verify import NO_TOKEN, inverse_cdf, position_uniform
from adaspec_hf.slo import SLO
from adaspec_hf.core.tree import DraftTree

logger = logging.getLogger("adaspec_hf")

__all__ = ["Chunk", "Engine", "EngineClosed", "RequestHandle", "RequestResult", "SLO", "SLOPlanner",
           "ServingStepContext", "make_engine_policy"]

STEP_HISTORY = 4096  # step records an engine keeps (totals count every step); bounded memory
PROCESSOR_CACHE_SIZE = 64  # distinct stateless sampling settings whose processors are kept for reuse
STEP_RETRIES = 1  # a failed step is rolled back and retried this often before its rows fail
SURGERY_RETRIES = 1  # same for dropping rows / compacting (a transient OOM costs no request)
MERGE_RETRIES = 1  # a newcomer whose merge into the batch failed is prefilled again this often
IDLE_POLL_S = 0.1  # an idle step loop re-checks for work (and for its engine being dropped) this often
MAX_SEED = 1 << 63  # submit(seed=) range: a non-negative int64 key


# ----------------------------------------------------------------------------------- a request
@dataclass
class _Request:
    id: int
    handle: RequestHandle
    prompt: list[int]
    buf: torch.Tensor  # prompt, then generated tokens (capacity prompt + max_new + 1)
    max_new: int
    do_sample: bool
    processing: Processing | None
    eos: frozenset
    stop: tuple[str, ...]  # stop strings (matched in the decoded generated text)
    slo: SLO | None
    arrival: float
    reserve: int
    n_gen: int = 0
    t_first: float | None = None
    t_last: float | None = None
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    text: str = ""
    failed: BaseException | None = None
    admitted: bool = False
    key: int = 0  # sampling key: its tokens are position-keyed draws (same text whatever the batch)
    merge_failures: int = 0

    @property
    def n(self) -> int:
        return len(self.prompt) + self.n_gen

    @property
    def deadline(self) -> float:
        return self.arrival + (self.slo.ttft if self.slo else math.inf)


@dataclass
class ServingStepContext(StepContext):
    """:class:`StepContext` plus each row's TPOT objective and how far it is behind its track."""

    tpot: torch.Tensor | None = None  # (B,) seconds per token; inf = no TPOT objective
    tokens_needed: torch.Tensor | None = None  # (B,) expected tokens this step must emit to stay on track
    step_time: float = 0.0  # estimated seconds of this step
    rate_needed: torch.Tensor | None = None  # (B,) tokens per step needed from now on to still meet the
    #                                          TPOT objective at max_new_tokens (inf: can no longer)


def _cut_tokens(r: _Request, toks: list[int], tokenizer=None) -> tuple[list[int], str | None]:
    """Apply max_new / eos / stop strings to tokens about to be committed (output keeps the
    EOS token or the tokens that complete a stop string, as HF ``generate`` does)."""
    reason = None
    room = r.max_new - r.n_gen
    if len(toks) >= room:
        toks, reason = toks[:room], "length"
    if r.eos:
        for k, t in enumerate(toks):
            if t in r.eos:
                toks, reason = toks[: k + 1], "eos"
                break
    if r.stop and tokenizer is not None:
        done = r.buf[len(r.prompt): r.n].tolist()
        for k in range(len(toks)):
            text = tokenizer.decode(done + toks[: k + 1], skip_special_tokens=False)
            if any(s in text for s in r.stop):
                toks, reason = toks[: k + 1], "stop"
                break
    return toks, reason


def _stable_text(text: str) -> str:
    """The part of a partial decode that later tokens cannot change under HF's
    ``clean_up_tokenization_spaces`` (which deletes the space before punctuation and around a
    quote, e.g. "a ' b" -> "a'b"): everything before the last whitespace, backed off past a
    trailing quote or space."""
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    stable = text[:cut] if cut >= 0 else ""
    while stable:
        stable = stable.rstrip()
        if not stable.endswith("'"):
            break
        stable = stable[: max(stable.rfind(" "), 0)]
    return stable


class _Rows(RowSource):
    """The engine's running requests seen by :class:`SpecStep` (rows keyed by request id)."""

    def __init__(self, engine: "Engine"):
        # weak, and the request cache is cleared after each step: an engine dropped without close()
        # is then freed by reference counting (no cycle), which ends its thread
        self.engine = weakref.proxy(engine)
        self._cache: tuple[list[int], list[_Request]] | None = None
        self.finish_reason: dict[int, str] = {}

    def reqs(self, rid: torch.Tensor) -> list[_Request]:
        ids = rid.tolist()
        if self._cache is None or self._cache[0] != ids:
            self._cache = (ids, [self.engine._running[i] for i in ids])
        return self._cache[1]

    def sample_keys(self, rid):
        return torch.tensor([r.key for r in self.reqs(rid)], dtype=torch.long, device=rid.device)

    def fail_rows(self, rid, bad, error):
        for r, b in zip(self.reqs(rid), bad.tolist()):
            if b:
                self._fail(r, error)

    def remaining(self, rid):
        return torch.tensor([r.max_new - r.n_gen for r in self.reqs(rid)], dtype=torch.long, device=rid.device)

    def committed(self, rid, start, width):
        rows = []
        for r, s in zip(self.reqs(rid), start.tolist()):
            piece = r.buf[s: s + width]
            if piece.shape[0] < width:
                piece = torch.cat([piece, piece.new_zeros(width - piece.shape[0])])
            rows.append(piece)
        return torch.stack(rows).to(rid.device)

    def token_at(self, rid, position):
        return torch.stack([r.buf[p] for r, p in zip(self.reqs(rid), position.tolist())]).to(rid.device)

    def prefix_fn(self, rid):
        reqs = self.reqs(rid)

        def prefix_of(rows: torch.Tensor, paths: torch.Tensor, depths: torch.Tensor | None = None):
            dl = depths.tolist() if depths is not None else [paths.shape[1]] * len(rows)
            res = []
            for i, path, d in zip(rows.tolist(), paths, dl):
                r = reqs[i]
                res.append((i, torch.cat([r.buf[: r.n], path[:d].to(r.buf.device)])))
            return res
        return prefix_of

    def process_fn(self, rid):
        reqs = self.reqs(rid)
        if all(r.processing is None for r in reqs):
            return None
        groups: dict[int, tuple[Processing, list[int]]] = {}
        for i, r in enumerate(reqs):
            if r.processing is not None:
                groups.setdefault(id(r.processing), (r.processing, []))[1].append(i)

        def process(scores: torch.Tensor, prefixes) -> torch.Tensor:
            b = len(reqs)
            k = scores.shape[0] // b
            if k * b != scores.shape[0]:
                raise RuntimeError("processor lines are not laid out row-major over the batch")
            out = scores.clone()
            items = None
            for proc, rows in groups.values():
                if proc.input_free:
                    lines = torch.cat([torch.arange(i * k, (i + 1) * k) for i in rows]).to(scores.device)
                    try:
                        out[lines] = proc(scores[lines], list)
                    except Exception as e:  # noqa: BLE001 - a request's processor fails that request only
                        for i in rows:
                            self._fail(reqs[i], e)
                    continue
                for i in rows:
                    lines = torch.arange(i * k, (i + 1) * k, device=scores.device)
                    try:
                        if items is None:
                            items = prefixes()
                        mine = [(0, items[j][1]) for j in lines.tolist()]
                        out[lines] = proc(scores[lines], lambda mine=mine: mine)
                    except Exception as e:  # noqa: BLE001
                        self._fail(reqs[i], e)
            return out
        return process

    def _fail(self, r: _Request, e: BaseException) -> None:
        if r.failed is None:
            r.failed = e

    def sampling(self, rid):
        flags = [r.do_sample for r in self.reqs(rid)]
        if all(flags) or not any(flags):
            return bool(flags[0]) if flags else False
        return torch.tensor(flags, dtype=torch.bool, device=rid.device)

    def context(self, **kw):
        eng = self.engine
        now = time.perf_counter()
        tau = eng._step_ema
        tpot, need, rate = [], [], []
        for r in self.reqs(kw["row_ids"]):
            t = r.slo.tpot if r.slo is not None else math.inf
            tpot.append(t)
            if math.isfinite(t) and r.t_first is not None:
                need.append(1.0 + (now + tau - r.t_first) / t - r.n_gen)
                left = r.t_first + (r.max_new - 1) * t - now
                rate.append((r.max_new - r.n_gen) * tau / left if left > 0 else math.inf)
            else:
                need.append(0.0)
                rate.append(0.0)
        dev = kw["context_len"].device
        return ServingStepContext(**kw, tpot=torch.tensor(tpot, device=dev),
                                  tokens_needed=torch.tensor(need, device=dev), step_time=tau,
                                  rate_needed=torch.tensor(rate, device=dev))

    def commit(self, rid, emitted, n_emit, scores, raw, source):
        now = time.perf_counter()
        done = []
        em = emitted.tolist()
        for r, toks, n in zip(self.reqs(rid), em, n_emit.tolist()):
            if r.failed is not None:
                done.append(True)
                continue
            try:
                reason = self.engine._commit(r, toks[:n], now)
            except Exception as e:  # noqa: BLE001 - e.g. decoding for stop strings raised
                self._fail(r, e)
                reason = "error"
            if reason is not None:
                self.finish_reason[r.id] = reason
            done.append(reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=rid.device)


# ------------------------------------------------------------------------------------- planner
class SLOPlanner(AdaptivePlanner):
    """AdaServe's speculate -> select -> verify on top of :class:`AdaptivePlanner`'s goodput model.

    Each step, a row with a TPOT objective that is behind its track (it needs more than the one token
    a step always yields: ``tokens_needed = elapsed / tpot - produced`` at the end of the step) and
    can still meet it is served first:

    * Draft: such rows draft (at least) while their calibrated expected tokens fall short of the need
      and one more level raises *their own* predicted token rate (expected tokens / step time).
    * Select, phase 1: neediest row first, each gets the prefix of its nodes (by calibrated path
      probability) that maximises its own token rate, up to the node that covers its need, within
      ``token_budget`` phase-1 nodes per step. Speculation that would slow a row down is never forced.
    * Select, phase 2: the remaining nodes of all rows, best path probability first, while the
      batch's predicted goodput (expected tokens / predicted step time) rises.

    Rows without an SLO, on track, or past saving are best effort at maximal goodput: then the step
    is exactly :class:`AdaptivePlanner`'s (same latency and acceptance models, same corrections).
    """

    def __init__(self, latency, acceptance=None, *, tree: bool = False, max_depth: int = 12,
                 max_children: int = 4, token_budget: int | None = None, min_node_value: float = 0.02, **kw):
        super().__init__(latency, acceptance, tree=tree, max_depth=max_depth, max_children=max_children, **kw)
        self.name = "slo-tree" if tree else "slo"
        self.token_budget = token_budget
        self.min_node_value = float(min_node_value)

    def reset(self) -> None:
        super().reset()
        self._need: torch.Tensor | None = None
        self.slo_nodes = 0  # nodes selected by phase 1 (statistics)
        self.behind_rows = 0  # row-steps behind their TPOT track that phase 1 served

    # ------------------------------------------------------------------------------ helpers
    def _verify_at(self, q: int) -> float:
        verify = self._step["verify"]
        return float(verify[min(int(q), len(verify) - 1)])

    def _spent(self) -> float:
        st = self._step
        return self.latency.overhead + self._draft_cost(st["rows"], 1, st["context"]) * (1 + st.get("draft_levels", 0))

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
        if len(self.chosen) > 4096:
            del self.chosen[:-1024]
        if not self._probe:  # a probe step is measured as the base planner drafted it
            depth = self._slo_depth(ctx, depth)
        return depth

    def _slo_depth(self, ctx: StepContext, depth: torch.Tensor) -> torch.Tensor:
        need = getattr(ctx, "tokens_needed", None)
        if need is None:
            return depth
        extra = (need.float().cpu() - 1.0).clamp(min=0.0)
        if not bool((extra > 0).any()):
            return depth
        # would drafting raise a behind row's own token rate at its running acceptance?
        st = self._step
        rows, context = st["rows"], st["context"]
        alpha = np.asarray(st["alpha"], dtype=float)
        ks = np.arange(1, self.cap + 1)
        verify = np.asarray(st["verify"], dtype=float)
        times = self.latency.overhead + ks * self._draft_cost(rows, 1, context) + verify[np.minimum(ks, len(verify) - 1)]
        gains = np.cumsum(alpha[:, None] ** ks[None, :], axis=1)
        pays = ((1.0 + gains) / times[None, :]).max(1) > 1.0 / (self.latency.overhead + verify[0])
        behind = (extra > 0) & torch.as_tensor(pays)
        # a row that cannot meet its objective any more (even at its best plausible tokens per step)
        # is served best effort: phase 1 is for the requests it can still save
        rate = getattr(ctx, "rate_needed", None)
        if rate is not None:
            behind &= rate.float().cpu() <= torch.as_tensor(1.0 + gains[:, -1], dtype=torch.float32)
        if not bool(behind.any()):
            return depth
        self.behind_rows += int(behind.sum())
        self._need = torch.where(behind, extra, torch.zeros_like(extra))
        return torch.where(behind.to(depth.device), torch.full_like(depth, self.cap), depth)

    def _candidate_values(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated path values of this level's candidates (as the base planner computes them) and
        each row's expected tokens from the nodes drafted so far."""
        b, c = ctx.cand_path_prob.shape
        dev = ctx.cand_path_prob.device
        tree = ctx.tree
        node_path = self._calibrated_path(tree).to(dev)
        ones = torch.ones(b, c, device=dev)
        parent = ctx.cand_parent if ctx.cand_parent is not None else torch.full((b, c), -1, device=dev)
        par_val = torch.where(parent >= 0, node_path.gather(1, parent.clamp(min=0)) if tree.width else ones, ones)
        alpha_rows = torch.as_tensor(self._step["alpha"], dtype=torch.float32, device=dev)[:, None].expand(b, c)
        cand_parent = torch.where(ctx.cand_path_prob > 0, parent, -2 - torch.arange(c, device=dev))
        a = self._acceptance(ctx.cand_prob.float(), torch.full_like(parent, ctx.level), alpha_rows, cand_parent)
        v = (par_val * a).masked_fill(ctx.cand_path_prob <= 0, 0.0)
        v = torch.cummin(v, dim=1).values * (ctx.max_depth >= ctx.level)[:, None]
        have = node_path.sum(1) if tree.width else torch.zeros(b, device=dev)
        return v, have

    def choose(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        levels_before = self._step.get("draft_levels", 0)
        n_add, n_exp = super().choose(ctx)
        if self._need is None or self._probe:
            return n_add, n_exp
        st = self._step
        st["draft_levels"] = levels_before  # re-decided below with the SLO rows included
        v, have = self._candidate_values(ctx)
        need = self._need.to(v.device)
        have_n = ctx.tree.valid.sum(1) if ctx.tree.width else torch.zeros_like(n_add)
        short = need - have
        spent = self._spent()
        width = int((have_n + n_add).max())
        e = min(self.max_children, v.shape[1]) if self.tree else 1
        alpha = st["alpha"]
        short_l, have_l, need_l = short.tolist(), have.tolist(), need.tolist()
        have_n_l, add_l, exp_l = have_n.tolist(), n_add.tolist(), n_exp.tolist()
        depth_l, v_l = ctx.max_depth.tolist(), v.tolist()
        extra_draft = None
        for r in sorted(range(len(short_l)), key=lambda i: -short_l[i]):
            if short_l[r] <= 0:
                break
            vals = v_l[r]
            useful, acc = [], 0.0
            for x in vals:  # candidates up to (and including) the one that covers the need
                if x < self.min_node_value or acc >= short_l[r]:
                    break
                useful.append(x)
                acc += x
            k = max(self._best_prefix(useful, have_l[r], have_n_l[r], width, spent), add_l[r])
            add_l[r] = k
            width = max(width, have_n_l[r] + k)
            got = have_l[r] + sum(vals[:k])
            if k and got < need_l[r] and depth_l[r] > ctx.level:
                if extra_draft is None:
                    extra_draft = self._draft_cost(st["rows"], e, st["context"])
                child = max(vals[: min(k, e)]) * float(alpha[r])
                now = (1.0 + got) / (spent + self._verify_at(width))
                more = (1.0 + got + child) / (spent + extra_draft + self._verify_at(max(width, have_n_l[r] + k + 1)))
                if more > now:
                    exp_l[r] = max(exp_l[r], min(k, e))
        n_add = torch.tensor(add_l, dtype=n_add.dtype, device=n_add.device)
        n_exp = torch.minimum(torch.tensor(exp_l, dtype=n_exp.dtype, device=n_exp.device), n_add)
        if bool((n_exp > 0).any()):
            st["draft_levels"] = levels_before + 1
        return n_add, n_exp

    def select(self, tree: DraftTree, ctx: StepContext) -> torch.Tensor:
        st = self._step
        if tree.width == 0 or not st or self._probe or self._need is None:
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
        extra, _, t = best_prefix(rest, f.float(), base, torch.as_tensor(st["verify"]), spent)
        self.last_predicted_time = t
        return top_n_subtree(tree, values, f + extra)


def make_engine_policy(policy: "str | DraftPolicy", target, draft) -> DraftPolicy:
    """A policy by name: ``"slo"`` / ``"slo-tree"`` (:class:`SLOPlanner`) or any registry name."""
    if isinstance(policy, DraftPolicy):
        return policy
    name = str(policy).strip().lower()
    if name in ("slo", "slo-tree"):
        from adaspec_hf.policies.planner import planner_state

        latency, acceptance = planner_state(target, draft)
        return SLOPlanner(latency, acceptance, tree=name == "slo-tree")
    from adaspec_hf.policies.registry import make_policy

    return make_policy(name, target, draft)


def _forget(policy: DraftPolicy, row_id: int) -> None:
    """Drop per-request state a policy keeps by row id (long-running engines)."""
    forget = getattr(policy, "forget", None)
    if callable(forget):
        forget(row_id)
    chosen = getattr(policy, "chosen", None)
    if isinstance(chosen, list) and len(chosen) > 4096:
        del chosen[:-1024]


def _claim_policy(policy: DraftPolicy, engine: "Engine") -> None:
    """One policy object serves one engine: its per-step state (and per-row state keyed by request
    ids, which restart at 1 in every engine) would be mixed up by two step loops."""
    owner = getattr(policy, "_adaspec_engine", None)
    other = owner() if owner is not None else None
    if other is not None and other is not engine and not other._released:
        raise ValueError(
            f"this {type(policy).__name__} policy object is already used by another running Engine; give each "
            "engine its own policy (a new one, or copy.deepcopy(policy)), or close the other engine first")
    policy._adaspec_engine = weakref.ref(engine)


def _engine_thread(ref: "weakref.ref[Engine]") -> None:
    """The step loop. It holds its engine only during an iteration, so an engine dropped without
    close() is collected and its thread ends (within ``IDLE_POLL_S``)."""
    while True:
        engine = ref()
        if engine is None:
            return
        state = engine._tick()
        if state == "stop":
            engine._on_stop()
            return
        if state == "idle":
            wake = engine._wake
            with wake:
                if engine._idle_locked():
                    engine = None
                    wake.wait(timeout=IDLE_POLL_S)
        engine = None


def _wake_up(cond: threading.Condition) -> None:
    with cond:
        cond.notify_all()


def _max_positions(model: PreTrainedModel) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                  "no_repeat_ngram_size", "min_new_tokens", "suppress_tokens", "bad_words_ids")


# -------------------------------------------------------------------------------------- engine
class Engine:
    """Continuous-batching speculative engine with per-request SLOs; see the module docstring.

    ``policy``: a name (``"slo"`` default: :class:`SLOPlanner`; ``"adaptive"``, ``"smartspec"``,
    ``"static-K"``, ...) or a :class:`~adaspec_hf.policies.base.DraftPolicy`. ``max_rows``: requests in
    the running batch at once. ``max_cached_tokens``: bound on each model's KV cache slots, rows x
    cache length with left padding and holes included, at every forward: a request joins only while
    rows x the longest request (prompt + max_new_tokens) fits, speculation is capped to the room
    left, and the caches are compacted when needed (a request that alone exceeds it is refused).
    ``seed``: per-request sampling keys, drawn in submission order (see :meth:`submit`).
    ``latency``: a :class:`~adaspec_hf.efficiency.latency.LatencyModel` for admission decisions (default: the
    policy's, if it has one). ``best_effort_wait_s``: longest a request without a TTFT objective
    waits for admission while SLO requests are protected.
    """

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel, tokenizer=None,
                 policy: "str | DraftPolicy" = "slo", *, max_rows: int = 8, max_cached_tokens: int | None = None,
                 compaction_threshold: float = 0.5, seed: int | None = None, latency=None,
                 best_effort_wait_s: float = 2.0, start: bool = True):
        check_cache_support(target)
        check_cache_support(draft)
        from adaspec_hf.integrations.hf.generate import check_vocab

        check_vocab(target, draft)
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        if max_cached_tokens is not None and (not isinstance(max_cached_tokens, int) or max_cached_tokens < 2):
            raise ValueError(f"max_cached_tokens must be an integer >= 2 or None, got {max_cached_tokens!r}")
        if not (isinstance(best_effort_wait_s, (int, float)) and best_effort_wait_s >= 0):
            raise ValueError(f"best_effort_wait_s must be >= 0 seconds, got {best_effort_wait_s!r}")
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self._released = False
        self.policy = make_engine_policy(policy, target, draft)
        _claim_policy(self.policy, self)  # before reset(): never disturb another engine's policy
        self.policy.reset()
        self.latency = latency if latency is not None else getattr(self.policy, "latency", None)
        self.best_effort_wait_s = float(best_effort_wait_s)
        self.max_rows, self.max_cached_tokens = max_rows, max_cached_tokens
        self.compaction_threshold = compaction_threshold
        self.device = target.device
        self.vocab_size = int(target.config.vocab_size)
        limits = [m for m in (_max_positions(target), _max_positions(draft)) if m]
        self.max_positions = min(limits) if limits else None
        self.generator = torch.Generator(device=self.device)
        self._key_gen = torch.Generator()  # per-request sampling keys, drawn in submission order
        if seed is None:
            self.generator.seed()
            self._key_gen.seed()
        else:
            self.generator.manual_seed(int(seed))
            self._key_gen.manual_seed(int(seed))
        self.stats = GenerationStats(policy=getattr(self.policy, "name", type(self.policy).__name__),
                                     history=STEP_HISTORY)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[_Request] = []
        self._queue: list[tuple[float, float, int, _Request]] = []  # EDF heap of admitted-to-be
        self._running: dict[int, _Request] = {}
        self._closing = False
        self._abort = False
        self._dead: BaseException | None = None
        self._batch = RowBatch(target, draft)
        self._rows = _Rows(self)
        self._stepper = SpecStep(self.policy, draft_sampling=False, generator=self.generator)
        self._step_no = 0
        self._step_ema = 0.0
        self._tokens_ema = 1.0  # emitted tokens per row per step
        self._drafted_ema = 0.0  # verified draft nodes per row per step
        self.deferred_admissions = 0  # admissions postponed to protect running TPOT objectives
        self._prefill_rate: float | None = None  # seconds per prompt token (EMA of observed prefills)
        self._prefill_log_ratio = 0.0  # observed / latency-model prefill time (log EMA)
        self._proc_cache: OrderedDict[tuple, Processing | None] = OrderedDict()
        self._step_failures = 0  # consecutive failed steps (rolled back, retried)
        self._surgery_failures = 0  # consecutive failed row drops / compactions
        self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self),), name="adaspec-engine",
                                        daemon=True)
        weakref.finalize(self, _wake_up, self._wake)  # dropped without close(): the idle loop wakes, ends
        if start:
            self._thread.start()

    # ------------------------------------------------------------------------------ public API
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(drain=exc_type is None)

    def submit(
        self,
        prompt: "str | Sequence[int] | torch.Tensor",
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: "int | list[int] | None" = None,
        stop: "str | list[str] | None" = None,
        slo: "SLO | dict | None" = None,
        logits_processor: LogitsProcessorList | None = None,
        generation_config: GenerationConfig | None = None,
        seed: int | None = None,
        **generation_kwargs: Any,
    ) -> RequestHandle:
        """Queue a request. Invalid arguments raise here (``ValueError``) and affect nothing else.

        ``eos_token_id=None`` uses the target's generation config (``[]`` disables EOS);
        ``stop``: stop strings (need a tokenizer); other sampling arguments are those of HF
        ``generate`` and build the same logits processors it would. ``seed``: the request's own
        sampling seed (an int in [0, 2**63)); without it the key comes from ``Engine(seed=)`` in
        submission order. Either way a sampled request's text does not depend on the batch around
        it, on what was drafted, or on the machine's speed.
        """
        if self._dead is not None:
            raise EngineClosed(f"the engine's step loop stopped: {self._dead!r}")
        if self._closing:
            raise EngineClosed("the engine is closed")
        ids = self._prompt_ids(prompt)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if self.max_positions is not None and len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the models' "
                f"maximum of {self.max_positions} positions")
        reserve = len(ids) + max_new_tokens
        if self.max_cached_tokens is not None and reserve > self.max_cached_tokens:
            raise ValueError(f"the request needs {reserve} cached tokens (prompt + max_new_tokens); this "
                             f"engine allows {self.max_cached_tokens} (max_cached_tokens)")
        slo = SLO.coerce(slo)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        sampling.update(generation_kwargs)
        processing, do_sample, eos = self._processing(ids, max_new_tokens, bool(do_sample), sampling, eos_token_id,
                                                      logits_processor, generation_config)
        stop = self._stop_strings(stop)
        rid = next(self._ids)
        handle = RequestHandle(self, rid)
        buf = torch.zeros(len(ids) + max_new_tokens + 1, dtype=torch.long, device=self.device)
        buf[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        req = _Request(id=rid, handle=handle, prompt=ids, buf=buf, max_new=max_new_tokens, do_sample=do_sample,
                       processing=processing, eos=eos, stop=stop, slo=slo, arrival=time.perf_counter(),
                       reserve=reserve)
        with self._lock:
            if self._closing or self._dead is not None:
                raise EngineClosed("the engine is closed")
            req.key = int(seed) if seed is not None else int(draw_keys(1, self._key_gen)[0])
            self._incoming.append(req)
            self._wake.notify_all()
        return handle

    def generate(self, prompt, max_new_tokens: int = 64, **kwargs) -> RequestResult:
        """Submit and wait (convenience)."""
        return self.submit(prompt, max_new_tokens, **kwargs).result()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain=True`` finishes queued and running ones, ``False`` cancels
        them. Waits for the step loop to end (at most ``timeout`` seconds)."""
        with self._lock:
            self._closing = True
            if not drain:
                self._abort = True
            self._wake.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        elif not self._thread.is_alive() and not self._thread.ident:
            self._shutdown_unstarted()
            self._released = True

    def start(self) -> None:
        """Start the step loop (``Engine(..., start=False)``); a no-op while it runs."""
        with self._lock:
            if self._thread.is_alive():
                return
            if self._closing or self._thread.ident is not None:
                raise EngineClosed("the engine is closed; create a new Engine")
            self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closing and not self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._queue)

    # ------------------------------------------------------------------------- validation
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs Engine(..., tokenizer=...); or pass token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1:
                raise ValueError(f"a tensor prompt must be 1-D (or (1, L)), got shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt must be text, a list of token ids or a tensor, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def _processing(self, ids, max_new, do_sample, sampling, eos_token_id, logits_processor, generation_config):
        t = sampling.get("temperature")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        k = sampling.get("top_k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be an integer >= 0, got {k!r}")
        p = sampling.get("top_p")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        rp = sampling.get("repetition_penalty")
        if rp is not None and (isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp)
                               or rp <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unsupported generation arguments {sorted(unknown)}")
        kwargs = {k: v for k, v in sampling.items() if v is not None}
        try:
            gc, model_kwargs = prepare_generation_config(
                self.target, generation_config, dict(do_sample=do_sample, max_new_tokens=max_new, **kwargs))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid generation arguments: {e}") from e
        if eos_token_id is not None:
            gc.eos_token_id = eos_token_id if eos_token_id != [] else None
        eos_val = gc.eos_token_id
        eos_list = [] if eos_val is None else ([eos_val] if isinstance(eos_val, int) else list(eos_val))
        if not all(isinstance(e, int) and 0 <= e < self.vocab_size for e in eos_list):
            raise ValueError(f"eos_token_id must be token ids in [0, {self.vocab_size}), got {eos_val!r}")
        if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1:
            raise ValueError("the engine does not support beam search or several sequences per request")
        do_sample = bool(gc.do_sample)
        key = None
        if logits_processor is None:
            key = (do_sample, gc.temperature, gc.top_k, gc.top_p, gc.min_p, gc.typical_p, gc.repetition_penalty,
                   gc.no_repeat_ngram_size, gc.min_new_tokens, gc.min_length, str(gc.suppress_tokens),
                   str(gc.bad_words_ids), tuple(eos_list))
            if key in self._proc_cache:
                self._proc_cache.move_to_end(key)
                return self._proc_cache[key], do_sample, frozenset(eos_list)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        try:
            gc.max_length = len(ids) + max_new
            procs = logits_processors(self.target, gc, input_ids, logits_processor, model_kwargs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid generation arguments: {e}") from e
        proc = Processing(procs, batch_size=1) if len(procs) else None
        if key is not None and (proc is None or proc.input_free):
            self._proc_cache[key] = proc  # stateless: shared by requests with the same settings
            while len(self._proc_cache) > PROCESSOR_CACHE_SIZE:
                self._proc_cache.popitem(last=False)
        return proc, do_sample, frozenset(eos_list)

    def _stop_strings(self, stop) -> tuple[str, ...]:
        if stop is None or stop == []:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if self.tokenizer is None:
            raise ValueError("stop strings need Engine(..., tokenizer=...)")
        return tuple(stop)

    # ---------------------------------------------------------------------------- step loop
    def _poke(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _tick(self) -> str:
        """One iteration of the step loop: "busy" (stepped), "idle" (nothing to run) or "stop".
        A failure is contained to its request or step; only an interrupt (KeyboardInterrupt,
        SystemExit) stops the loop, and then every handle still resolves."""
        try:
            with torch.no_grad():
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    abort = self._abort
                for r in incoming:
                    heapq.heappush(self._queue, (self._priority(r), r.arrival, r.id, r))
                if abort:
                    self._cancel_all()
                    return "stop"
                self._reap_cancelled()
                if not self._sync_rows():
                    return "busy"  # rows could not be dropped yet: retried next iteration, no step
                self._admit()
                if not self._sync_rows():  # a newcomer that failed right after its merge
                    return "busy"
                if self._batch.rows == 0:
                    with self._lock:
                        if self._closing and not self._incoming and not self._queue:
                            return "stop"  # drained
                    return "idle"
                self._step()
                return "busy"
        except BaseException as e:  # noqa: BLE001 - fail everything clearly, never hang callers
            logger.exception("adaspec engine loop died")
            self._dead = e
            self._fail_all(e)
            return "stop"

    def _idle_locked(self) -> bool:
        """With the lock held: nothing to do until a submit, a cancel or close() wakes the loop."""
        return not (self._incoming or self._abort or self._queue or self._closing)

    def _on_stop(self) -> None:
        """The loop has ended: the policy may serve another engine."""
        self._released = True

    def _priority(self, r: _Request) -> float:
        """Latest start time that still meets the TTFT deadline (deadline - predicted prefill)."""
        return r.deadline - self._predict_prefill(len(r.prompt))

    def _prefill_model(self, n_tokens: int) -> float | None:
        """Prefill seconds (target + draft) for a prompt from the policy's latency model, if any."""
        lat = self.latency
        if lat is None or not getattr(lat, "tables", None):
            return None
        try:
            return float(lat.target_time(1, n_tokens, n_tokens / 2) + lat.draft_time(1, n_tokens, n_tokens / 2))
        except Exception:  # noqa: BLE001 - a prediction is only a hint
            return None

    def _predict_prefill(self, n_tokens: int) -> float:
        """Latency-model prediction corrected by observed prefills (else the observed s/token)."""
        base = self._prefill_model(n_tokens)
        if base is not None:
            return base * math.exp(self._prefill_log_ratio)
        return (self._prefill_rate or 0.0) * n_tokens

    def _observe_prefill(self, n_tokens: int, seconds: float) -> None:
        rate = seconds / n_tokens
        self._prefill_rate = rate if self._prefill_rate is None else 0.8 * self._prefill_rate + 0.2 * rate
        base = self._prefill_model(n_tokens)
        if base and seconds > 0:
            obs = min(max(math.log(seconds / base), -3.0), 3.0)
            self._prefill_log_ratio = 0.8 * self._prefill_log_ratio + 0.2 * obs

    def _admit_deadline(self, r: _Request) -> float:
        """TTFT deadline, or for best-effort requests the latest time to start them (no starvation)."""
        return r.deadline if math.isfinite(r.deadline) else r.arrival + self.best_effort_wait_s

    def _step_ratio(self, rows: int) -> float:
        """Predicted step time with ``rows + 1`` rows over that with ``rows`` (latency model, else linear)."""
        if self.latency is not None and rows > 0:
            q = 1.0 + self._drafted_ema
            ctx = float(self._batch.length.float().mean()) if self._batch.rows else 64.0
            try:
                now = self.latency.target_time(rows, q, ctx)
                more = self.latency.target_time(rows + 1, q, ctx)
                if now > 0 and more > 0:
                    return more / now
            except Exception:  # noqa: BLE001 - a prediction is only a hint
                pass
        return (rows + 1) / max(rows, 1)

    def _tpot_risk(self, now: float, stall: float) -> bool:
        """Would one more row (and ``stall`` seconds of prefill) make a running request miss a TPOT
        objective it would otherwise meet? Projected from each row's tokens per step so far."""
        rows = self._batch.rows
        if rows == 0 or self._step_ema <= 0:
            return False
        t_cur = self._step_ema
        t_new = t_cur * self._step_ratio(rows)
        for r in self._running.values():
            if r.slo is None or r.slo.tpot_ms is None or r.t_first is None:
                continue
            left = r.max_new - r.n_gen
            if left <= 0:
                continue
            per_step = (r.n_gen - 1 + 2.0 * self._tokens_ema) / (r.steps + 2.0)
            allowed = r.t_first + (r.max_new - 1) * r.slo.tpot
            if now + left / per_step * t_cur <= allowed < now + stall + left / per_step * t_new:
                return True
        return False

    def _admit(self) -> None:
        """Earliest deadline first (latest start = TTFT deadline - predicted prefill). Into a running
        batch, a request is admitted when no running request's TPOT objective is put at risk by the
        larger batch and the prefill stall, or when its own TTFT deadline cannot wait any longer."""
        stall = 0.0
        while self._queue and self._batch.rows < self.max_rows:
            _, _, _, r = self._queue[0]
            if not self._fits(r):
                break
            cost = self._predict_prefill(len(r.prompt))
            if self._batch.rows:
                now = time.perf_counter()
                urgent = self._admit_deadline(r) - now <= cost + 2.0 * self._step_ema
                if not urgent and self._tpot_risk(now, stall + cost):
                    self.deferred_admissions += 1
                    break
            heapq.heappop(self._queue)
            if not self._prefill(r):
                break  # its merge failed and it waits for a retry: let a step run first
            stall += cost

    def _fits(self, r: _Request) -> bool:
        """Would the batch with ``r`` stay within ``max_cached_tokens``? Every row is padded to the
        longest, so the bound is rows x the longest request (prompt + max_new_tokens): after a
        compaction, even the last one-token step of every row then fits."""
        if self.max_cached_tokens is None:
            return True
        longest = max([q.reserve for q in self._running.values()] + [r.reserve])
        return (len(self._running) + 1) * longest <= self.max_cached_tokens

    def _prefill(self, r: _Request) -> bool:
        """Prefill ``r`` alone, then merge it into the batch and commit its first token. False when
        the merge failed and ``r`` went back to the queue for another try."""
        t0 = time.perf_counter()
        try:
            ids = r.buf[: len(r.prompt)][None]
            rb = RowBatch(self.target, self.draft)
            logits = rb.prefill(ids, torch.ones_like(ids), torch.tensor([r.id], device=self.device))
            scores = logits
            if r.processing is not None:
                scores = r.processing(logits, lambda: [(0, ids[0])])
            first = self._first_token(r, scores)
            now = time.perf_counter()
            self._observe_prefill(len(r.prompt), now - t0)
            _, reason = _cut_tokens(r, [first], self.tokenizer)  # does it end right here?
        except Exception as e:  # noqa: BLE001 - this request fails alone
            r.failed = e
            self._finish(r, "error")
            return True
        except BaseException as e:  # an interrupt: this request is out of the queue, not running yet
            r.failed = _interrupted(e)
            self._finish(r, "error")
            raise
        if reason is None:
            merged = self._merge(r, rb)
            if merged is not True:
                return merged is None
        try:
            reason = self._commit(r, [first], now)
        except Exception as e:  # noqa: BLE001 - e.g. the tokenizer's decode raised
            r.failed, reason = e, "error"
        if reason is not None:
            self._finish(r, reason)  # a merged row leaves at the next _sync_rows
        return True

    def _first_token(self, r: _Request, scores: torch.Tensor) -> int:
        if not r.do_sample:
            return int(scores.argmax(-1)[0])
        key = torch.tensor([r.key], dtype=torch.long)
        u = position_uniform(key, torch.tensor([[len(r.prompt)]]))[:, 0]
        first = int(inverse_cdf(torch.softmax(scores.float(), -1).cpu(), u)[0])
        if first == NO_TOKEN:
            raise ValueError(NO_TOKEN_MESSAGE)
        return first

    def _merge(self, r: _Request, rb: RowBatch) -> bool | None:
        """Join the running batch (all or nothing). True: running. False: the merge failed, ``r``
        is queued again. None: it failed for good and ``r`` failed alone."""
        try:
            if self._batch.rows:
                with self._batch.atomic():
                    if self.max_cached_tokens is not None:
                        rows, width = self._batch.rows + 1, max(self._batch.tkv.length, rb.tkv.length)
                        if rows * max(width, self._batch.dkv.length, rb.dkv.length) > self.max_cached_tokens:
                            self._batch.force_compact()  # holes and padding out before the merge
                    self._batch.extend(rb)
            else:
                self._batch = rb
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the batch is as it was
            r.merge_failures += 1
            _free_memory(self.device)
            if r.merge_failures <= MERGE_RETRIES:
                logger.warning("adaspec engine: merging request %d failed (%r); it will be prefilled again", r.id, e)
                heapq.heappush(self._queue, (self._priority(r), r.arrival, r.id, r))
                return False
            r.failed = e
            self._finish(r, "error")
            return None
        r.admitted = True
        self._running[r.id] = r
        return True

    def _commit(self, r: _Request, toks: list[int], now: float) -> str | None:
        toks, reason = _cut_tokens(r, toks, self.tokenizer)
        if toks:
            r.buf[r.n: r.n + len(toks)] = torch.tensor(toks, dtype=torch.long)
            r.n_gen += len(toks)
            self.stats.new_tokens += len(toks)
            if r.t_first is None:
                r.t_first = now
            r.t_last = now
            delta = ""
            if self.tokenizer is not None:
                delta = self._text_delta(r, final=reason is not None)
            r.handle._push(Chunk(toks, delta, now))
        return reason

    def _text_delta(self, r: _Request, final: bool) -> str:
        """New streamed text: only ever an extension of what was streamed, so the chunks add up to
        the result's text (a decode that rewrites earlier text is held back until it settles)."""
        text = self.tokenizer.decode(r.buf[len(r.prompt): r.n].tolist(), skip_special_tokens=True)
        if not final:
            if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
                text = _stable_text(text)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                return ""
        if len(text) <= len(r.text) or not text.startswith(r.text):
            return ""
        delta, r.text = text[len(r.text):], text
        return delta

    def _step(self) -> None:
        batch, rows = self._batch, self._rows
        rid_list = batch.rid.tolist()
        self._step_no += 1
        rows.finish_reason = {}
        try:
            caps = self._slot_caps()
            with batch.atomic():
                finished, record = self._stepper(batch, rows, self._step_no, **caps)
        except Exception as e:  # noqa: BLE001 - rolled back: no request saw a token of this step
            rows._cache = None
            self._step_failures += 1
            _free_memory(self.device)
            if self._step_failures <= STEP_RETRIES:
                logger.warning("adaspec engine step failed (%r); rolled back, retrying", e)
                return
            logger.exception("adaspec engine step failed again; failing the %d running requests", len(rid_list))
            self._fail_batch(e)
            return
        self._step_failures = 0
        self._step_ema = record.step_time if self._step_ema == 0 else 0.8 * self._step_ema + 0.2 * record.step_time
        rows_n = max(record.rows, 1)
        self._tokens_ema = 0.8 * self._tokens_ema + 0.2 * (1.0 + sum(record.accepted) / rows_n)
        self._drafted_ema = 0.8 * self._drafted_ema + 0.2 * (sum(record.drafted) / rows_n)
        self.stats.record(record)
        for rq, d, a in zip(rid_list, record.drafted, record.accepted):
            r = self._running[rq]
            r.drafted += d
            r.accepted += a
            r.steps += 1
        fin = finished.tolist()
        for i, rq in enumerate(rid_list):
            r = self._running[rq]
            if r.failed is not None:
                self._finish(r, "error")
            elif fin[i]:
                self._finish(r, rows.finish_reason.get(rq, "length"))
        rows._cache = None
        if self._sync_rows():
            self._compact(force=False)

    def _slot_caps(self) -> dict:
        """Verified nodes / draft levels per row this step may add within ``max_cached_tokens``
        (compacting first when holes and padding are in the way)."""
        bound = self.max_cached_tokens
        batch = self._batch
        if bound is None or batch.rows == 0:
            return {}
        room = bound // batch.rows
        width = max(1, int(getattr(self.policy, "max_children", 1) or 1))
        # draft: catch-up on unseen committed tokens, then up to `width` fed nodes per level
        catch_up = int((batch.length - batch.draft_seen).max())
        need_t = batch.tkv.length + 1
        need_d = batch.dkv.length + catch_up + width
        if need_t > room or need_d > room:
            self._compact(force=True)
            need_t = batch.tkv.length + 1
        nodes = room - need_t
        if nodes < 0:
            raise RuntimeError(f"max_cached_tokens={bound}: {batch.rows} rows x {need_t} slots do not fit")
        levels = (room - batch.dkv.length - catch_up) // width
        return {"max_nodes": nodes, "max_depth_cap": max(0, min(nodes, levels))}

    def _compact(self, force: bool) -> None:
        """Compact the caches (all or nothing); a failure is retried at the next step."""
        try:
            with self._batch.atomic():
                if force:
                    self._batch.force_compact()
                else:
                    self._batch.maybe_compact(self.compaction_threshold)
        except Exception as e:  # noqa: BLE001 - the caches are as they were: holes cost compute, not output
            _free_memory(self.device)
            logger.warning("adaspec engine: compacting the cache failed (%r); retried later", e)
            if force:
                raise

    def _sync_rows(self) -> bool:
        """Drop the rows whose request left (finished, cancelled, failed), all or nothing. False
        when that failed: the loop retries before any other step; after ``SURGERY_RETRIES`` the
        remaining rows fail."""
        ids = self._batch.rid.tolist()
        keep = [i for i, rq in enumerate(ids) if rq in self._running]
        if len(keep) == len(ids):
            return True
        if not keep:
            self._batch = RowBatch(self.target, self.draft)
            return True
        try:
            with self._batch.atomic():
                self._batch.keep(torch.tensor(keep, dtype=torch.long, device=self.device))
        except Exception as e:  # noqa: BLE001 - the batch is as it was
            self._surgery_failures += 1
            _free_memory(self.device)
            if self._surgery_failures <= SURGERY_RETRIES:
                logger.warning("adaspec engine: dropping finished rows failed (%r); retrying", e)
                return False
            logger.exception("adaspec engine: could not drop finished rows; failing the batch")
            self._fail_batch(e)
            return True
        self._surgery_failures = 0
        return True

    def _fail_batch(self, e: BaseException) -> None:
        """Fail every request of the running batch (a step or its cache surgery failed for good)."""
        for i in self._batch.rid.tolist():
            r = self._running.get(i)
            if r is not None:
                r.failed = r.failed or e
                self._finish(r, "error")
        self._batch = RowBatch(self.target, self.draft)
        self._step_failures = self._surgery_failures = 0

    def _reap_cancelled(self) -> None:
        """Cancelled requests leave at once, running or queued (wherever they are in the queue)."""
        if any(q[3].handle._cancel for q in self._queue):
            left = []
            for item in self._queue:
                if item[3].handle._cancel:
                    self._finish(item[3], "cancelled")
                else:
                    left.append(item)
            heapq.heapify(left)
            self._queue = left
        for r in [r for r in self._running.values() if r.handle._cancel]:
            self._finish(r, "cancelled")

    def _finish(self, r: _Request, reason: str) -> None:
        """Resolve ``r``'s handle; never raises (a failure here must not leave a handle hanging)."""
        try:
            self._running.pop(r.id, None)
            _forget(self.policy, r.id)
        except Exception:  # noqa: BLE001 - a policy's bookkeeping cannot keep a handle unresolved
            logger.exception("adaspec engine: dropping request %d's policy state failed", r.id)
        try:
            res = self._result(r, reason)
        except Exception as e:  # noqa: BLE001 - e.g. the tokenizer's decode raised
            r.failed = r.failed or e
            res = RequestResult(request_id=r.id, prompt_ids=list(r.prompt),
                                token_ids=r.buf[len(r.prompt): r.n].tolist(), text=None, finish_reason="error",
                                arrival=r.arrival, ttft=None, tpot=None, latency=None, slo=r.slo, error=r.failed)
        r.handle._finish(res)

    def _result(self, r: _Request, reason: str) -> RequestResult:
        if reason == "error" and r.failed is None:
            r.failed = RuntimeError("request failed")
        ttft = r.t_first - r.arrival if r.t_first is not None else None
        tpot = (r.t_last - r.t_first) / (r.n_gen - 1) if r.n_gen > 1 else None
        latency = r.t_last - r.arrival if r.t_last is not None else None
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.buf[len(r.prompt): r.n].tolist(), skip_special_tokens=True)
            if text.startswith(r.text) and len(text) > len(r.text) and r.n_gen:
                r.handle._push(Chunk([], text[len(r.text):], time.perf_counter()))  # held-back text
                r.text = text
        met = None
        if r.slo is not None:
            met = reason in ("eos", "length", "stop") and r.slo.met(ttft, tpot)
        return RequestResult(
            request_id=r.id, prompt_ids=list(r.prompt), token_ids=r.buf[len(r.prompt): r.n].tolist(), text=text,
            finish_reason=reason, arrival=r.arrival, ttft=ttft, tpot=tpot, latency=latency,
            drafted_tokens=r.drafted, accepted_tokens=r.accepted, steps=r.steps, slo=r.slo, slo_met=met,
            error=r.failed if reason == "error" else None, first_token_at=r.t_first, last_token_at=r.t_last,
        )

    def _cancel_all(self) -> None:
        for _, _, _, r in self._queue:
            self._finish(r, "cancelled")
        self._queue = []
        for r in list(self._running.values()):
            self._finish(r, "cancelled")
        self._batch = RowBatch(self.target, self.draft)
        with self._lock:
            late, self._incoming = self._incoming, []
        for r in late:
            self._finish(r, "cancelled")

    def _fail_all(self, e: BaseException) -> None:
        """The loop stops: every request not yet resolved fails (an interrupt as :class:`EngineClosed`)."""
        if not isinstance(e, Exception):
            e = _interrupted(e)
        with self._lock:
            late, self._incoming = self._incoming, []
            self._closing = True
        for r in [q[3] for q in self._queue] + list(self._running.values()) + late:
            if not r.handle.done():
                r.failed = e if r.failed is None or not isinstance(r.failed, Exception) else r.failed
                self._finish(r, "error")
        self._queue = []

    def _shutdown_unstarted(self) -> None:
        """close() on an engine whose loop never started: resolve every handle."""
        with self._lock:
            late, self._incoming = self._incoming, []
        for r in late:
            self._finish(r, "cancelled")


def _interrupted(e: BaseException) -> EngineClosed:
    """What the requests of a loop stopped by KeyboardInterrupt / SystemExit see (raising the
    interrupt itself in a caller's thread would look like the caller's own Ctrl-C)."""
    err = EngineClosed(f"the engine's step loop was stopped by {type(e).__name__}")
    err.__cause__ = e
    return err


def _free_memory(device: torch.device) -> None:
    """After an allocation failure: hand cached accelerator blocks back before a retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
