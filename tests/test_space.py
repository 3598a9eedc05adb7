"""The Gradio demo in space/: its generation logic on a tiny pair, its errors, and the page itself
driven through Debian's Chromium with Playwright (skipped only where Chromium or Playwright is absent).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
for _var in ("NO_PROXY", "no_proxy"):  # gradio calls its own URL through httpx at start-up
    os.environ[_var] = ",".join(x for x in (os.environ.get(_var), "127.0.0.1,localhost") if x)

APP_PATH = Path(__file__).resolve().parent.parent / "space" / "app.py"
CHROMIUM = "/usr/bin/chromium"
MAX_NEW = 16


def _load_app():
    spec = importlib.util.spec_from_file_location("adaspec_space_app", APP_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


app = _load_app()


@pytest.fixture(scope="module")
def store():
    s = app.Store()
    s.start(app.ModelSpec(tiny=True))
    assert s.wait(120), "tiny models did not load in time"
    assert s.loaded is not None, s.status
    return s


def _run(store, prompt, **kw):
    args = dict(temperature=0.0, max_new_tokens=MAX_NEW, policy="static-4", slo_ms=50.0)
    args.update(kw)
    states = list(app.compare(store, prompt, args["temperature"], args["max_new_tokens"], args["policy"],
                              args["slo_ms"], with_hf=args.get("with_hf", True)))
    return states[-1]


def test_compare_streams_and_labels(store):
    st = _run(store, "def add(a, b):\n    return")
    assert st["final"] and st["error"] is None
    runs = st["runs"]
    plain, hf, ours = runs["plain"], runs["hf"], runs["ours"]
    for r in (plain, hf, ours):
        assert r.done and r.n_tokens == MAX_NEW
    assert hf.ids == plain.ids == ours.ids  # greedy: lossless
    assert all(len(c) == 1 for _, c in plain.chunks)
    assert len(ours.steps) == len(ours.chunks) - 1  # the first token comes from the prefill
    labels = ours.labels()
    assert len(labels) == MAX_NEW and app.TARGET in labels
    # every step: the accepted draft tokens, then one token of the target
    assert labels[0] == app.TARGET
    assert labels.count(app.DRAFT) == sum(min(s.accepted[0], len(c)) for s, (_, c) in zip(ours.steps, ours.chunks[1:]))
    spans = app.highlighted(ours, store.loaded.tokenizer)
    text = store.loaded.tokenizer.decode(ours.ids, skip_special_tokens=True)
    assert "".join(t for t, _ in spans) == text
    assert "identical to plain" in st["status"]
    assert "tokens/s" in app.stats_md(ours, plain, 50.0, False)
    app.fig_progress(runs, 50.0)
    app.fig_steps(ours, hf, "static-4")


def test_compare_sampling_and_tree(store):
    st = _run(store, "The quick brown fox", temperature=0.8, policy="adaptive-tree", with_hf=False)
    assert st["error"] is None and st["runs"]["hf"] is None
    assert st["runs"]["ours"].n_tokens == MAX_NEW and "sampling" in st["status"]


def test_incremental_decode_byte_level():
    """Pieces decoded token by token join up to the full text, also across multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["def f(x):\n    return x + 1\n", "print('hello world')\n"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "def f(x):\n    return 'héllo → wörld ✓'  # ünïcode 🙂\n"
    ids = tok(text)["input_ids"]
    prompt, gen = ids[:4], ids[4:]
    run = app.Run("hf", prompt)
    for i in range(0, len(gen), 3):  # streamed in chunks, rendered after each
        run.chunks.append((0.0, gen[i:i + 3]))
        app.highlighted(run, tok)
    run.elapsed = 1.0
    spans = app.highlighted(run, tok)
    assert "".join(s for s, _ in spans) == tok.decode(ids)[len(tok.decode(prompt)):]
    assert {lab for _, lab in spans} == {app.DRAFT, app.TARGET}
    assert "<span class='tk d'>" in app.tokens_html(run, tok)


def test_errors_are_messages(store, tmp_path):
    assert "Enter a prompt" in _run(store, "   ")["error"]
    assert "Unknown draft policy" in _run(store, "x", policy="nope")["error"]
    # a bad model id, and a draft whose vocabulary differs: errors in the status, old pair kept
    s = app.Store()
    s.start(app.ModelSpec(target="/no/such/target", draft="/no/such/draft"))
    s.wait(60)
    assert s.loaded is None and s.error and s.status.startswith("❌")
    target, _, tok = app.tiny_pair()
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    small.save_pretrained(tmp_path / "draft")
    s.start(app.ModelSpec(target=str(tmp_path / "target"), draft=str(tmp_path / "draft")))
    s.wait(60)
    assert s.loaded is None and "vocabulary mismatch" in s.error
    # the workload of the serving tab
    reqs = app.make_workload(app.DEFAULT_USERS, 5.0, 10, [[3, 4, 5]])
    assert len(reqs) == 10 and all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:]))
    with pytest.raises(ValueError):
        app.make_workload([], 1.0, 3, [[3]])


