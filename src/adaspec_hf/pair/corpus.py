"""Local text corpus for the built-in pair: file collection, by-file split, BPE tokenizer, token blocks.

Everything here is offline and deterministic for a given seed. The default corpus is the Python
standard library sources of the running interpreter (``*.py``, test folders excluded); any local
text files or folders can be used instead.
"""
from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2

_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}
_TEXT_SUFFIXES = {".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cpp", ".hpp", ".rs", ".go", ".js",
                  ".ts", ".java", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".html",
                  ".css", ".tex", ".csv", ".xml", ".lua", ".rb", ".pl", ".jl", ".r", ".scala", ".kt"}
MAX_FILE_BYTES = 256 * 1024  # skips a few generated giants (e.g. pydoc_data/topics.py)


@dataclass
class Corpus:
    """Texts split by file into train and held-out parts."""

    source: str
    train_names: list[str]
    train_texts: list[str]
    heldout_names: list[str]
    heldout_texts: list[str]
    info: dict = field(default_factory=dict)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library ``*.py`` sources, without test folders and site-packages."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & (_TEST_DIRS | _SKIP_DIRS) or any(p.startswith("config-") for p in parts):
            continue
        if path.name.startswith("_sysconfigdata") or not path.is_file():
            continue
        out.append(path)
    return sorted(out)


def text_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by ``paths``: files as given, folders searched recursively for text files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if any(x.startswith(".") or x in _SKIP_DIRS for x in rel[:-1]):
                    continue
                if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES:
                    out.append(f)
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")
    return sorted(set(out))


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:4096]:
        return None  # binary
    text = data.decode("utf-8", errors="replace")
    if "gencodec.py" in text[:1000]:
        return None  # generated codec tables (stdlib encodings/cp*.py): data, not code
    return text if text.strip() else None


