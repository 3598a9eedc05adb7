"""Prompt lookup: speculation without a draft model, and the planner choosing between two drafters.

Uses the built-in target/draft pair when it has been built (`adaspec-hf pair build`), otherwise two
tiny random Llama models, so it always runs offline in seconds. The prompts repeat themselves, so
prompt lookup (n-grams of each row's own text, no forward) finds drafts.

    python examples/prompt_lookup.py
"""
from __future__ import annotations

import torch

import adaspec_hf
from adaspec_hf.pair import default_pair_dir, load_pair

from quickstart import tiny_pair


def main() -> None:
    if (default_pair_dir() / "report.json").exists():
        target, draft, tok = load_pair(build=False, allow_weak_pair=True)  # a correctness check: any pair will do
        snippet = "    def push(self, item):\n        self.items.append(item)\n"
        texts = [f"class Stack:\n{snippet}\nclass Queue:\n{snippet}", "import os\nimport sys\nimport os\n"]
        tok.padding_side = "left"
        inputs = tok(texts, return_tensors="pt", padding=True)
        print("using the built-in pair")
    else:
        target, draft, tok = tiny_pair()
        row = [5, 9, 14, 21, 5, 9, 14, 21, 5, 9]
        inputs = {"input_ids": torch.tensor([row, [0, 0] + row[:8]]),
                  "attention_mask": torch.tensor([[1] * 10, [0, 0] + [1] * 8])}
        print("built-in pair not built yet (adaspec-hf pair build): using tiny random models")

    adaspec_hf.enable(target)
    plain = target.generate(**inputs, max_new_tokens=32, do_sample=False)
    # 1. no draft model at all: the planner verifies the lookup proposals that pay
    alone = target.generate(**inputs, max_new_tokens=32, do_sample=False, adaptive=True, prompt_lookup=True)
    assert torch.equal(plain, alone), "prompt lookup is lossless"
    st = target.adaspec_stats
    print(f"lookup alone: {st.tokens_per_step:.2f} tokens per target pass ({st.mean_draft_len:.2f} drafted)")
    # 2. HF's own option, here at batch size > 1 (HF's prompt lookup is batch 1 only)
    hf_style = target.generate(**inputs, max_new_tokens=32, do_sample=False, adaptive=True, prompt_lookup_num_tokens=10)
    assert torch.equal(plain, hf_style)
    print(f"prompt_lookup_num_tokens=10 -> policy {target.adaspec_stats.policy}")
    # 3. both drafters: per row and step the planner picks lookup, the draft model, both or nothing
    both = target.generate(**inputs, max_new_tokens=32, do_sample=False, adaptive=True, prompt_lookup=True,
                           assistant_model=draft)
    assert torch.equal(plain, both)
    print(f"lookup + draft model: {target.adaspec_stats.tokens_per_step:.2f} tokens per target pass")


if __name__ == "__main__":
    main()
