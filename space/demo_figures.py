"""The demo's figures and token rendering (matplotlib figures, HTML spans coloured by who produced them)."""
from __future__ import annotations

import html

from matplotlib.figure import Figure

from demo_generate import DRAFT, TARGET, TITLES, Run, highlighted

COLORS = {DRAFT: "#86efac", TARGET: "#bfdbfe"}  # plots; the token CSS uses the same hues
LINE_COLORS = {"plain": "#64748b", "hf": "#f59e0b", "ours": "#16a34a"}


def fig_progress(runs: dict[str, Run], slo_ms: float | None) -> Figure:
    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for m, r in runs.items():
        if r is None or not r.chunks:
            continue
        ts, ns, n = [0.0], [0], 0
        for t, c in r.chunks:
            n += len(c)
            ts.append(t - r.t0)
            ns.append(n)
        if r.done:
            ts.append(r.elapsed)
            ns.append(n)
        ax.step(ts, ns, where="post", color=LINE_COLORS[m], lw=2, label=TITLES[m])
    if slo_ms:
        xmax = max((ax.get_xlim()[1], 0.1))
        ax.plot([0, xmax], [0, xmax * 1e3 / slo_ms], "--", color="#dc2626", lw=1, label=f"SLO pace ({slo_ms:g} ms/token)")
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, max((r.n_tokens for r in runs.values() if r), default=1) * 1.08 + 1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens generated")
    ax.set_title("Tokens over time")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", fontsize=8)
    return fig


def fig_steps(run: Run | None, hf: Run | None, policy: str) -> Figure:
    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if run is not None and run.steps:
        x = list(range(1, len(run.steps) + 1))
        drafted = [s.drafted[0] for s in run.steps]
        accepted = [s.accepted[0] for s in run.steps]
        tree = policy.endswith("tree")
        ax.bar(x, drafted, color="#cbd5e1", label="tree size (nodes verified)" if tree else "draft length chosen")
        ax.bar(x, accepted, color=COLORS[DRAFT], edgecolor="#16a34a", lw=0.5, label="accepted")
        if hf is not None and hf.chunks:
            hx = list(range(1, len(hf.chunks) + 1))
            ax.plot(hx, [len(c) - 1 for _, c in hf.chunks], ".", color=LINE_COLORS["hf"], ms=5,
                    label="HF assisted: accepted")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlim(0.3, max(len(x), len(hf.chunks) if hf else 0) + 0.7)
    else:
        ax.text(0.5, 0.5, "run a prompt to see the draft length chosen at every step", ha="center",
                va="center", transform=ax.transAxes, color="#64748b")
    ax.set_xlabel("step (one target forward pass)")
    ax.set_ylabel("draft tokens")
    ax.set_title(f"Draft chosen per step — policy {policy}")
    ax.grid(alpha=0.3, axis="y")
    return fig


CSS = """
#error-box {border: 1px solid #dc2626; border-radius: 8px; padding: 2px 12px; background: #fef2f2; color: #7f1d1d}
.tokstream {font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; line-height: 1.55;
  white-space: pre-wrap; word-break: break-word; min-height: 16em; max-height: 30em; overflow-y: auto; padding: 8px 10px;
  border: 1px solid var(--border-color-primary); border-radius: 8px; background: var(--background-fill-primary)}
.tokstream .pr {color: #94a3b8}
.tokstream .tk {color: #0f172a; border-radius: 2px; box-shadow: inset -1px 0 0 rgba(15, 23, 42, .18)}
.tokstream .tk.d {background: #bbf7d0}
.tokstream .tk.t {background: #dbeafe}
.tokstream .empty {color: #94a3b8; font-style: italic}
.legend span {padding: 1px 6px; border-radius: 3px; margin-right: 6px; color: #0f172a}
.method-title {font-weight: 600; margin: 2px 0 4px 2px}
"""
LEGEND = (f"<span class='legend'><span style='background:#bbf7d0'>{DRAFT}</span>"
          f"<span style='background:#dbeafe'>{TARGET}</span></span>")


def tokens_html(run: Run | None, tok, prompt_tail: int = 400) -> str:
    """The prompt (grey) and the generated tokens, each coloured by who produced it."""
    if run is None or tok is None:
        return "<div class='tokstream'><span class='empty'>—</span></div>"
    prompt = tok.decode(run.prompt_ids, skip_special_tokens=True)
    if len(prompt) > prompt_tail:
        prompt = "…" + prompt[-prompt_tail:]
    parts = [f"<span class='pr'>{html.escape(prompt)}</span>"]
    for text, label in highlighted(run, tok):
        cls = "d" if label == DRAFT else "t"
        parts.append(f"<span class='tk {cls}'>{html.escape(text)}</span>")
    return "<div class='tokstream'>" + "".join(parts) + "</div>"
