"""Engine overhead on random models (CPU, greedy): how much the speculative machinery costs.

* nothing drafted (``static-0``) vs plain ``generate``: the engine's per-step overhead;
* fixed k=4 (``static-4``) vs HF assisted generation with 4 constant assistant tokens, batch 1:
  same drafts, same acceptance, so the difference is overhead;
* tokens/s at batch 1/4/8 with fixed k.

Random weights mean the draft rarely agrees with the target: this measures cost, not speed-up.

    python benchmarks/engine_overhead.py            # writes benchmarks/results/engine_overhead.{json,md,png}
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaspec_hf.bench.harness import run_benchmark, write_results


def build(hidden: int, layers: int, heads: int, seed: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, tie_word_embeddings=tie, pad_token_id=0,
                      eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = None
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    target = build(512, 8, 8, 0, tie=False)  # ~58M parameters
    draft = build(64, 2, 4, 1, tie=True)  # ~2.2M parameters
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (args.prompt_len - (i % 5) * 4,), generator=g).tolist() for i in range(8)]
    common = dict(max_new_tokens=args.max_new_tokens, repeats=args.repeats, pad_token_id=0, eos_token_id=None)
    res1 = run_benchmark("engine_overhead", target, draft, prompts,
                         ["vanilla", "static-0", "hf-assisted-k4", "static-4"], batch_sizes=[1], n_batches=2, **common)
    res2 = run_benchmark("engine_overhead_batched", target, draft, prompts,
                         ["vanilla", "static-0", "static-4"], batch_sizes=[1, 4, 8], n_batches=1, **common)
    # ratios within one block (same prompts, same run), never across blocks
    by = {(r.method, r.batch): r for r in res1.rows}
    summary = {
        "overhead_nothing_drafted_vs_generate": by[("vanilla", 1)].tokens_per_s / by[("static-0", 1)].tokens_per_s,
        "static4_vs_hf_assisted_k4_speed": by[("static-4", 1)].tokens_per_s / by[("hf-assisted-k4", 1)].tokens_per_s,
    }
    res1.rows += res2.rows
    res1.config["note"] = ("first block: batch 1 over 2 prompts (overhead and HF comparison); "
                           "second block: one batch per size (1, 4, 8)")
    res1.config["summary"] = summary
    print(res1.table())
    print(f"\nnothing-drafted time ratio vs generate: {summary['overhead_nothing_drafted_vs_generate']:.3f}x "
          f"(target <= 1.15x); static-4 speed vs HF assisted k=4: {summary['static4_vs_hf_assisted_k4_speed']:.2f}x")
    for kind, path in write_results(res1, args.out).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
