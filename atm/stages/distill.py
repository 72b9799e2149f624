"""Stages ``distill_intermediate`` and ``distill_final``: a student learns from a frozen teacher with the
objective of :mod:`atm.distill.objective` on MLM batches (AlexaTM sec. 3.3; Distiller, He et al. 2021)."""

from __future__ import annotations

import mlflow
import torch
from omegaconf import DictConfig

from atm.distill.objective import DistillationObjective
from atm.engine.loop import device_for
from atm.models.encoder import build_mlm, count_parameters, load_mlm, mlm_forward
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import train_mlm


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Build a fresh ``model`` student over the teacher's tokenizer and distil the ``teacher`` input into it."""
    device = device_for(cfg.trainer)
    tokenizer = load_tokenizer(inputs["teacher"].path)
    teacher = load_mlm(inputs["teacher"].path).to(device).eval().requires_grad_(False)
    student = build_mlm(cfg.model, tokenizer, max_seq_len=cfg.data.max_seq_len)
    objective = DistillationObjective(cfg.distill, teacher.config, student.config)
    module = torch.nn.ModuleDict({"student": student, "objective": objective}).to(device)
    mlflow.log_metrics({"model/student_parameters": count_parameters(student),
                        "model/teacher_parameters": count_parameters(teacher)})
    hidden = objective.needs_hidden_states

    def loss_fn(batch):
        labels, mask = batch["labels"], batch["attention_mask"]
        positions = objective.positions(labels, mask)
        with torch.no_grad():
            out_t = mlm_forward(teacher, batch["input_ids"], mask, positions, output_hidden_states=hidden)
        out_s = mlm_forward(student, batch["input_ids"], mask, positions, output_hidden_states=hidden)
        return objective(out_s, out_t, labels[positions])

    return train_mlm(cfg, module, student, tokenizer, loss_fn)
