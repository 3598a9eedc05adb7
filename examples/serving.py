"""The serving engine stepped in the main thread (``Engine.run``) while a client thread submits.

On a CPU this is the faster way to run the engine: PyTorch's OpenMP runtime throttles forwards run by
a second thread once the main thread has loaded a model (README, "Serving engine"). Uses the
built-in target/draft pair when it has been built (`adaspec-hf pair build`), otherwise two tiny
random Llama models, so it always runs offline in seconds. Greedy outputs are checked against the
target's own ``generate``.

    python examples/serving.py
"""
from __future__ import annotations

import threading

import torch

from adaspec_hf import SLO, Engine
from adaspec_hf.pair import default_pair_dir, load_pair

from quickstart import tiny_pair


def main() -> None:
    if (default_pair_dir() / "report.json").exists():
        target, draft, tok = load_pair(build=False, allow_weak_pair=True)  # a correctness check: any pair will do
        prompts = [tok("def read_config(path):\n")["input_ids"], tok("class Stack:\n    def push(self, item):\n")["input_ids"],
                   tok("import os\nimport sys\n")["input_ids"]]
        print("using the built-in pair")
    else:
        target, draft, tok = tiny_pair()
        prompts = [[5, 9, 14], [7, 3, 11, 40, 2], [8, 8, 1]]
        print("built-in pair not built yet (adaspec-hf pair build): using tiny random models")

    engine = Engine(target, draft, tok, max_rows=4, seed=0, start=False)
    results = {}

    def client() -> None:  # a web server's request handlers would live on threads like this one
        try:
            handles = [engine.submit(p, max_new_tokens=24, slo=SLO(tpot_ms=200)) for p in prompts]
            for i, h in enumerate(handles):
                results[i] = h.result()
        finally:
            engine.close()

    threading.Thread(target=client, name="client").start()
    engine.run()  # steps here until the client closes the engine

    pad = tok.pad_token_id if tok is not None else 0
    for i, p in enumerate(prompts):
        x = torch.tensor([p])
        plain = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                                pad_token_id=pad)[0, len(p):].tolist()
        r = results[i]
        assert r.token_ids == plain, "greedy output equals the target's own"
        tpot = "-" if r.tpot is None else f"{1e3 * r.tpot:.1f} ms"
        print(f"request {i}: {len(r.token_ids)} tokens, TPOT {tpot}, SLO met: {r.slo_met}")
    print(f"{engine.summary()['target_forwards']} target passes; every output equals target.generate")


if __name__ == "__main__":
    main()
