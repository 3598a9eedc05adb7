"""adaptive=True inside the rest of the HF stack: custom_generate, pipelines, streamers, accelerate
offload, bf16 on CPU, torch.compile. Each compared with HF's own greedy output."""
from __future__ import annotations

import copy
import string
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TextIteratorStreamer, pipeline

import adaspec_hf
from adaspec_hf import cli
from adaspec_hf.integrations.hf.custom_generate import FOLDER, GENERATE_PY, REQUIREMENTS_TXT, export_generate

from conftest import VOCAB, pair, ragged_batch, char_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_generate"
MAX_NEW = 10


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(padding_side="left")


@pytest.fixture(scope="module")
def enabled():
    target, draft = pair("llama")
    return adaspec_hf.enable(copy.deepcopy(target)), draft


# ------------------------------------------------------------------------------------ custom_generate
def test_example_folder_is_what_the_exporter_writes():
    assert (EXAMPLE / FOLDER / "generate.py").read_text() == GENERATE_PY
    assert (EXAMPLE / FOLDER / "requirements.txt").read_text() == REQUIREMENTS_TXT
    assert (EXAMPLE / "README.md").is_file()


def test_custom_generate_runs_the_engine_on_a_model_never_enabled(tmp_path):
    target, draft = pair("llama")
    target.save_pretrained(tmp_path / "model")
    assert cli.main(["export-generate", str(tmp_path / "model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sdpa").eval()
    assert "generate" not in vars(model) and not hasattr(model, "_adaspec_original_generate")
    ids, mask = ragged_batch(3, 7, 21)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         custom_generate=str(tmp_path / "model"), assistant_model=draft, trust_remote_code=True,
                         draft_policy="static-3")
    assert torch.equal(out, ref)
    assert model.adaspec_stats.policy == "static-3" and model.adaspec_stats.steps[0].rows == 3  # our engine
    assert "generate" not in vars(model)  # nothing patched
    # the Hub-ready example folder works for any model, options and errors included
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         custom_generate=str(EXAMPLE), assistant_model=draft, trust_remote_code=True)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(input_ids=ids, max_new_tokens=4, custom_generate=str(EXAMPLE), assistant_model=draft,
                       trust_remote_code=True, cache_implementation="static")
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(input_ids=ids, max_new_tokens=4, custom_generate=str(EXAMPLE), assistant_model=draft)


def test_export_refuses_to_overwrite_other_code(tmp_path):
    folder = export_generate(tmp_path)
    (folder / "generate.py").write_text("def generate(model, **kw):\n    return None\n")
    with pytest.raises(FileExistsError, match="force"):
        export_generate(tmp_path)
    assert export_generate(tmp_path, force=True) == folder
    assert (folder / "generate.py").read_text() == GENERATE_PY


# ------------------------------------------------------------------------------ pipelines, streamers
def test_pipeline_batched(enabled, tokenizer):
    target, draft = enabled
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, batch_size=2)
    prompts = ["def parse(path):", "ab", "The capital of", "x = 1"]
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, return_full_text=False)
    ref = pipe(prompts, **kw)
    target.adaspec_stats = None
    out = pipe(prompts, **kw, assistant_model=draft, adaptive=True, draft_policy="static-3")
    assert out == ref
    assert target.adaspec_stats is not None and target.adaspec_stats.steps[0].rows == 2  # batches of 2 rows
    assert [o[0]["generated_text"] for o in out] == [r[0]["generated_text"] for r in ref]


def test_text_iterator_streamer_in_a_thread(enabled, tokenizer):
    target, draft = enabled
    inputs = tokenizer(["def parse(path):"], return_tensors="pt")
    ref = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=target.generate, kwargs=dict(
        **inputs, max_new_tokens=MAX_NEW, do_sample=False, streamer=streamer, assistant_model=draft,
        adaptive=True, draft_policy="static-3"))
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=60)
    assert text == tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------- offload, bf16, compile
def test_accelerate_offload_to_disk(tmp_path):
    target, draft = pair("llama")
    target.save_pretrained(tmp_path / "t")
    draft.save_pretrained(tmp_path / "d")
    # the target partly on CPU, partly on disk; the draft entirely on disk
    t_off = AutoModelForCausalLM.from_pretrained(
        tmp_path / "t", device_map="auto", max_memory={"cpu": 60_000}, offload_folder=str(tmp_path / "ot"),
        attn_implementation="sdpa").eval()
    d_off = AutoModelForCausalLM.from_pretrained(
        tmp_path / "d", device_map={"": "disk"}, offload_folder=str(tmp_path / "od"),
        attn_implementation="sdpa").eval()
    assert "disk" in set(t_off.hf_device_map.values()) and set(d_off.hf_device_map.values()) == {"disk"}
    adaspec_hf.enable(t_off)
    ids, mask = ragged_batch(2, 6, 5)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    out = t_off.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                         assistant_model=d_off, adaptive=True, draft_policy="static-3")
    assert torch.equal(out, ref)


def test_bf16_on_cpu():
    target, draft = pair("llama")
    target = adaspec_hf.enable(copy.deepcopy(target).to(torch.bfloat16))
    draft = copy.deepcopy(draft).to(torch.bfloat16)
    ids, mask = ragged_batch(2, 6, 7)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                          assistant_model=draft, adaptive=True, draft_policy="static-3")
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_torch_compiled_model_is_accepted():
    target, draft = pair("llama")
    compiled = torch.compile(copy.deepcopy(target), backend="eager")  # no C++ toolchain needed
    adaspec_hf.enable(compiled)
    ids = torch.tensor([[5, 9, 14, 3]])
    ref = target.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    out = compiled.generate(input_ids=ids, max_new_tokens=6, do_sample=False, assistant_model=draft,
                            adaptive=True, draft_policy="static-2")
    assert torch.equal(out, ref)