# ------------------------------------------------------------------------------------------ browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(store):
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    port = _free_port()
    demo, _ = app.launch(store.loaded.spec, host="127.0.0.1", port=port, prevent_thread_lock=True, store=store)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser_page(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)
        page.goto(page_url)
        page.locator("#run-btn").wait_for()
        try:
            yield page
        finally:
            browser.close()


@pytest.mark.browser
def test_page_runs_a_prompt(browser_page, tmp_path):
    page = browser_page
    page.get_by_text("tiny random models").first.wait_for()  # model status
    page.locator("#prompt textarea").fill("def add(a, b):\n    return")
    page.locator("#max-new input[type=number]").fill("32")
    page.locator("#max-new input[type=number]").press("Enter")
    page.locator("#policy input").fill("static-4")
    page.locator("#policy input").press("Enter")
    page.locator("#run-btn").click()
    t0 = time.time()
    page.locator("#summary", has_text="identical to plain").wait_for()
    for m in ("plain", "hf", "ours"):
        assert page.locator(f"#stats-{m}").inner_text().count("tokens/s") >= 1
        assert page.locator(f"#out-{m}").inner_text().strip(), m
    assert "32 tokens in" in page.locator("#stats-ours").inner_text()
    for plot in ("#plot-progress", "#plot-steps"):
        page.locator(f"{plot} img").first.wait_for()
    assert page.locator("#out-ours .tk.d").count() >= 1  # tokens accepted from the draft, coloured
    assert page.locator("#out-plain .tk.d").count() == 0 and page.locator("#out-plain .tk.t").count() >= 1
    page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
    assert time.time() - t0 < 60


@pytest.mark.browser
def test_page_shows_errors(browser_page):
    page = browser_page
    page.locator("#prompt textarea").fill("")
    page.locator("#run-btn").click()
    page.locator("#error-box", has_text="Enter a prompt").wait_for()
    page.get_by_text("Models", exact=True).click()
    page.locator("#target-id textarea, #target-id input").first.fill("/no/such/target")
    page.locator("#draft-id textarea, #draft-id input").first.fill("/no/such/draft")
    page.locator("#load-btn").click()
    page.locator("#model-status", has_text="could not load").wait_for()
    assert "Still using tiny random models" in page.locator("#model-status").inner_text()
    page.get_by_role("tab", name="Serving").click()
    page.locator("#users").wait_for()
    Engine, _, why = app.serving_api()
    if why:
        assert "not available" in page.locator("#serving-note").inner_text()
        return
    page.locator("#n-req input[type=number]").fill("3")
    page.locator("#n-req input[type=number]").press("Enter")
    page.locator("#s-max-new input[type=number]").fill("8")
    page.locator("#s-max-new input[type=number]").press("Enter")
    page.locator("#serve-btn").click()
    page.locator("#serve-summary", has_text="SLO attainment").wait_for()
    page.locator("#plot-serving img").first.wait_for()
    assert "static-0" in page.locator("#serve-table").inner_text()


def test_serving_simulation(store):
    Engine, _, why = app.serving_api()
    if why:
        pytest.skip(why)
    res = app.simulate(store, app.DEFAULT_USERS, rate=20.0, n_requests=4, max_new_tokens=8, policy="slo")
    assert list(res) == ["slo", app.BASELINE]
    for reqs, total in res.values():
        assert total > 0 and all(r.error is None and r.tokens == 8 for r in reqs)
    rows = app.serving_table(res)
    assert rows[-1][0] == app.BASELINE and rows[-1][1] == "all users" and rows[-1][2] == 4
    assert "SLO attainment" in app.serving_md(res)
    app.fig_serving(res)
