"""Quickstart: adaptive speculative decoding through HF's own `generate`, batch size > 1.

Uses the built-in target/draft pair when it has been built (`adaspec-hf pair build`), otherwise two
tiny random Llama models, so it always runs offline in seconds.

    python examples/quickstart.py
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adaspec_hf
from adaspec_hf.pair import default_pair_dir, load_pair


def tiny_pair():
    def build(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
        return LlamaForCausalLM(cfg).eval()
    return build(128, 4, 0), build(32, 1, 1), None


def main() -> None:
    if (default_pair_dir() / "report.json").exists():
        target, draft, tok = load_pair(build=False, allow_weak_pair=True)  # a correctness check: any pair will do
        texts = ["def read_config(path):\n    \"\"\"Read a", "class Stack:\n    def push(self, item):\n"]
        tok.padding_side = "left"
        inputs = tok(texts, return_tensors="pt", padding=True)
        print("using the built-in pair")
    else:
        target, draft, tok = tiny_pair()
        inputs = {"input_ids": torch.tensor([[0, 0, 5, 9, 14], [7, 3, 11, 40, 2]]),
                  "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
        print("built-in pair not built yet (adaspec-hf pair build): using tiny random models")

    adaspec_hf.enable(target)  # explicit opt-in; plain generate() calls are untouched
    plain = target.generate(**inputs, max_new_tokens=32, do_sample=False)
    fast = target.generate(**inputs, max_new_tokens=32, do_sample=False, assistant_model=draft, adaptive=True)
    assert torch.equal(plain, fast), "speculative greedy output must equal plain greedy output"
    stats = target.adaspec_stats
    print(f"identical outputs for a batch of {fast.shape[0]}; {stats.target_forwards} target passes for "
          f"{stats.new_tokens} tokens ({stats.tokens_per_step:.2f} tokens per pass, policy {stats.policy})")
    # the planner's settings as one validated object (a dict or a policy name work too)
    cfg = adaspec_hf.AdaptiveConfig(policy="adaptive-tree", max_depth=6, max_children=2)
    tree = target.generate(**inputs, max_new_tokens=32, do_sample=False, assistant_model=draft, adaptive=True,
                           adaptive_config=cfg)
    assert torch.equal(plain, tree), "token trees are lossless too"
    print(f"adaptive-tree (max_depth=6): {target.adaspec_stats.tokens_per_step:.2f} tokens per pass; "
          f"config recorded: {target.adaspec_stats.config['policy']}")
    # sampling: the default planner grows token trees there (chains when greedy); same distribution as
    # plain sampling, so only the speed differs
    target.generate(**inputs, max_new_tokens=32, do_sample=True, temperature=0.7, assistant_model=draft, adaptive=True)
    print(f"sampled at T=0.7: the default planned with {target.adaspec_stats.policy} "
          f"({target.adaspec_stats.tokens_per_step:.2f} tokens per pass)")
    if tok is not None:
        for row in fast:
            print(repr(tok.decode(row, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
