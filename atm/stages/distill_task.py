"""Stage ``distill_task``: task-stage distillation of a fine-tuned joint intent/slot teacher on MASSIVE.

A student :class:`~atm.models.heads.JointIntentSlotModel` -- encoder from the ``encoder`` input (a
distilled MLM checkpoint, default ``distill_final``), fresh heads over the teacher's label inventories --
learns from the frozen ``teacher`` input (a ``finetune`` run) on the ``finetune.locales`` train data:

``L = w_hard * (CE(z^int_s, y^int) + c_slot * CE(z^slot_s, y^slot))
      + w_logit * c_T * [ l(z^int_s, z^int_t; T) + l(z^slot_s[P], z^slot_t[P]; T) ]``

with ``w_hard = distill.hard_weight``, ``c_slot = finetune.slot_loss_coef`` (the hard loss of
:mod:`atm.stages.finetune`), ``w_logit = distill.logit.weight``, ``l`` the logit loss
``distill.logit.loss`` of :mod:`atm.distill.losses` (``soft_ce``, ``kl``, ``logit_mse``), each a mean over
its rows, ``P`` the real first-sub-token positions (``slot_labels != -100``: the positions the slot
labels and predictions live on, :func:`atm.models.heads.align_word_labels`), ``T`` the temperature
(constant or linearly scheduled, :meth:`atm.distill.objective.DistillationObjective.temperature`) and
``c_T = T^2`` when ``distill.logit.t_squared`` (Hinton et al. 2015, sec. 2: keeps the soft-target
gradients' scale independent of T), else 1. This is the task-specific stage of two-stage distillation
(TinyBERT, Jiao et al. 2020, sec. 3.3; Distiller, He et al. 2021, which distils fine-tuned teachers on
the task data); the intermediate losses of the MLM stages are not used here.

Evaluation is :func:`atm.stages.finetune.score_locale` on ``finetune.eval_locales``: the student's
``eval/massive/<locale>/...`` and ``eval/massive/avg/...``, the teacher's ``eval/massive_teacher/...`` on the
same examples, and the student/teacher score ratios ``eval/massive/avg/<metric>_ratio`` (Distiller's
relative score; NaN when the teacher scores 0). The student is saved as ``checkpoint``.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig

from atm.data.collate import batch_stream
from atm.data.massive import intent_labels, slot_labels
from atm.distill.losses import get_loss
from atm.distill.objective import DistillationObjective
from atm.engine.loop import device_for, fit
from atm.errors import AtmError
from atm.lineage import Input
from atm.models.encoder import count_parameters, load_mlm
from atm.models.heads import IGNORE_INDEX, JointIntentSlotModel, load_joint_model
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import log_model
from atm.stages.finetune import SCORES, collator, encode, evaluate_massive, train_examples


def check(cfg: DictConfig) -> None:
    """Config-time validation of the ``distill`` group for this stage.

    Raises:
        AtmError: ``distill.intermediate.loss`` is set (this stage distils logits only), an unknown logit
            loss name, or a temperature that is not positive.
    """
    d = cfg.distill
    if d.intermediate.get("loss"):
        raise AtmError(f"distill.intermediate.loss={d.intermediate.loss}: stage distill_task supports logit "
                       f"distillation only; set distill.intermediate.loss=null")
    if d.logit.loss:
        get_loss(d.logit.loss, "logit", "distill.logit.loss")
    for key in ("temperature", "temperature_end"):
        value = d.logit.get(key)
        if value is not None and not float(value) > 0:
            raise AtmError(f"distill.logit.{key}={value} must be > 0")


class TaskDistillationLoss:
    """The loss of this stage (formula in the module docstring) for one batch.

    Args:
        distill_cfg: the ``distill`` config (``hard_weight``, ``logit.{loss, weight, temperature,
            temperature_end, t_squared}``; ``intermediate.loss`` must be null).
        teacher_config, student_config: the two :class:`~atm.models.heads.JointIntentSlotConfig`.
        max_steps: training length, for the temperature schedule.

    The temperature schedule, the logit-loss lookup and the vocabulary check are those of
    :class:`atm.distill.objective.DistillationObjective` (built here without intermediate loss).

    Raises:
        AtmError: as :func:`check`; the two models' vocabularies or label inventories differ.
    """

    def __init__(self, distill_cfg: DictConfig, teacher_config: Any, student_config: Any, max_steps: int = 1):
        if distill_cfg.intermediate.get("loss"):
            raise AtmError(f"distill.intermediate.loss={distill_cfg.intermediate.loss}: stage distill_task "
                           f"supports logit distillation only; set distill.intermediate.loss=null")
        for what in ("intent_labels", "slot_labels"):
            if list(getattr(teacher_config, what)) != list(getattr(student_config, what)):
                raise AtmError(f"teacher and student {what} differ; the student must use the teacher's "
                               f"label inventory (same names, same order)")
        self.cfg = distill_cfg
        self.objective = DistillationObjective(distill_cfg, teacher_config, student_config, max_steps)
        self.logit = self.objective.logit  # LossSpec or None (no logit distillation: plain fine-tuning)

    def temperature(self, step: int) -> float:
        """T at ``step`` (constant, or linear from ``temperature`` to ``temperature_end``)."""
        return self.objective.temperature(step)

    def __call__(self, out_s: Any, out_t: Any, slot_labels: torch.Tensor,
                 step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (floats, for logging).

        Args:
            out_s: the student's :class:`~atm.models.heads.JointIntentSlotOutput` computed WITH labels
                (``loss = intent_ce + slot_loss_coef * slot_ce``, the hard loss).
            out_t: the teacher's output on the same batch (logits only are read).
            slot_labels: ``[B, T]`` slot labels, ``-100`` except on each word's first sub-token; these
                positions are the only ones whose slot logits are distilled.
            step: the training step (temperature schedule).

        Returns:
            ``(total, parts)`` with parts ``hard``, ``intent_ce``, ``slot_ce`` and, with a logit loss,
            ``intent_<loss>``, ``slot_<loss>``, ``temperature``.
        """
        if out_s.loss is None:
            raise ValueError("the student's output has no hard loss: call it with intent and slot labels")
        parts: dict[str, torch.Tensor | float] = {"hard": out_s.loss}
        if out_s.intent_loss is not None:
            parts["intent_ce"] = out_s.intent_loss
        if out_s.slot_loss is not None:
            parts["slot_ce"] = out_s.slot_loss
        total = float(self.cfg.hard_weight) * out_s.loss
        if self.logit is not None:
            t = self.temperature(step)
            fn = self.logit.fn
            intent = fn(out_s.intent_logits, out_t.intent_logits.detach(), temperature=t)
            positions = slot_labels != IGNORE_INDEX  # [B, T]
            if positions.any():
                slot = fn(out_s.slot_logits[positions], out_t.slot_logits.detach()[positions], temperature=t)
            else:  # no labelled token in the batch: nothing to distil (keeps the graph, no NaN)
                slot = out_s.slot_logits.sum() * 0.0
            c_t = t * t if self.cfg.logit.t_squared else 1.0
            total = total + float(self.cfg.logit.weight) * c_t * (intent + slot)
            parts.update({f"intent_{self.logit.name}": intent, f"slot_{self.logit.name}": slot, "temperature": t})
        return total, {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}


