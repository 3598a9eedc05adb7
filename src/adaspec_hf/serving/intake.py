"""From ``Engine.submit`` arguments to a :class:`~adaspec_hf.serving.requests.Request`: every
argument is checked here, so a bad one raises in the caller's thread and touches nothing else.
Sampling settings build the logits processors HF ``generate`` would build; EOS, ``min_new_tokens``
and stop strings build the :class:`~adaspec_hf.core.CommitRule` ``generate`` uses."""
from __future__ import annotations

import math
import numbers
import time
from collections import OrderedDict
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel

from adaspec_hf.compat import logits_processors, max_positions, prepare_generation_config
from adaspec_hf.core import CommitRule, stop_string_criteria
from adaspec_hf.core.processing import Processing
from adaspec_hf.serving.handle import RequestHandle
from adaspec_hf.serving.requests import Request
from adaspec_hf.slo import SLO

PROCESSOR_CACHE_SIZE = 64  # distinct stateless sampling settings whose processors are kept for reuse
RULE_CACHE_SIZE = 64  # distinct (EOS, min_new_tokens, stop strings) rules kept: a stop-string
#                       criterion indexes the whole vocabulary once, so requests share it
MAX_SEED = 1 << 63  # submit(seed=) range: a non-negative int64 key

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                 "no_repeat_ngram_size", "min_new_tokens", "suppress_tokens", "bad_words_ids")


def _lru_put(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


class Intake:
    """Validates requests and builds them; holds the processor and commit-rule caches."""

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None, tokenizer, *,
                 max_cached_tokens: int | None):
        self.target, self.tokenizer = target, tokenizer
        self.device = target.device
        self.vocab_size = int(target.config.vocab_size)
        limits = [m for m in (max_positions(target), max_positions(draft) if draft is not None else None) if m]
        self.max_positions = min(limits) if limits else None
        self.max_cached_tokens = max_cached_tokens
        self.proc_cache: OrderedDict[tuple, Processing | None] = OrderedDict()
        self.rule_cache: OrderedDict[tuple, CommitRule] = OrderedDict()

    def request(self, rid: int, handle: RequestHandle, prompt, max_new_tokens: int, *, do_sample: bool,
                sampling: dict[str, Any], eos_token_id, stop, slo, logits_processor: LogitsProcessorList | None,
                generation_config: GenerationConfig | None, seed) -> Request:
        """A checked request (its sampling key is the engine's to draw); ValueError on bad input."""
        ids = self.prompt_ids(prompt)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if self.max_positions is not None and len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the models' "
                f"maximum of {self.max_positions} positions")
        reserve = len(ids) + max_new_tokens
        if self.max_cached_tokens is not None and reserve > self.max_cached_tokens:
            raise ValueError(f"the request needs {reserve} cached tokens (prompt + max_new_tokens); this "
                             f"engine allows {self.max_cached_tokens} (max_cached_tokens)")
        slo = SLO.coerce(slo)
        check_seed(seed)
        processing, do_sample, eos, min_new = self.processing(ids, max_new_tokens, bool(do_sample), sampling,
                                                             eos_token_id, logits_processor, generation_config)
        rule = self.rule(eos, min_new, self.stop_strings(stop))
        buf = torch.zeros(len(ids) + max_new_tokens + 1, dtype=torch.long, device=self.device)
        buf[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return Request(id=rid, handle=handle, prompt=ids, buf=buf, max_new=max_new_tokens, do_sample=do_sample,
                       processing=processing, rule=rule, slo=slo, arrival=time.perf_counter(), reserve=reserve)

    def prompt_ids(self, prompt: "str | Sequence[int] | torch.Tensor") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs Engine(..., tokenizer=...); or pass token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1:
                raise ValueError(f"a tensor prompt must be 1-D (or (1, L)), got shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt must be text, a list of token ids or a tensor, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def processing(self, ids, max_new, do_sample, sampling, eos_token_id, logits_processor, generation_config
                   ) -> tuple[Processing | None, bool, tuple[int, ...], int]:
        """(logits processing, do_sample, EOS ids, min_new_tokens) as HF ``generate`` resolves them."""
        check_sampling(sampling)
        kwargs = {k: v for k, v in sampling.items() if v is not None}
        try:
            gc, model_kwargs = prepare_generation_config(
                self.target, generation_config, dict(do_sample=do_sample, max_new_tokens=max_new, **kwargs))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid generation arguments: {e}") from e
        if eos_token_id is not None:
            gc.eos_token_id = eos_token_id if eos_token_id != [] else None
        eos_val = gc.eos_token_id
        eos = tuple([] if eos_val is None else ([eos_val] if isinstance(eos_val, int) else list(eos_val)))
        if not all(isinstance(e, int) and 0 <= e < self.vocab_size for e in eos):
            raise ValueError(f"eos_token_id must be token ids in [0, {self.vocab_size}), got {eos_val!r}")
        if (gc.num_beams or 1) != 1 or (gc.num_return_sequences or 1) != 1:
            raise ValueError("the engine does not support beam search or several sequences per request")
        do_sample = bool(gc.do_sample)
        min_new = int(gc.min_new_tokens or 0)
        key = None
        if logits_processor is None:
            key = (do_sample, gc.temperature, gc.top_k, gc.top_p, gc.min_p, gc.typical_p, gc.repetition_penalty,
                   gc.no_repeat_ngram_size, gc.min_new_tokens, gc.min_length, str(gc.suppress_tokens),
                   str(gc.bad_words_ids), eos)
            if key in self.proc_cache:
                self.proc_cache.move_to_end(key)
                return self.proc_cache[key], do_sample, eos, min_new
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        try:
            gc.max_length = len(ids) + max_new
            procs = logits_processors(self.target, gc, input_ids, logits_processor, model_kwargs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid generation arguments: {e}") from e
        proc = Processing(procs, batch_size=1) if len(procs) else None
        if key is not None and (proc is None or proc.input_free):
            _lru_put(self.proc_cache, key, proc, PROCESSOR_CACHE_SIZE)  # stateless: shared by equal settings
        return proc, do_sample, eos, min_new

    def stop_strings(self, stop) -> tuple[str, ...]:
        if stop is None or stop == []:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if self.tokenizer is None:
            raise ValueError("stop strings need Engine(..., tokenizer=...)")
        return tuple(stop)

    def rule(self, eos: tuple[int, ...], min_new: int, stop: tuple[str, ...]) -> CommitRule:
        """The commit rule for these settings (stateless, so requests with equal settings share it)."""
        key = (eos, min_new, stop)
        rule = self.rule_cache.get(key)
        if rule is None:
            try:
                stopping = stop_string_criteria(self.tokenizer, stop) if stop else None
            except Exception as e:  # noqa: BLE001 - HF cannot index this tokenizer's vocabulary
                raise ValueError(f"stop strings {list(stop)!r}: HF's StopStringCriteria cannot be built for this "
                                 f"tokenizer ({type(e).__name__}: {e}); generate(stop_strings=...) fails the "
                                 "same way") from e
            rule = CommitRule(eos, min_new_tokens=min_new, stopping=stopping, device="cpu")
        _lru_put(self.rule_cache, key, rule, RULE_CACHE_SIZE)
        return rule


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")


def check_sampling(sampling: dict[str, Any]) -> None:
    """The sampling arguments HF would only reject deep inside ``generate`` (or not at all)."""
    t = sampling.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    k = sampling.get("top_k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {k!r}")
    p = sampling.get("top_p")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    rp = sampling.get("repetition_penalty")
    if rp is not None and (isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp)
                           or rp <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unsupported generation arguments {sorted(unknown)}")
