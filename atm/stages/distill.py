"""Stages ``distill_intermediate`` and ``distill_final``: a student learns from a frozen teacher with the
objective of :mod:`atm.distill.objective` on (optionally augmented) MLM batches (AlexaTM sec. 3.3;
Distiller, He et al. 2021).

With ``teacher_next`` set (AlexaTM's recipe for the intermediate student) the student first learns from
``teacher`` (Stage 1) and switches to ``teacher_next`` (Stage 2) after ``distill.switch.steps`` steps or
when its held-out loss plateaus. With ``distill.cache.enabled`` the teachers' outputs are read from, or
written to, the teacher-output cache shared by every trial of a sweep (:mod:`atm.distill.cache`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from atm.data import corpora
from atm.distill import augment as A
from atm.distill.cache import TeacherCache, cache_key, check_cache_config
from atm.distill.objective import DistillationObjective, check_names
from atm.engine.loop import device_for
from atm.errors import AtmError
from atm.lineage import Input
from atm.models.attention import set_attention_scores
from atm.models.encoder import build_mlm, count_parameters, load_checkpoint, mlm_forward
from atm.probes.perplexity import mlm_perplexity
from atm.stages.common import check_mlm_data, count_at_least, train_mlm
from atm.stages.registry import stage

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Config-time validation: MLM data and stage keys (:func:`atm.stages.common.check_mlm_data`), loss names,
    weights and temperatures, mapping, augmentation, teacher switch and cache settings (AtmError naming the key).
    """
    check_mlm_data(cfg)
    check_names(cfg.distill)
    d = cfg.distill
    for key, value in (("hard_weight", d.get("hard_weight")), ("logit.weight", d.logit.get("weight")),
                       ("intermediate.weight", d.intermediate.get("weight"))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise AtmError(f"distill.{key}={value!r} must be a number >= 0")
    for key in ("temperature", "temperature_end"):
        value = d.logit.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise AtmError(f"distill.logit.{key}={value!r} must be a number > 0" + (" or null" if key != "temperature"
                                                                                    else ""))
    A.parse_config(cfg.augment)
    check_cache_config(cfg.distill)
    if d.switch.criterion not in ("steps", "plateau"):
        raise AtmError(f"distill.switch.criterion={d.switch.criterion!r} must be 'steps' or 'plateau'")
    for key in ("steps", "eval_every", "patience"):
        count_at_least(d.switch.get(key), f"distill.switch.{key}", 1 if key != "steps" else 0)


def check_inputs(cfg: DictConfig, models: dict) -> None:
    """Checks against the inputs' model configs, before any input is trained (:func:`atm.lineage.check_inputs`):
    the layer mapping must fit the teacher(s) (``models[role]``: its ``num_hidden_layers``, ...; None when unknown).

    Raises:
        AtmError: naming the role and ``distill.intermediate.layer_mapping``.
    """
    inter = cfg.distill.intermediate
    if not inter.get("loss"):
        return
    from atm.distill.mapping import get_mapping

    n_student = cfg.model.num_hidden_layers
    for role in ("teacher", "teacher_next"):
        teacher = models.get(role)
        if not teacher or not isinstance(teacher.get("num_hidden_layers"), int):
            continue
        try:
            pairs = get_mapping(inter.layer_mapping, teacher["num_hidden_layers"], n_student)
        except AtmError as err:
            raise AtmError(f"distill.intermediate.layer_mapping={inter.layer_mapping} with {role}={cfg.get(role)} "
                           f"({teacher['num_hidden_layers']} layers) and model={cfg.model.get('name')} "
                           f"({n_student} layers): {err}") from None
        if not pairs:
            raise AtmError(f"distill.intermediate.layer_mapping={inter.layer_mapping} maps no layer for "
                           f"{n_student} student and {teacher['num_hidden_layers']} teacher layers ({role}={cfg.get(role)})")


@dataclass
class Teacher:
    """A frozen teacher, its input record and (optionally) its output cache."""

    model: torch.nn.Module
    source: Input
    cache: TeacherCache | None = None
    since_step: int | None = None
    stats: dict = field(default_factory=dict)


def _cache_for(cfg: DictConfig, source: Input, objective: DistillationObjective) -> TeacherCache | None:
    c = cfg.distill.cache
    if not c.enabled:
        return None
    key = cache_key(teacher=source.run_id or str(source.path.resolve()), data=OmegaConf.to_container(cfg.data),
                    seed=cfg.seed, batch_size=cfg.trainer.batch_size, corpus=cfg.stage.corpus,
                    mlm_probability=cfg.stage.mlm_probability, augment=A.augmentation_key(cfg.augment),
                    positions=cfg.distill.logit.positions, top_k=c.top_k)
    hidden = {j for _, j in objective.pairs} if objective.needs_hidden_states else set()
    attention = {j - 1 for _, j in objective.pairs} if objective.needs_attentions else set()
    return TeacherCache(c.dir, key, c.top_k, hidden, attention)


@stage("distill_intermediate", "distill_final", reads=("model", "trainer", "data", "distill", "augment"), check=check,
       check_inputs=check_inputs,
       aliases={"intermediate": "distill_intermediate", "final": "distill_final"}, kinds=("mlm",))
def run(cfg: DictConfig, inputs: dict[str, Input]) -> dict[str, float]:
    """Build a fresh ``model`` student over the teacher's tokenizer and distil the teacher(s) into it."""
    device = device_for(cfg.trainer)
    sources = [inputs["teacher"]] + ([inputs["teacher_next"]] if "teacher_next" in inputs else [])
    loaded = [load_checkpoint(s.path) for s in sources]
    tokenizer = loaded[0][1]
    models = [model.to(device).eval().requires_grad_(False) for model, _ in loaded]
    for extra in models[1:]:
        if extra.config.vocab_size != models[0].config.vocab_size:
            raise AtmError(f"teacher_next has a vocabulary of {extra.config.vocab_size}, teacher of "
                           f"{models[0].config.vocab_size}: both teachers must share the tokenizer")
    student = build_mlm(cfg.model, tokenizer, max_seq_len=cfg.data.max_seq_len)
    objective = DistillationObjective(cfg.distill, models[0].config, student.config, cfg.trainer.max_steps)
    teachers = [Teacher(m, s, _cache_for(cfg, s, objective)) for m, s in zip(models, sources)]
    module = torch.nn.ModuleDict({"student": student, "objective": objective}).to(device)
    mlflow.log_metrics({"model/student_parameters": count_parameters(student),
                        "model/teacher_parameters": count_parameters(models[0]),
                        "model/objective_parameters": sum(p.numel() for p in objective.parameters())})
    outputs = {"output_hidden_states": objective.needs_hidden_states,
               "output_attentions": objective.needs_attentions}
    for model in (*models, student):
        set_attention_scores(model, objective.needs_attentions)
    # the current teacher, and the augmentation built around it (contextual augmentation asks the teacher)
    state = {"teacher": teachers[0], "augmentation": A.build_augmentation(cfg.augment, tokenizer=tokenizer,
                                                                          teacher=models[0])}

    def forward(model, batch, positions):
        if A.MIXUP_INDEX in batch:
            return A.mixup_mlm_forward(model, batch, positions, **outputs)
        return mlm_forward(model, batch["input_ids"], batch["attention_mask"], positions, **outputs)

    def teacher_outputs(batch, step):
        """The (augmented) batch of ``step`` and the current teacher's outputs on it, cached if enabled,
        plus the augmentation's metrics when it ran (not on a cache hit)."""
        teacher: Teacher = state["teacher"]
        augmentation = state["augmentation"]
        shape = (student.config.vocab_size, teacher.model.config.num_hidden_layers + 1,
                 teacher.model.config.num_hidden_layers)
        if teacher.cache is not None:
            hit = teacher.cache.load(step, *shape)
            if hit is not None:
                cached, out_t = hit
                return {k: v.to(device) for k, v in cached.items()}, _to(out_t, device), {}
        metrics = {}
        if augmentation is not None:
            batch = augmentation.at_step(batch, step)
            metrics = augmentation.last_metrics
        positions = objective.positions(batch["labels"], batch["attention_mask"])
        with torch.no_grad():
            out_t = forward(teacher.model, batch, positions)
        if teacher.cache is None:
            return batch, out_t, metrics
        teacher.cache.store(step, batch, out_t)
        # read back what was stored, so that cache misses and hits train on the same (top-k) teacher
        cached, out_t = teacher.cache.read(step, *shape)
        return {k: v.to(device) for k, v in cached.items()}, _to(out_t, device), metrics

    def loss_fn(batch, step):
        batch, out_t, metrics = teacher_outputs(batch, step)
        labels = batch["labels"]
        positions = objective.positions(labels, batch["attention_mask"])
        out_s = forward(student, batch, positions)
        loss, parts = objective(out_s, out_t, labels[positions], step, batch.get(A.MIXUP_LAMBDA, 1.0))
        return loss, {**parts, **metrics}

    callbacks = [TeacherSwitch(cfg, teachers, state, student, tokenizer)] if len(teachers) > 1 else []
    try:
        metrics = train_mlm(cfg, module, student, tokenizer, loss_fn, callbacks)
    finally:
        set_attention_scores(student, False)
    for i, teacher in enumerate(teachers):
        if teacher.cache is not None:
            prefix = f"cache/teacher{i}"
            metrics.update({f"{prefix}/hits": float(teacher.cache.hits), f"{prefix}/misses": float(teacher.cache.misses),
                            f"{prefix}/size_mb": teacher.cache.size_bytes() / 2**20})
    if len(teachers) > 1 and teachers[1].since_step is not None:
        metrics["distill/switch_step"] = float(teachers[1].since_step)
    mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("cache/", "distill/"))})
    return metrics


