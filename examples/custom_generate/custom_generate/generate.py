"""adaspec-hf: adaptive, lossless speculative decoding as a transformers custom_generate method.

    model.generate(**inputs, custom_generate=<this repo or folder>, assistant_model=draft,
                   trust_remote_code=True, max_new_tokens=64)        # optional: draft_policy="static-4"

The draft must share the target's tokenizer. Every HF generation option is honoured with HF's
meaning or refused with a clear error (see adaspec_hf.integrations.hf.GENERATION_OPTIONS). Written by
`adaspec-hf export-generate`; the engine is the installed adaspec-hf package (requirements.txt).
"""
import adaspec_hf.integrations.hf.custom_generate


def generate(model, *args, **kwargs):
    return adaspec_hf.integrations.hf.custom_generate.generate(model, *args, **kwargs)
