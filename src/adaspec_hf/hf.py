"""Hugging Face entry points: ``enable(model)`` and an HF ``CandidateGenerator``.

``enable(model)`` makes ``model.generate(**inputs, assistant_model=draft, adaptive=True)`` run
the batched speculative engine and return exactly what HF returns. Without ``adaptive=True`` (or
``candidate_generator=``) the call goes to HF's own ``generate`` untouched. Importing this module
changes nothing.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
    StopStringCriteria,
)

from .engine import GenerationStats, SpeculativeDecoder
from .hf_compat import (
    CandidateGenerator, candidate_generator_override, decoder_only_output, logits_processors,
    prepare_generation_config,
)
from .kvstate import KVState, check_cache_support
from .drafter import TreeDrafter
from .policies import DraftPolicy, StepContext, StepOutcome
from .processing import Processing
from .registry import make_policy

logger = logging.getLogger("adaspec_hf")

_UNSUPPORTED_MODEL_KWARGS = ("inputs_embeds", "past_key_values", "cache", "token_type_ids", "cache_position")


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Opt ``model`` in: its ``generate`` gains ``adaptive=True`` and ``candidate_generator=``."""
    check_cache_support(model)
    if getattr(model, "_adaspec_original_generate", None) is not None:
        return model
    original = model.generate

    @functools.wraps(original)
    def generate(*args, adaptive: bool = False, candidate_generator: CandidateGenerator | None = None, **kwargs):
        if candidate_generator is not None:
            if adaptive:
                raise ValueError("pass either adaptive=True or candidate_generator=, not both")
            return _generate_with_candidate_generator(model, original, candidate_generator, *args, **kwargs)
        if not adaptive:
            return original(*args, **kwargs)
        return adaptive_generate(model, *args, **kwargs)

    model._adaspec_original_generate = original
    model.generate = generate
    return model


def disable(model: PreTrainedModel) -> PreTrainedModel:
    original = getattr(model, "_adaspec_original_generate", None)
    if original is not None:
        del model.generate
        model._adaspec_original_generate = None
    return model


def check_vocab(target: PreTrainedModel, draft: PreTrainedModel, tokenizer=None, assistant_tokenizer=None) -> None:
    """The draft must score the target's token ids; different tokenizers are HF's business."""
    hint = (
        "adaspec-hf needs a draft that shares the target's tokenizer. For a draft with a different "
        "tokenizer use HF's universal assisted generation instead: model.generate(..., "
        "assistant_model=draft, tokenizer=target_tokenizer, assistant_tokenizer=draft_tokenizer) "
        "without adaptive=True."
    )
    if assistant_tokenizer is not None and tokenizer is not None:
        if tokenizer.get_vocab() != assistant_tokenizer.get_vocab():
            raise ValueError("vocabulary mismatch between tokenizer and assistant_tokenizer. " + hint)
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise ValueError(f"vocabulary mismatch: target vocab_size={vt}, draft vocab_size={vd}. " + hint)


def _prepare(model: PreTrainedModel, inputs, generation_config, kwargs) -> tuple[GenerationConfig, dict]:
    gen_config, model_kwargs = prepare_generation_config(model, generation_config, kwargs)
    if gen_config.num_beams not in (None, 1):
        raise ValueError(f"adaptive=True does not support beam search (num_beams={gen_config.num_beams})")
    if (gen_config.num_return_sequences or 1) > 1:
        raise ValueError("adaptive=True does not support num_return_sequences > 1")
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(gen_config, name, False):
            raise ValueError(f"adaptive=True does not support {name}=True")
    for name in _UNSUPPORTED_MODEL_KWARGS:
        if model_kwargs.get(name) is not None:
            raise ValueError(f"adaptive=True does not support `{name}`")
    if inputs is None:
        inputs = model_kwargs.pop("input_ids", None)
    else:
        model_kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError("adaptive=True needs input_ids (an empty prompt cannot be speculated on)")
    model_kwargs["input_ids"] = inputs
    leftover = set(model_kwargs) - {"input_ids", "attention_mask", "use_cache"}
    if leftover:
        raise ValueError(f"adaptive=True does not support model kwargs {sorted(leftover)}")
    return gen_config, model_kwargs


