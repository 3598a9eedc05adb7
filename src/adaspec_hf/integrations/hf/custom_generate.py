"""adaspec-hf as a transformers ``custom_generate`` decoding method (no ``enable``, no patching).

transformers 5.x runs a folder's (or Hub repo's) ``custom_generate/generate.py`` in place of its own
decoding loop when asked to::

    model.generate(**inputs, custom_generate=DIR, assistant_model=draft, trust_remote_code=True)

``export_generate(DIR)`` (``adaspec-hf export-generate DIR``) writes that file into a folder — a
saved model folder, or a repo of its own (``examples/custom_generate/`` is one, Hub-ready). The file
only imports this module, so the engine, its options table and its errors are the installed
adaspec-hf's; ``requirements.txt`` makes transformers check that adaspec-hf is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from adaspec_hf.integrations.hf.generate import adaptive_generate

FOLDER = "custom_generate"
"""Where transformers looks for the decoding method inside a model folder or repo."""

GENERATE_PY = '''"""adaspec-hf: adaptive, lossless speculative decoding as a transformers custom_generate method.

    model.generate(**inputs, custom_generate=<this repo or folder>, assistant_model=draft,
                   trust_remote_code=True, max_new_tokens=64)        # optional: draft_policy="static-4"

The draft must share the target's tokenizer. Every HF generation option is honoured with HF's
meaning or refused with a clear error (see adaspec_hf.integrations.hf.GENERATION_OPTIONS). Written by
`adaspec-hf export-generate`; the engine is the installed adaspec-hf package (requirements.txt).
"""
import adaspec_hf.integrations.hf.custom_generate


def generate(model, *args, **kwargs):
    return adaspec_hf.integrations.hf.custom_generate.generate(model, *args, **kwargs)
'''

REQUIREMENTS_TXT = "adaspec-hf>=0.1\n"


def generate(model: PreTrainedModel, *args: Any, **kwargs: Any) -> torch.LongTensor | Any:
    """The decoding method transformers calls as ``generate(model=..., **generate_arguments)``.

    Runs adaspec's engine on ``model`` (which need not be :func:`~adaspec_hf.enable`-d) with the
    call's ``assistant_model`` as the draft; ``adaptive=True`` may be passed and is implied.
    """
    adaptive = kwargs.pop("adaptive", True)
    if adaptive is False:
        raise ValueError("custom_generate runs adaspec's engine; for HF's own decoding call generate without "
                         "custom_generate=")
    return adaptive_generate(model, *args, **kwargs)


def export_generate(directory: str | Path, force: bool = False) -> Path:
    """Write ``custom_generate/generate.py`` and ``requirements.txt`` into ``directory``; return the folder.

    Existing files with other contents are only replaced with ``force=True`` (a model folder may
    already carry another decoding method).
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"directory={str(root)!r} is a file, not a folder")
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("generate.py", GENERATE_PY), ("requirements.txt", REQUIREMENTS_TXT)):
        path = folder / name
        if path.exists() and path.read_text(encoding="utf-8") != text and not force:
            raise FileExistsError(f"{path} exists with other contents; pass force=True (--force) to replace it")
        path.write_text(text, encoding="utf-8")
    return folder