def load_corpus(corpus=None, *, seed: int = 0, heldout_frac: float = 0.05, min_heldout: int = 4,
                max_chars: int | None = None, progress: bool = True) -> Corpus:
    """Read and split a corpus BY FILE (seeded). ``corpus=None`` -> the stdlib sources.

    ``max_chars`` keeps a seeded subset of files (for quick builds) before splitting.
    """
    from tqdm.auto import tqdm

    if corpus is None:
        files, source, root = stdlib_files(), "python-stdlib", stdlib_root()
    else:
        files, source, root = text_files(corpus), "local", None
    if not files:
        raise ValueError(f"no text files found in corpus {corpus!r}")

    def name(f: Path) -> str:
        if root is not None:
            return f.relative_to(root).as_posix()
        return f.as_posix()

    rng = random.Random(seed)
    order = sorted(files, key=name)
    rng.shuffle(order)  # deterministic for a given seed and file list
    texts, names, total = [], [], 0
    for f in tqdm(order, desc="read corpus", unit="file", disable=not progress):
        t = _read(f)
        if t is None:
            continue
        texts.append(t)
        names.append(name(f))
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    if len(texts) < 2:
        raise ValueError("corpus needs at least 2 readable text files (split is by file)")
    n_held = min(len(texts) - 1, max(min_heldout, round(heldout_frac * len(texts))))
    # the first n_held of the shuffled order are held out
    c = Corpus(source=source, heldout_names=names[:n_held], heldout_texts=texts[:n_held],
               train_names=names[n_held:], train_texts=texts[n_held:])
    c.info = {
        "source": source,
        "root": str(root) if root is not None else [str(Path(p)) for p in
                                                     ([corpus] if isinstance(corpus, (str, Path)) else corpus)],
        "files_train": len(c.train_texts),
        "files_heldout": len(c.heldout_texts),
        "chars_train": sum(map(len, c.train_texts)),
        "chars_heldout": sum(map(len, c.heldout_texts)),
        "split": f"by file, seeded shuffle (seed={seed}), held-out fraction {heldout_frac}",
        "heldout_files": list(c.heldout_names),
    }
    return c


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, progress: bool = True,
                    model_max_length: int = 2048):
    """Byte-level BPE trained with `tokenizers`, wrapped as a HF ``PreTrainedTokenizerFast``.

    Special tokens: pad=0, bos=1, eos=2. Nothing is added automatically on encode (no BOS), so
    ``decode(encode(text)) == text`` for any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)


# ------------------------------------------------------------------------------------- token blocks
def tokenize_blocks(texts: Sequence[str], tokenizer, block_size: int, *, progress: bool = True,
                    desc: str = "tokenize"):
    """`datasets.Dataset` with one column ``input_ids`` of fixed-length blocks.

    Each text is tokenized (batched ``.map``), followed by EOS, concatenated, and cut into
    ``block_size`` blocks (the remainder is dropped).
    """
    import datasets

    eos = tokenizer.eos_token_id
    ds = datasets.Dataset.from_dict({"text": list(texts)})

    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batched, parallel, no length warnings

    def tok(batch):
        encs = backend.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [e.ids + [eos] for e in encs]}

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block_size * block_size
        return {"input_ids": [flat[i:i + block_size] for i in range(0, n, block_size)]}

    with _progress_bars(progress):
        ds = ds.map(tok, batched=True, batch_size=64, remove_columns=["text"], desc=f"{desc}: encode")
        ds = ds.map(group, batched=True, batch_size=256, desc=f"{desc}: blocks of {block_size}")
    return ds


class _progress_bars:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        import datasets
        self.was = datasets.is_progress_bar_enabled()
        (datasets.enable_progress_bars if self.on else datasets.disable_progress_bars)()

    def __exit__(self, *exc):
        import datasets
        (datasets.enable_progress_bars if self.was else datasets.disable_progress_bars)()


# ------------------------------------------------------------------------------------------ prompts
def make_prompts(names: Sequence[str], texts: Sequence[str], tokenizer, n: int = 64, *, seed: int = 0,
                 prompt_tokens: tuple[int, int] = (32, 96), reference_tokens: int = 64) -> list[dict]:
    """Prompts cut from held-out files: the first 32-96 tokens of a chunk that starts at a line
    (half of them at a ``def``/``class``/docstring line), and the next ``reference_tokens`` as reference.

    The cut is at a token boundary where ``encode(prompt)`` gives back exactly the same tokens.
    """
    rng = random.Random(seed + 1)
    starts = []  # per file: {"def": [offsets], "line": [offsets]}
    for text in texts:
        d = {"def": [], "line": []}
        off = 0
        for line in text.splitlines(keepends=True):
            s = line.lstrip()
            if s and len(text) - off > 400:
                kind = "def" if s.startswith(("def ", "class ", "async def ", '"""', "'''")) else "line"
                d[kind].append(off)
            off += len(line)
        starts.append(d)
    files = [i for i, d in enumerate(starts) if d["def"] or d["line"]]
    if not files:
        return []
    prompts, seen = [], set()
    tries = 0
    while len(prompts) < n and tries < 20 * n:
        tries += 1
        fi = files[(tries - 1) % len(files)]  # round robin over files, random start inside
        kind = "def" if len(prompts) % 2 == 0 else "line"
        if not starts[fi][kind]:
            kind = "line" if kind == "def" else "def"
        off = starts[fi][kind][rng.randrange(len(starts[fi][kind]))]
        if (fi, off) in seen:
            continue
        seen.add((fi, off))
        chunk = texts[fi][off:off + 4000]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        lo, hi = prompt_tokens
        want = rng.randint(lo, hi)
        if len(ids) < want + reference_tokens:
            continue
        cut = None
        for k in range(want, min(hi, len(ids) - reference_tokens) + 1):
            p = tokenizer.decode(ids[:k])
            if tokenizer(p, add_special_tokens=False)["input_ids"] == ids[:k]:
                cut = k
                break
        if cut is None:
            continue
        prompts.append({
            "prompt": tokenizer.decode(ids[:cut]),
            "reference": tokenizer.decode(ids[cut:cut + reference_tokens]),
            "source": names[fi],
            "kind": kind,
            "prompt_tokens": cut,
        })
    return prompts