def _to(out: dict, device: torch.device) -> dict:
    def move(x):
        if torch.is_tensor(x):
            return x.to(device)
        if isinstance(x, tuple):
            return tuple(move(v) for v in x)
        return x

    return {k: move(v) for k, v in out.items()}


class TeacherSwitch:
    """``fit`` callback of AlexaTM's two-step recipe: switch from the first to the second teacher after
    ``distill.switch.steps`` steps (``criterion: steps``) or once the student's held-out spoken MLM loss,
    measured every ``eval_every`` steps, has not improved by ``min_delta`` for ``patience`` measurements
    (``criterion: plateau``). Logs ``distill/heldout_loss`` and ``distill/teacher`` (0 or 1) per step."""

    def __init__(self, cfg: DictConfig, teachers: list[Teacher], state: dict, student, tokenizer):
        self.cfg, self.teachers, self.state = cfg.distill.switch, teachers, state
        self.augment_cfg = cfg.augment
        self.student, self.tokenizer = student, tokenizer
        self.max_seq_len = cfg.data.max_seq_len
        self.heldout = ([line.text for line in corpora.heldout_spoken(cfg.data.heldout.max_lines_per_lang)]
                        if self.cfg.criterion == "plateau" else [])
        self.best, self.bad = float("inf"), 0

    def __call__(self, step: int) -> None:
        if self.state["teacher"] is self.teachers[1]:
            return
        if self.cfg.criterion == "steps":
            switch = step >= self.cfg.steps
        else:
            if step % self.cfg.eval_every:
                return
            loss = math.log(mlm_perplexity(self.student, self.tokenizer, self.heldout, self.max_seq_len))
            self.student.train()
            mlflow.log_metric("distill/heldout_loss", loss, step=step)
            if loss < self.best - self.cfg.min_delta:
                self.best, self.bad = loss, 0
            else:
                self.bad += 1
            switch = self.bad >= self.cfg.patience
        if switch:
            self._switch(since_step=step + 1)
            mlflow.log_metric("distill/teacher", 1, step=step + 1)
            log.info("switching to teacher_next (%s) after step %d", self.teachers[1].source.run_id, step)

    def _switch(self, since_step: int) -> None:
        self.teachers[1].since_step = since_step
        self.state["teacher"] = self.teachers[1]
        self.state["augmentation"] = A.build_augmentation(self.augment_cfg, tokenizer=self.tokenizer,
                                                          teacher=self.teachers[1].model)

    def state_dict(self) -> dict:
        """The switch's progress, saved with the training state (``fit``'s exact resume): the first step
        taught by the second teacher (None before the switch) and the plateau criterion's counters."""
        switched = self.state["teacher"] is self.teachers[1]
        return {"since_step": self.teachers[1].since_step if switched else None, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: a run resumed after the switch goes on with the second teacher."""
        self.best, self.bad = state["best"], state["bad"]
        if state["since_step"] is not None:
            self._switch(state["since_step"])