def adaptive_generate(
    model: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    prefix_allowed_tokens_fn=None,
    synced_gpus: bool | None = None,
    assistant_model: PreTrainedModel | None = None,
    streamer=None,
    negative_prompt_ids=None,
    negative_prompt_attention_mask=None,
    *,
    draft_policy: str | DraftPolicy | None = None,
    tokenizer=None,
    assistant_tokenizer=None,
    **kwargs: Any,
):
    """``model.generate(..., assistant_model=draft, adaptive=True)``; see :func:`enable`.

    ``draft_policy`` picks how much to speculate: ``"adaptive"`` (default: the fitted efficiency
    model), ``"static-K"``, ``"heuristic"``, ``"confidence"``, ``"smartspec"`` or a
    :class:`~adaspec_hf.policies.DraftPolicy`. Statistics of the call are left in
    ``model.adaspec_stats`` (:class:`~adaspec_hf.engine.GenerationStats`).
    """
    if assistant_model is None:
        raise ValueError("adaptive=True needs a draft model: pass assistant_model=draft")
    if prefix_allowed_tokens_fn is not None:
        raise ValueError("adaptive=True does not support prefix_allowed_tokens_fn")
    if negative_prompt_ids is not None or negative_prompt_attention_mask is not None:
        raise ValueError("adaptive=True does not support negative prompts")
    if synced_gpus:
        raise ValueError("adaptive=True does not support synced_gpus")
    check_cache_support(assistant_model)
    check_vocab(model, assistant_model, tokenizer, assistant_tokenizer)
    gen_config, model_kwargs = _prepare(model, inputs, generation_config, kwargs)
    input_ids = model_kwargs["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, length) LongTensor")
    if input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids has length 0")
    input_ids = input_ids.to(model.device)
    batch = input_ids.shape[0]
    if streamer is not None and batch > 1:
        raise ValueError("streamer supports batch size 1 only (as in HF generate)")
    eos = gen_config.eos_token_id
    pad = gen_config.pad_token_id
    if pad is None:
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else None
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        if pad is not None and gen_config.pad_token_id is not None and (eos is None or pad not in ([eos] if isinstance(eos, int) else eos)):
            attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    input_len = input_ids.shape[1]
    if gen_config.max_new_tokens is not None:
        max_new = gen_config.max_new_tokens
    else:
        max_new = (gen_config.max_length or 20) - input_len
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_length={gen_config.max_length} <= prompt length {input_len}")
    gen_config.max_length = input_len + max_new
    processors = logits_processors(
        model, gen_config, input_ids, logits_processor, model_kwargs,
        has_attention_mask=model_kwargs.get("attention_mask") is not None,
    )
    stopping = StoppingCriteriaList(stopping_criteria or [])
    if gen_config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer= (as in HF generate)")
        stopping.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gen_config.stop_strings))
    policy = make_policy(draft_policy, model, assistant_model, gen_config)
    decoder = SpeculativeDecoder(
        model, assistant_model, policy, do_sample=bool(gen_config.do_sample), processors=processors,
        eos_token_id=eos, pad_token_id=pad, stopping_criteria=stopping,
        max_time=gen_config.max_time, output_scores=bool(gen_config.output_scores),
        output_logits=bool(gen_config.output_logits), streamer=streamer,
    )
    result = decoder.generate(input_ids, attention_mask, max_new)
    model.adaspec_stats = result.stats
    if gen_config.return_dict_in_generate:
        return decoder_only_output(result.sequences, scores=result.scores, logits=result.logits)
    return result.sequences


