"""Training of the pair: the joint target+draft phase, the draft's distillation, and their losses.

The draft learns from the target's logits (forward KL) while the target learns the corpus, then keeps
distilling on the frozen target: a draft that imitates *this* target is what speculation needs, not
a draft that models the corpus well on its own. Budgets are optimizer steps, never seconds (see
:class:`~adaspec_hf.pair.recipe.Recipe`).
"""
from __future__ import annotations

import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from adaspec_hf.pair.recipe import Recipe
from adaspec_hf.pair.report import say
from adaspec_hf.pair.setup import PROBE_ROWS, TrainingSetup
from adaspec_hf.pair.threads import ThreadTuner

GRAD_CLIP = 1.0  # max gradient norm, per model
DISTILL_COST = 0.55  # a distill step (target forward, draft forward+backward) vs a joint step: measured ~0.5-0.6
ADAM_BETAS = (0.9, 0.95)  # the usual LM-pretraining betas: beta2 0.95 keeps small-batch steps stable
WEIGHT_DECAY = 0.05
ADAM_EPS = 1e-8
LOG_EVERY = 10  # optimizer steps between loss reports on the progress bar
ETA_ROW_TOKENS = 256  # the probe's rows are this long; the ETA scales with the recipe's block size


def eta_s(recipe: Recipe, setup: TrainingSetup) -> float:
    """Training time predicted from the probe (rows scale ~linearly at these sizes)."""
    row = setup.probe_step_s / PROBE_ROWS * (recipe.block_size / ETA_ROW_TOKENS)  # one row, joint step
    return row * (recipe.target_steps * recipe.batch_size
                  + DISTILL_COST * recipe.distill_steps * recipe.distill_batch_size)


def run_phase(desc, kind, model, dataset, *, recipe: Recipe, setup: TrainingSetup, max_steps: int, seed: int,
              progress: bool, param_groups, extra: dict, batch_size: int | None = None) -> dict:
    """One Trainer run of exactly ``max_steps`` optimizer steps (cosine LR over those steps)."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback, TrainingArguments

    batch = batch_size or recipe.batch_size
    if max_steps <= 0:
        return {"steps": 0, "seconds": 0.0, "loss": float("nan"), "thread_switches": 0, "batch_size": batch}
    joint_cls, distill_cls, target_cls = _trainer_classes()
    cls = {"joint": joint_cls, "distill": distill_cls, "target": target_cls}[kind]
    model.train()
    if kind == "distill":
        extra["teacher"].eval()
    opt = torch.optim.AdamW(
        [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr} for m, lr in param_groups],
        betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
    tuner = ThreadTuner()

    clip_groups = [[p for p in m.parameters() if p.requires_grad] for m, _ in param_groups]

    class _Progress(TrainerCallback):
        """A tqdm bar in steps (with its ETA), loss and threads; the thread tuner around each step;
        gradient clipping per model (one global norm over target + draft would let the draft's
        gradients shrink the target's updates)."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, GRAD_CLIP)

        def on_step_begin(self, args, state, control, **kw):
            tuner.begin(state.global_step)

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not progress)

        def on_step_end(self, args, state, control, **kw):
            tuner.end()
            self.bar.update(1)
            self.bar.set_postfix_str(f"{tuner.current} thr", refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix_str(f"{tuner.current} thr, loss {float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    with tempfile.TemporaryDirectory(prefix="adaspec_pair_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=max_steps,
            learning_rate=param_groups[0][1], max_grad_norm=0.0, logging_steps=LOG_EVERY, save_strategy="no",
            eval_strategy="no", report_to=[], use_cpu=True, bf16=setup.bf16, seed=seed, data_seed=seed,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": recipe.min_lr_rate},
            warmup_steps=min(recipe.warmup_steps, max(1, max_steps // 10)),
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, log_level="error",
        )
        trainer = cls(model=model, args=args, train_dataset=dataset, data_collator=_collate,
                      optimizers=(opt, None), callbacks=[_Progress()], **extra)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        t0 = time.perf_counter()
        try:
            result = trainer.train()
        finally:
            tuner.restore()
        secs = time.perf_counter() - t0
    steps = int(trainer.state.global_step)
    say(progress, f"[adaspec-hf pair] {desc}: {steps} steps ({steps * batch * recipe.block_size:,} "
                  f"tokens) in {secs:.0f} s, mean loss {result.training_loss:.3f}")
    return {"steps": steps, "seconds": round(secs, 1), "loss": float(result.training_loss),
            "thread_switches": tuner.switches, "batch_size": batch}


class Joint(nn.Module):
    """Container so that one Trainer optimises target (LM loss) and draft (KL to target) together."""

    def __init__(self, target, draft):
        super().__init__()
        self.target, self.draft = target, draft

    def forward(self, input_ids):  # pragma: no cover - compute_loss does the work
        raise NotImplementedError


def _kd_loss(student_logits, teacher_logits, hard_weight: float = 0.0):
    """Forward KL(p_teacher || p_student) per token (+ optional CE on the teacher's argmax)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = (t.exp() * (t - s)).sum(-1).mean()
    if hard_weight:
        loss = loss + hard_weight * F.nll_loss(s.flatten(0, -2), t.argmax(-1).flatten())
    return loss


def _joint_loss(target, draft, ids, kd_weight: float = 1.0, hard_weight: float = 0.0):
    """Target: next-token CE; draft: KL to the target's detached logits on the same batch."""
    out = target(input_ids=ids, labels=ids)
    return out.loss + kd_weight * _kd_loss(draft(input_ids=ids).logits, out.logits.detach(), hard_weight), out


def _trainer_classes():
    from transformers import Trainer

    class _JointTrainer(Trainer):
        """Target: next-token CE. Draft: KL to the target's detached logits (same batch)."""

        def __init__(self, *a, kd_weight=1.0, hard_weight=0.0, **kw):
            super().__init__(*a, **kw)
            self.kd_weight, self.hard_weight = kd_weight, hard_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = _joint_loss(model.target, model.draft, inputs["input_ids"], self.kd_weight, self.hard_weight)
            return (loss, out) if return_outputs else loss

    class _DistillTrainer(Trainer):
        """Draft: KL to a frozen teacher's logits."""

        def __init__(self, *a, teacher=None, hard_weight=0.0, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.hard_weight = teacher, hard_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            with torch.no_grad():
                t_logits = self.teacher(input_ids=ids).logits
            out = model(input_ids=ids)
            loss = _kd_loss(out.logits, t_logits, self.hard_weight)
            return (loss, out) if return_outputs else loss

    class _TargetTrainer(Trainer):
        """Target alone: next-token CE."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids, labels=ids)
            return (out.loss, out) if return_outputs else out.loss

    return _JointTrainer, _DistillTrainer, _TargetTrainer


def _collate(features):
    return {"input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long)}


def probe_step(target, draft, ids):
    """One joint training step's loss (what the precision/thread probe times)."""
    return _joint_loss(target, draft, ids)[0]


def probe_step_target_only(target, draft, ids):
    return target(input_ids=ids, labels=ids).loss
