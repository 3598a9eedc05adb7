"""adaspec-hf demo (Gradio; runs locally and as a Hugging Face Space).

    python space/app.py                        # the built-in pair (built on first use, ~15 min on 2 CPU cores)
    python space/app.py --quick                # the small quick pair (~1-2 min to build)
    python space/app.py --target ID --draft ID # any HF ids/paths sharing a tokenizer (or ADASPEC_TARGET/ADASPEC_DRAFT)
    python space/app.py --pair-dir DIR         # a pair directory with target/ and draft/ (or ADASPEC_PAIR_DIR)
    python space/app.py --tiny                 # two tiny random models, instant (tests, UI work)

Tab "Generate": the same prompt through plain ``generate``, HF assisted generation and
``generate(..., assistant_model=draft, adaptive=True)``, one after the other on the same machine, each
streamed live through an HF streamer. Tokens accepted from the draft and tokens produced by the target
are coloured differently; tokens/s, speed-up and the draft length (tree size) chosen at every step are
shown. Tab "Serving": simulated users with different latency SLOs submit requests at a chosen rate to
``adaspec_hf.Engine``, with and without speculation (attainment and goodput).
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import adaspec_hf  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`, or a Space with src/adaspec_hf copied next to app.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo_* modules next to this file

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from demo_figures import CSS, LEGEND, fig_progress, fig_steps, tokens_html  # noqa: E402,F401
from demo_generate import (  # noqa: E402,F401
    DRAFT, METHODS, POLICIES, TARGET, TITLES, Run, compare, highlighted, stats_md, summary_md,
)
from demo_models import FALLBACK_PROMPTS, Loaded, ModelSpec, Store, char_tokenizer, load_spec, tiny_pair  # noqa: E402,F401
from demo_serving import (  # noqa: E402,F401
    BASELINE, DEFAULT_USERS, SERVE_HEADERS, SERVING_POLICIES, USER_HEADERS, fig_serving, make_workload, serving_api,
    serving_md, serving_table, simulate,
)

logger = logging.getLogger("adaspec_hf.space")


def build_app(store: Store, spec: ModelSpec | None = None) -> gr.Blocks:
    spec = spec or ModelSpec()
    with gr.Blocks(title="adaspec-hf: adaptive speculative decoding") as demo:
        gr.Markdown(
            "# adaspec-hf: adaptive, lossless speculative decoding for Transformers\n"
            "The same prompt through plain `generate`, HF assisted generation and "
            "`model.generate(..., assistant_model=draft, adaptive=True)`, one after the other on this machine, "
            "streamed live. " + LEGEND)
        status = gr.Markdown(store.status, elem_id="model-status")
        with gr.Accordion("Models", open=False, elem_id="models-acc"):
            with gr.Row():
                target_box = gr.Textbox(label="Target (HF id or path)", value=spec.target or "",
                                        placeholder="empty: the built-in pair", elem_id="target-id")
                draft_box = gr.Textbox(label="Draft (HF id or path, same tokenizer)", value=spec.draft or "",
                                       placeholder="empty: the built-in pair", elem_id="draft-id")
            load_btn = gr.Button("Load models", elem_id="load-btn")
        timer = gr.Timer(1.0, active=store.loading)

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=7, max_lines=14, elem_id="prompt",
                                        value=store.loaded.prompts[0] if store.loaded else spec_prompt(spec))
                    examples_ds = gr.Dataset(components=[prompt], samples=[[p] for p in FALLBACK_PROMPTS],
                                             label="Examples (held-out text)", elem_id="examples", samples_per_page=6)
                with gr.Column(scale=2):
                    with gr.Row():
                        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                                elem_id="temperature")
                        max_new = gr.Slider(8, 512, value=96, step=8, label="Max new tokens", elem_id="max-new")
                    with gr.Row():
                        policy = gr.Dropdown(POLICIES, value="adaptive", label="Draft policy", elem_id="policy",
                                             info="adaptive: efficiency model (token trees when sampling, chains "
                                                  "when greedy) · adaptive-chain / adaptive-tree: one shape always · "
                                                  "static-4 · heuristic: HF's +2/−1")
                        slo = gr.Number(value=50, label="SLO: TPOT (ms)", minimum=0, elem_id="slo",
                                        info="time per output token; 0 = none")
                    with_hf = gr.Checkbox(value=True, label="also run HF assisted generation (its defaults)")
                    run_btn = gr.Button("Generate", variant="primary", elem_id="run-btn")
            error_box = gr.Markdown(visible=False, elem_id="error-box")
            summary = gr.Markdown(elem_id="summary")
            outs, stats = {}, {}
            with gr.Row(equal_height=False):
                for m in METHODS:
                    with gr.Column(min_width=280):
                        gr.HTML(f"<div class='method-title'>{TITLES[m]}</div>")
                        outs[m] = gr.HTML(tokens_html(None, None), elem_id=f"out-{m}")
                        stats[m] = gr.Markdown(elem_id=f"stats-{m}")
            with gr.Row():
                plot_progress = gr.Plot(show_label=False, elem_id="plot-progress", format="png")
                plot_steps = gr.Plot(show_label=False, elem_id="plot-steps", format="png")

        with gr.Tab("Serving"):
            _, _, why = serving_api()
            gr.Markdown("Simulated users with different SLOs send requests at a chosen rate (Poisson arrivals) "
                        "to `adaspec_hf.Engine` (continuous batching, per-request SLOs). The same seeded workload "
                        f"runs with the chosen policy and with no speculation (`{BASELINE}`): **SLO attainment** "
                        "(share of requests meeting their TTFT and TPOT objectives) and **goodput** (tokens/s of "
                        "requests that met them).")
            serving_note = gr.Markdown(("⚠️ " + why) if why else "", elem_id="serving-note")
            users = gr.Dataframe(value=DEFAULT_USERS, headers=USER_HEADERS,
                                 datatype=["str", "number", "number", "number"], label="Simulated users",
                                 interactive=True, elem_id="users", type="array")
            with gr.Row():
                rate = gr.Slider(0.1, 20, value=2.0, step=0.1, label="Request rate (requests/s)", elem_id="rate")
                n_req = gr.Slider(2, 64, value=12, step=1, label="Requests", elem_id="n-req")
                s_max_new = gr.Slider(8, 256, value=48, step=8, label="Max new tokens per request", elem_id="s-max-new")
                s_policy = gr.Dropdown(SERVING_POLICIES, value="slo", label="Draft policy", elem_id="s-policy",
                                       info="slo: AdaServe-style SLO-aware selection")
            serve_btn = gr.Button("Run workload", variant="primary", elem_id="serve-btn", interactive=why is None)
            serve_err = gr.Markdown(visible=False, elem_id="serving-error")
            serve_summary = gr.Markdown(elem_id="serve-summary")
            serve_table = gr.Dataframe(headers=SERVE_HEADERS, label="Results", elem_id="serve-table",
                                       interactive=False)
            serve_plot = gr.Plot(show_label=False, elem_id="plot-serving", format="png")
        del serving_note

        # ---- events
        def on_status():
            L = store.loaded
            samples = [[p] for p in (L.prompts if L else FALLBACK_PROMPTS)]
            return store.status, gr.Timer(active=store.loading), gr.Dataset(samples=samples)

        timer.tick(on_status, None, [status, timer, examples_ds], show_progress="hidden")
        demo.load(on_status, None, [status, timer, examples_ds], show_progress="hidden")
        examples_ds.click(lambda x: x[0] if x else "", examples_ds, prompt, show_progress="hidden")

        def on_load(t, d):
            t, d = (t or "").strip(), (d or "").strip()
            new = ModelSpec(target=t or None, draft=d or None, pair_dir=None if (t or d) else spec.pair_dir,
                            quick=spec.quick, tiny=spec.tiny and not (t or d), dtype=spec.dtype, device=spec.device)
            try:
                store.start(new)
            except RuntimeError as e:
                gr.Warning(str(e))
                return store.status, gr.Timer(active=store.loading)
            store.wait(30)  # short loads finish here; long ones go on (the timer shows progress)
            if store.error and not store.loading:
                gr.Warning(store.error)
            return store.status, gr.Timer(active=store.loading)

        load_btn.click(on_load, [target_box, draft_box], [status, timer], concurrency_limit=1)

        gen_outputs = [error_box, summary, *outs.values(), *stats.values(), plot_progress, plot_steps]

        def on_run(p, temp, mx, pol, slo_ms, hf_on):
            slo_v = float(slo_ms) if slo_ms else None
            plotted = -1  # figures are redrawn only when a method finishes (drawing costs CPU time)
            try:
                for st in compare(store, p, temp, mx, pol, slo_v, with_hf=bool(hf_on)):
                    runs, tok = st["runs"], st["tokenizer"]
                    if st["error"] and st["final"]:
                        gr.Warning(st["error"].split("  \n")[0])
                    err = (gr.Markdown(value="**Error:** " + st["error"], visible=True) if st["error"]
                           else gr.Markdown(visible=False))
                    running = not st["final"]
                    vals = [err, st["status"]]
                    vals += [tokens_html(runs[m], tok) for m in METHODS]
                    vals += [stats_md(runs[m], runs["plain"], slo_v, running and (m != "hf" or hf_on)) for m in METHODS]
                    n_done = sum(r is not None and r.done for r in runs.values())
                    if n_done > 0 and (n_done != plotted or st["final"]):
                        plotted = n_done
                        vals += [fig_progress({m: r for m, r in runs.items() if r is not None}, slo_v),
                                 fig_steps(runs["ours"], runs["hf"], pol)]
                    else:
                        vals += [gr.skip(), gr.skip()]
                    yield vals
            except Exception as e:  # noqa: BLE001 - shown in the page, never a crash
                logger.warning("generation failed:\n%s", traceback.format_exc())
                msg = f"{type(e).__name__}: {e}"
                gr.Warning(msg)
                yield [gr.Markdown("**Error:** " + html.escape(msg), visible=True)] + [gr.skip()] * (len(gen_outputs) - 1)

        gen_inputs = [prompt, temperature, max_new, policy, slo, with_hf]
        run_btn.click(on_run, gen_inputs, gen_outputs, concurrency_limit=1, concurrency_id="models",
                      show_progress="minimal")
        prompt.submit(on_run, gen_inputs, gen_outputs, concurrency_limit=1, concurrency_id="models",
                      show_progress="minimal")

        def on_serve(u, r, n, mx, pol):
            try:
                if store.loading or store.loaded is None:
                    raise RuntimeError(store.error or "models are not loaded yet: " + store.status)
                rows = u.values.tolist() if hasattr(u, "values") else u
                res = simulate(store, rows, float(r), int(n), int(mx), pol)
                return gr.Markdown(visible=False), serving_md(res), serving_table(res), fig_serving(res)
            except Exception as e:  # noqa: BLE001 - shown in the page
                logger.warning("serving run failed:\n%s", traceback.format_exc())
                msg = f"{type(e).__name__}: {e}"
                gr.Warning(msg)
                return gr.Markdown("**Error:** " + html.escape(msg), visible=True), "", gr.skip(), gr.skip()

        serve_btn.click(on_serve, [users, rate, n_req, s_max_new, s_policy],
                        [serve_err, serve_summary, serve_table, serve_plot], concurrency_limit=1,
                        concurrency_id="models")
    return demo


def spec_prompt(spec: ModelSpec) -> str:
    return "def add(a, b):\n    return" if spec.tiny else FALLBACK_PROMPTS[0]


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> tuple[ModelSpec, argparse.Namespace]:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=env.get("ADASPEC_TARGET"), help="HF id/path of the target (env ADASPEC_TARGET)")
    p.add_argument("--draft", default=env.get("ADASPEC_DRAFT"), help="HF id/path of the draft (env ADASPEC_DRAFT)")
    p.add_argument("--pair-dir", default=env.get("ADASPEC_PAIR_DIR"), help="a pair dir with target/ and draft/ (env ADASPEC_PAIR_DIR)")
    p.add_argument("--quick", action="store_true", default=env.get("ADASPEC_QUICK", "") not in ("", "0"),
                   help="the built-in quick pair (env ADASPEC_QUICK=1)")
    p.add_argument("--tiny", action="store_true", default=env.get("ADASPEC_TINY", "") not in ("", "0"),
                   help="tiny random models (env ADASPEC_TINY=1)")
    p.add_argument("--dtype", default=env.get("ADASPEC_DTYPE", "float32"), choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=env.get("ADASPEC_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true")
    a = p.parse_args(argv)
    spec = ModelSpec(target=a.target or None, draft=a.draft or None, pair_dir=a.pair_dir or None,
                     quick=a.quick, tiny=a.tiny, dtype=a.dtype, device=a.device)
    return spec, a


def launch(spec: ModelSpec, *, host="127.0.0.1", port=None, share=False, prevent_thread_lock=False,
           store: Store | None = None):
    """Start loading ``spec`` in the background (unless ``store`` already holds models) and serve the
    page; returns (demo, store)."""
    if store is None:
        store = Store()
        store.start(spec)
    demo = build_app(store, spec)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                theme=gr.themes.Soft(), css=CSS, show_error=True)
    return demo, store


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec, a = parse_args(argv)
    if os.environ.get("SPACE_ID"):  # on a Hugging Face Space: listen on all interfaces
        a.host = "0.0.0.0"
    launch(spec, host=a.host, port=a.port, share=a.share)


if __name__ == "__main__":
    main()
