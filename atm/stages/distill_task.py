"""Stage ``distill_task``: task-stage distillation of a fine-tuned teacher (MASSIVE intent+slots, or XNLI).

``stage.task`` picks the task:

* ``massive``: a student :class:`~atm.models.heads.JointIntentSlotModel` -- encoder from the ``encoder``
  input (a distilled MLM checkpoint, default ``distill_final``), fresh heads over the teacher's label
  inventories -- learns from the frozen ``teacher`` input (a ``finetune`` run; by default fine-tuned over the
  Stage-2 teacher encoder, ``lineage.overrides.finetune``) on the ``finetune.locales`` train data;
* ``xnli``: a student pair classifier (:func:`~atm.models.heads.build_pair_classifier` over the ``encoder``
  input) learns from a ``finetune_xnli`` teacher on its English training sample
  (:func:`atm.probes.xnli.train_pairs`).

The loss (:class:`TaskDistillationLoss`) is

``L = w_hard * H + w_logit * c_T * sum_h l(z^h_s, z^h_t; T)``

with ``H`` the student's hard task loss (MASSIVE: ``CE(z^int_s, y^int) + c_slot * CE(z^slot_s, y^slot)``,
``c_slot = finetune.slot_loss_coef``; XNLI: ``CE(z_s, y)``), ``w_hard = distill.hard_weight``,
``w_logit = distill.logit.weight``, ``l`` the logit loss ``distill.logit.loss`` of :mod:`atm.distill.losses`
(``soft_ce``, ``kl``, ``logit_mse``), each a mean over its rows, the heads ``h``: MASSIVE intent logits and
the slot logits at the real first-sub-token positions (``slot_labels != -100``: the positions the slot
labels and predictions live on, :func:`atm.models.heads.align_word_labels`); XNLI the class logits. ``T`` is
the temperature (constant or linearly scheduled,
:meth:`atm.distill.objective.DistillationObjective.temperature`) and ``c_T = T^2`` when
``distill.logit.t_squared`` (Hinton et al. 2015, sec. 2: keeps the soft-target gradients' scale independent
of T), else 1. This is the task-specific stage of two-stage distillation (TinyBERT, Jiao et al. 2020,
sec. 3.3; Distiller, He et al. 2021, which distils fine-tuned teachers on the task data); the intermediate
losses of the MLM stages are not used here.

Evaluation, student and teacher on the same examples:

* MASSIVE: :func:`atm.tasks.massive.evaluate_massive` on ``finetune.eval_locales`` (by default the training
  locales): ``eval/massive/<locale>/...``, ``eval/massive/avg/...`` and the teacher's
  ``eval/massive_teacher/...``;
* XNLI: :func:`atm.probes.xnli.evaluate_xnli` on ``stage.xnli_languages`` (zero-shot but for
  English): ``eval/xnli/<lang>/accuracy``, ``eval/xnli/avg_accuracy``, the teacher's ``eval/xnli_teacher/...``.

Every student score ``s`` gets its student/teacher ratio ``<score key>_ratio`` (Distiller's relative score;
NaN when the teacher scores 0). The run is tagged with what the AutoDistiller
(``analysis/autodistiller.py``) reads: ``atm.task`` (``massive`` | ``xnli``), ``atm.train_languages`` and
``atm.datasets`` (comma-joined dataset ids ``<dataset task>/<language>``, e.g. ``massive_intent/de-DE``,
``massive_slots/de-DE``, ``xnli/fr``; :data:`DATASET_METRICS` names the ratio metric of each). The student
is saved as ``checkpoint``.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig

from atm import sweeps
from atm.data.collate import batch_stream
from atm.data.massive import intent_labels, slot_labels
from atm.distill.losses import get_loss
from atm.distill.objective import DistillationObjective
from atm.engine.loop import device_for, fit
from atm.engine.state import run_state_dir
from atm.errors import AtmError
from atm.lineage import Input
from atm.models import cost
from atm.models.encoder import count_parameters, load_checkpoint
from atm.models.heads import (
    IGNORE_INDEX,
    JointIntentSlotModel,
    build_pair_classifier,
    load_joint_model,
    load_pair_classifier,
)
from atm.models.tokenizer import load_tokenizer
from atm.probes.xnli import TRAIN_LANGUAGE, evaluate_xnli, pair_stream, train_pairs
from atm.stages.common import check_data, check_locales, log_model
from atm.stages.registry import all_stages, canonical_name, stage, stages_of_kind
from atm.tasks.massive import collator, encode, evaluate_massive, train_examples

#: ``stage.task`` (the tasks this stage distils) -> a typical ``stage.objective`` (the student's mean score).
#: A task's teachers are the stages of kind ``classifier:<task>`` (:func:`atm.stages.stages_of_kind`).
OBJECTIVES = {"massive": "eval/massive/avg/exact_match", "xnli": "eval/xnli/avg_accuracy"}
#: Dataset task -> the metric (``{lang}`` = the evaluation locale/language) holding its student/teacher ratio.
DATASET_METRICS = {
    "massive_intent": "eval/massive/{lang}/intent_accuracy_ratio",
    "massive_slots": "eval/massive/{lang}/slot_f1_ratio",
    "xnli": "eval/xnli/{lang}/accuracy_ratio",
}
TAG_TASK = "atm.task"
TAG_DATASETS = "atm.datasets"
TAG_TRAIN_LANGUAGES = "atm.train_languages"


def datasets(cfg: DictConfig) -> list[str]:
    """The dataset ids a run of ``cfg`` scores: ``massive_intent/<locale>`` and ``massive_slots/<locale>`` per
    ``finetune.eval_locales``, or ``xnli/<lang>`` per ``stage.xnli_languages``."""
    if cfg.stage.task == "massive":
        return [f"{task}/{loc}" for loc in cfg.finetune.eval_locales for task in ("massive_intent", "massive_slots")]
    return [f"xnli/{lang}" for lang in cfg.stage.xnli_languages]


def train_languages(cfg: DictConfig) -> list[str]:
    """The languages the student is trained on (``finetune.locales``, or English for XNLI)."""
    return list(cfg.finetune.locales) if cfg.stage.task == "massive" else [TRAIN_LANGUAGE]


def check(cfg: DictConfig) -> None:
    """Config-time validation of ``stage.task``, the teacher role and the ``distill`` group for this stage.

    Raises:
        AtmError: unknown ``stage.task``, a teacher stage that does not train that task's teacher, an
            ``eval/`` objective of another task, no evaluation language, ``distill.intermediate.loss`` set (this stage distils logits only), an
            unknown logit loss name, or a temperature that is not positive.
    """
    task = cfg.stage.get("task", "massive")
    if task not in OBJECTIVES:
        raise AtmError(f"stage.task={task!r} must be one of {', '.join(OBJECTIVES)}")
    check_data(cfg)
    if task == "massive":
        check_locales(cfg)
    teacher = all_stages().get(canonical_name(str(cfg.teacher)))
    kind = f"classifier:{task}"
    if teacher is not None and any(k.startswith("classifier:") for k in teacher.kinds) and kind not in teacher.kinds:
        raise AtmError(f"teacher={cfg.teacher}: stage.task={task} needs teacher={' or '.join(stages_of_kind(kind))}")
    objective = str(cfg.stage.get("objective", ""))
    if objective.startswith("eval/") and not objective.startswith((f"eval/{task}/", f"eval/{task}_teacher/")):
        raise AtmError(f"stage.objective={objective} is not a metric of stage.task={task} "
                       f"(e.g. {OBJECTIVES[task]})")
    if not datasets(cfg):
        where = "finetune.eval_locales" if task == "massive" else "stage.xnli_languages"
        raise AtmError(f"{where} is empty: stage distill_task needs at least one evaluation language")
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


def _label_fields(config: Any) -> tuple[str, ...]:
    return ("intent_labels", "slot_labels") if hasattr(config, "intent_labels") else ("id2label",)


class TaskDistillationLoss:
    """The loss of this stage (formula in the module docstring) for one batch.

    Args:
        distill_cfg: the ``distill`` config (``hard_weight``, ``logit.{loss, weight, temperature,
            temperature_end, t_squared}``; ``intermediate.loss`` must be null).
        teacher_config, student_config: the two models' configs: both
            :class:`~atm.models.heads.JointIntentSlotConfig` (MASSIVE) or both sequence-classification
            configs (XNLI).
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
        fields = _label_fields(teacher_config)
        if fields != _label_fields(student_config):
            raise AtmError("teacher and student are different kinds of task model (joint intent/slot vs "
                           "sequence classifier)")
        for what in fields:
            labels_t, labels_s = getattr(teacher_config, what), getattr(student_config, what)
            as_list = (lambda x: sorted(x.items())) if isinstance(labels_t, dict) else list
            if as_list(labels_t) != as_list(labels_s):
                raise AtmError(f"teacher and student {what} differ; the student must use the teacher's "
                               f"label inventory (same names, same order)")
        self.cfg = distill_cfg
        self.objective = DistillationObjective(distill_cfg, teacher_config, student_config, max_steps)
        self.logit = self.objective.logit  # LossSpec or None (no logit distillation: plain fine-tuning)

    def temperature(self, step: int) -> float:
        """T at ``step`` (constant, or linear from ``temperature`` to ``temperature_end``)."""
        return self.objective.temperature(step)

    @staticmethod
    def heads(out_s: Any, out_t: Any, slot_labels: torch.Tensor | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The distilled logits ``(name, z_s [N, C], z_t [N, C])``: ``intent`` ``[B, C_int]`` and ``slot`` at the
        labelled first sub-tokens ``[P, C_slot]`` for joint models; ``class`` ``[B, C]`` for classifiers."""
        if hasattr(out_s, "intent_logits"):
            if slot_labels is None:
                raise ValueError("slot_labels are needed to distil the slot logits of a joint model")
            positions = slot_labels != IGNORE_INDEX  # [B, T]
            return [("intent", out_s.intent_logits, out_t.intent_logits),
                    ("slot", out_s.slot_logits[positions], out_t.slot_logits[positions])]
        return [("class", out_s.logits, out_t.logits)]

    def __call__(self, out_s: Any, out_t: Any, slot_labels: torch.Tensor | None = None,
                 step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (floats, for logging).

        Args:
            out_s: the student's output computed WITH labels (its ``loss`` is the hard loss): a
                :class:`~atm.models.heads.JointIntentSlotOutput` (``loss = intent_ce + slot_loss_coef *
                slot_ce``) or a sequence-classifier output (``loss`` = CE, ``logits [B, C]``).
            out_t: the teacher's output on the same batch (logits only are read).
            slot_labels: joint models: ``[B, T]`` slot labels, ``-100`` except on each word's first
                sub-token; these positions are the only ones whose slot logits are distilled.
            step: the training step (temperature schedule).

        Returns:
            ``(total, parts)`` with parts ``hard`` (and ``intent_ce``, ``slot_ce`` for joint models) and,
            with a logit loss, ``<head>_<loss>`` per head (``intent``, ``slot``; ``class``) and
            ``temperature``.
        """
        if out_s.loss is None:
            raise ValueError("the student's output has no hard loss: call it with its labels")
        parts: dict[str, torch.Tensor | float] = {"hard": out_s.loss}
        for name in ("intent", "slot"):
            value = getattr(out_s, f"{name}_loss", None)
            if value is not None:
                parts[f"{name}_ce"] = value
        total = float(self.cfg.hard_weight) * out_s.loss
        if self.logit is not None:
            t = self.temperature(step)
            soft = 0.0
            for name, z_s, z_t in self.heads(out_s, out_t, slot_labels):
                if z_s.shape[0]:
                    value = self.logit.fn(z_s, z_t.detach(), temperature=t)
                else:  # no labelled token in the batch: nothing to distil (keeps the graph, no NaN)
                    value = z_s.sum() * 0.0
                parts[f"{name}_{self.logit.name}"] = value
                soft = soft + value
            c_t = t * t if self.cfg.logit.t_squared else 1.0
            total = total + float(self.cfg.logit.weight) * c_t * soft
            parts["temperature"] = t
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


def ratios(results: dict[str, float], prefix: str, teacher_prefix: str) -> dict[str, float]:
    """``<key>_ratio`` = student / teacher for every student score ``<prefix>/...`` (standard errors excluded)
    whose teacher score ``<teacher_prefix>/...`` is in ``results``."""
    out = {}
    for key, value in results.items():
        if key.startswith(prefix + "/") and not key.endswith("_se"):
            teacher_key = teacher_prefix + key[len(prefix):]
            if teacher_key in results:
                out[f"{key}_ratio"] = _ratio(value, results[teacher_key])
    return out


def _massive(cfg: DictConfig, teacher_in: Input, encoder, tokenizer):
    """Teacher, student, training stream and ``evaluate(model, prefix, log_predictions)`` for MASSIVE."""
    ft = cfg.finetune
    teacher = load_joint_model(teacher_in.path)
    intents, slots = teacher_label_inventory(teacher.config, intent_labels(), slot_labels())
    student = JointIntentSlotModel.from_encoder(encoder, intents, slots, pooling=ft.pooling,
                                                slot_loss_coef=ft.slot_loss_coef, freeze_encoder=ft.freeze_encoder)
    train = train_examples(ft, cfg.seed)  # the same sample as atm.stages.finetune.run
    mlflow.log_metric("data/train_examples", len(train))
    stream = batch_stream(encode(tokenizer, train, intents, slots, cfg.data.max_seq_len), cfg.trainer.batch_size,
                          collator(tokenizer), cfg.seed)

    def evaluate(model, prefix, log_predictions):
        return evaluate_massive(model, tokenizer, ft, intents, slots, cfg.data.max_seq_len, prefix=prefix,
                                log_predictions=log_predictions, seed=cfg.seed)

    return teacher, student, stream, evaluate


def _xnli(cfg: DictConfig, teacher_in: Input, encoder, tokenizer):
    """Teacher, student, training stream and ``evaluate(model, prefix, log_predictions)`` for XNLI."""
    teacher = load_pair_classifier(teacher_in.path)
    student = build_pair_classifier(encoder, num_labels=teacher.config.num_labels,
                                    labels=[teacher.config.id2label[i] for i in range(teacher.config.num_labels)])
    pairs = train_pairs(cfg.eval.xnli, cfg.seed)  # the same sample as atm.stages.finetune_xnli.run
    mlflow.log_metric("data/train_examples", len(pairs))
    stream = pair_stream(tokenizer, pairs, cfg.eval.xnli.max_seq_len, cfg.trainer.batch_size, cfg.seed)

    def evaluate(model, prefix, log_predictions):
        return evaluate_xnli(model, tokenizer, list(cfg.stage.xnli_languages), cfg.eval.xnli, prefix=prefix)

    return teacher, student, stream, evaluate


@stage("distill_task", reads=("trainer", "data", "finetune", "distill", "eval"), check=check)
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Distil the ``teacher`` (a ``finetune`` or ``finetune_xnli`` run) into a student over the ``encoder``
    input; evaluate both and log the student/teacher ratios."""
    task = cfg.stage.task
    mlflow.set_tags({TAG_TASK: task, TAG_DATASETS: ",".join(datasets(cfg)),
                     TAG_TRAIN_LANGUAGES: ",".join(train_languages(cfg))})
    device = device_for(cfg.trainer)
    teacher_in, encoder_in = inputs["teacher"], inputs["encoder"]
    tokenizer = load_tokenizer(teacher_in.path)
    encoder, student_tokenizer = load_checkpoint(encoder_in.path)
    build = _massive if task == "massive" else _xnli
    teacher, student, stream, evaluate = build(cfg, teacher_in, encoder, tokenizer)
    check_same_tokenizer(tokenizer, student_tokenizer, teacher.config, encoder.config, teacher_in, encoder_in)
    del encoder
    loss = TaskDistillationLoss(cfg.distill, teacher.config, student.config, cfg.trainer.max_steps)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device)
    mlflow.log_metrics({"model/student_parameters": count_parameters(student),
                        "model/teacher_parameters": count_parameters(teacher)})

    def loss_fn(batch, step):
        with torch.no_grad():
            out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out_s = student(**batch)
        return loss(out_s, out_t, batch.get("slot_labels"), step)

    pruning = sweeps.pruning_callbacks(cfg, student, lambda: evaluate(student, f"eval/{task}", False))
    summary = fit(student, stream, loss_fn, cfg.trainer, desc="distill_task", callbacks=pruning,
                  state_dir=run_state_dir(cfg.trainer))

    prefix = f"eval/{task}"
    results = evaluate(student, prefix, True)
    results.update(evaluate(teacher, f"{prefix}_teacher", False))
    results.update(ratios(results, prefix, f"{prefix}_teacher"))
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_model(student, tokenizer, "checkpoint")
    return {**summary, **results, **cost.measure(student, tokenizer, cfg)}