# ---------------------------------------------------------------------------------------------
class AdaptiveCandidateGenerator(CandidateGenerator):
    """HF ``CandidateGenerator`` driven by adaspec's drafter and a draft policy (batch size 1).

    For users who want HF's own assisted loop::

        gen = AdaptiveCandidateGenerator(draft, policy="heuristic")
        model.generate(**inputs, assistant_model=draft, candidate_generator=gen)   # after enable()

    The draft cache is kept with holes exactly as in the engine: tokens HF rejects are masked,
    never recomputed.
    """

    def __init__(self, draft: PreTrainedModel, policy: str | DraftPolicy | None = "heuristic",
                 logits_processor: LogitsProcessorList | None = None, do_sample: bool = False):
        check_cache_support(draft)
        self.draft = draft
        self.policy = make_policy(policy, None, draft, None)
        self.process = Processing(logits_processor)
        self.do_sample = do_sample
        self.reset()

    def reset(self) -> None:
        self.kv: KVState | None = None
        self.seen = 0
        self.last_tree = None
        self.step = 0
        self.policy.reset()

    def _sync_with(self, ids: torch.Tensor) -> None:
        """Commit the fed draft nodes that HF accepted; start over if the prompt changed."""
        if self.kv is None:
            self.kv = KVState(self.draft)
            if ids.shape[1] > 1:
                self.kv.prefill(ids[:, :-1], torch.ones_like(ids[:, :-1]))
                self.seen = ids.shape[1] - 1
            else:
                self.kv.valid = torch.zeros(1, 0, dtype=torch.bool, device=ids.device)
                self.kv.pos = torch.zeros(1, 0, dtype=torch.long, device=ids.device)
                self.seen = 0
            return
        tree = self.last_tree
        if tree is not None and tree.width:
            ok = torch.zeros_like(tree.valid)
            for j in range(tree.width):  # a chain: node j sits at position seen_before + j
                col = self._tree_base + j
                if col < ids.shape[1] and int(ids[0, col]) == int(tree.tokens[0, j]) and (j == 0 or bool(ok[0, j - 1])):
                    ok[0, j] = True
            fed = ok & (tree.draft_slot >= 0)
            self.kv.commit(tree.draft_slot, fed)
            self.seen += int(fed.sum())
        self.last_tree = None

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if input_ids.shape[0] != 1:
            raise ValueError("AdaptiveCandidateGenerator supports batch size 1 (HF's assisted loop)")
        dev = input_ids.device
        ids = input_ids.to(self.draft.device)
        self._sync_with(ids)
        length = torch.tensor([ids.shape[1]], device=ids.device)
        self.step += 1
        ctx = StepContext(rows=1, context_len=length, remaining=torch.tensor([10**9], device=ids.device),
                          sampling=self.do_sample, step=self.step)
        depth = self.policy.max_depth(ctx).clamp(min=0)
        if int(depth[0]) == 0:
            depth = torch.ones_like(depth)  # HF's loop needs at least one candidate
        count = length - self.seen
        toks = ids[:, self.seen:]
        drafter = TreeDrafter(self.kv, self.do_sample)
        root = drafter.catch_up(toks, torch.tensor([self.seen], device=ids.device), count)
        self.seen = ids.shape[1]
        prefix_of = lambda rows, paths: [(0, torch.cat([ids[0], p.to(ids.device)])) for p in paths]  # noqa: E731
        tree = drafter.grow(root, self.policy, ctx, depth, self.process, prefix_of)
        self.last_tree, self._tree_base = tree, ids.shape[1]
        cand = torch.cat([ids, tree.tokens[:, : int(tree.n_nodes[0])]], dim=1).to(dev)
        return cand, None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        tree = self.last_tree
        if tree is None:
            return
        n = tree.width
        acc = torch.arange(n, device=tree.tokens.device)[None, :] < num_matches
        tested = torch.arange(n, device=tree.tokens.device)[None, :] <= num_matches
        self.policy.observe(StepOutcome(
            tree=tree, n_accepted=torch.tensor([num_matches]), tested=tested & tree.valid,
            accept_prob=acc.float(), accepted=acc & tree.valid, step_time=0.0, draft_time=0.0,
            verify_time=0.0, context_len=torch.tensor([input_ids.shape[1]]),
        ))


def _generate_with_candidate_generator(model, original_generate, generator: CandidateGenerator, *args, **kwargs):
    """Run HF's own assisted loop with our candidate generator in place of HF's."""
    if kwargs.get("assistant_model") is None:
        raise ValueError("candidate_generator= needs assistant_model=draft as well (HF picks its loop by it)")
    if isinstance(generator, AdaptiveCandidateGenerator):
        generator.reset()
    with candidate_generator_override(model, generator):
        return original_generate(*args, **kwargs)
