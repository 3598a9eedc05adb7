"""Screenshot of the demo after a finished run (for the README).

    python space/screenshot.py docs/space.png                     # the built-in pair, first held-out prompt
    python space/screenshot.py docs/space.png --tiny --tab serving
    python space/screenshot.py OUT.png --max-new-tokens 96 --policy adaptive-tree -- --target ID --draft ID

Needs Debian's chromium (apt-get install -y chromium) and `pip install playwright` (never
`playwright install`). Arguments after ``--`` (and --tiny/--quick) go to app.py. Take it on an idle
machine: the page shows measured speeds.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = ",".join(x for x in (os.environ.get("NO_PROXY"), "127.0.0.1,localhost") if x)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import app  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--no-first-run"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tab", choices=["generate", "serving"], default="generate")
    p.add_argument("--example", type=int, default=0, help="which example prompt (-1: keep the default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--policy", default="adaptive")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--width", type=int, default=1400)
    a = p.parse_args(argv)
    spec, _ = app.parse_args(app_args + (["--tiny"] if a.tiny else []) + (["--quick"] if a.quick else []))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, store = app.launch(spec, host="127.0.0.1", port=port, prevent_thread_lock=True)
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": a.width, "height": 1000})
            page.set_default_timeout(1_800_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#model-status", has_text="✅").wait_for()
            print(page.locator("#model-status").inner_text(), flush=True)
            if a.tab == "generate":
                if a.example >= 0:
                    page.locator("#examples button").nth(a.example).click()
                _set_number(page, "#max-new", a.max_new_tokens)
                _choose(page, "#policy", a.policy)
                page.locator("#run-btn").click()
                page.locator("#summary", has_text="× plain generation").wait_for()
                page.locator("#plot-steps img").first.wait_for()
                print(page.locator("#summary").inner_text(), flush=True)
            else:
                page.get_by_role("tab", name="Serving").click()
                _choose(page, "#s-policy", a.policy if a.policy in app.SERVING_POLICIES else "slo")
                page.locator("#serve-btn").click()
                page.locator("#serve-summary", has_text="SLO attainment").wait_for()
                page.locator("#plot-serving img").first.wait_for()
                print(page.locator("#serve-summary").inner_text(), flush=True)
            time.sleep(1.0)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(a.out)
    return 0


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"{elem_id} input")
    box.fill(value)
    box.press("Enter")


if __name__ == "__main__":
    sys.exit(main())