def _describe(inp: Input | None, role: str, size: int) -> str:
    where = f"run {inp.run_id}" if inp is not None and inp.run_id else (str(inp.path) if inp is not None else role)
    return f"{role} ({where}, vocabulary {size})"


def check_same_tokenizer(tok_t, tok_s, teacher_config: Any, encoder_config: Any,
                         teacher: Input | None = None, encoder: Input | None = None) -> None:
    """Teacher and student must share one tokenizer: same vocabulary size in both tokenizers and both
    model configs, and the same token -> id map.

    Raises:
        AtmError: naming both inputs and their vocabulary sizes.
    """
    sizes_t = {len(tok_t), int(teacher_config.vocab_size)}
    sizes_s = {len(tok_s), int(encoder_config.vocab_size)}
    if sizes_t != sizes_s or len(sizes_t) != 1 or tok_t.get_vocab() != tok_s.get_vocab():
        raise AtmError(f"{_describe(teacher, 'teacher', max(sizes_t))} and "
                       f"{_describe(encoder, 'encoder', max(sizes_s))} do not share a tokenizer; task "
                       f"distillation needs a teacher fine-tuned over the student's tokenizer")


def teacher_label_inventory(teacher_config: Any, intents: list[str], slots: list[str]) -> tuple[list[str], list[str]]:
    """The teacher's intent and slot label lists (their order fixes the class ids the student gets), after
    checking they are the label sets of the data the student is trained on.

    Raises:
        AtmError: the teacher has no label names, or its label sets differ from the data's.
    """
    out = []
    for what, names, data in (("intent", teacher_config.intent_labels, intents),
                              ("slot", teacher_config.slot_labels, slots)):
        if not names:
            raise AtmError(f"the teacher has no {what} label names in its config (is it a finetune checkpoint?)")
        missing, extra = sorted(set(data) - set(names)), sorted(set(names) - set(data))
        if missing or extra:
            raise AtmError(f"the student's {what} labels would differ from the teacher's: the MASSIVE "
                           f"{what} inventory has {len(data)} labels, the teacher {len(names)} "
                           f"(not in the teacher: {', '.join(missing[:5]) or 'none'}; only in the teacher: "
                           f"{', '.join(extra[:5]) or 'none'})")
        out.append(list(names))
    return out[0], out[1]


def _ratio(student: float, teacher: float) -> float:
    return student / teacher if teacher else math.nan


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Distil the ``teacher`` (finetune) into a student over the ``encoder`` input; evaluate both."""
    ft = cfg.finetune
    device = device_for(cfg.trainer)
    teacher_in, encoder_in = inputs["teacher"], inputs["encoder"]
    tokenizer = load_tokenizer(teacher_in.path)
    teacher = load_joint_model(teacher_in.path)
    student_tokenizer = load_tokenizer(encoder_in.path)
    encoder = load_mlm(encoder_in.path)
    check_same_tokenizer(tokenizer, student_tokenizer, teacher.config, encoder.config, teacher_in, encoder_in)
    intents, slots = teacher_label_inventory(teacher.config, intent_labels(), slot_labels())
    student = JointIntentSlotModel.from_encoder(encoder, intents, slots, pooling=ft.pooling,
                                                slot_loss_coef=ft.slot_loss_coef, freeze_encoder=ft.freeze_encoder)
    del encoder
    loss = TaskDistillationLoss(cfg.distill, teacher.config, student.config, cfg.trainer.max_steps)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device)
    mlflow.log_metrics({"model/student_parameters": count_parameters(student),
                        "model/teacher_parameters": count_parameters(teacher)})

    train = train_examples(ft, cfg.seed)  # the same sample as atm.stages.finetune.run
    mlflow.log_metric("data/train_examples", len(train))
    stream = batch_stream(encode(tokenizer, train, intents, slots, cfg.data.max_seq_len), cfg.trainer.batch_size,
                          collator(tokenizer), cfg.seed)

    def loss_fn(batch, step):
        with torch.no_grad():
            out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out_s = student(**batch)
        return loss(out_s, out_t, batch["slot_labels"], step)

    summary = fit(student, stream, loss_fn, cfg.trainer, desc="distill_task")

    results = evaluate_massive(student, tokenizer, ft, intents, slots, cfg.data.max_seq_len)
    results.update(evaluate_massive(teacher, tokenizer, ft, intents, slots, cfg.data.max_seq_len,
                                    prefix="eval/massive_teacher", log_predictions=False))
    for key in SCORES:
        results[f"eval/massive/avg/{key}_ratio"] = _ratio(results[f"eval/massive/avg/{key}"],
                                                          results[f"eval/massive_teacher/avg/{key}"])
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_model(student, tokenizer, "checkpoint")
    return {**summary, **results}
