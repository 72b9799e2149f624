"""Stages ``pretrain_stage1`` (MLM on written text, from scratch) and ``pretrain_stage2`` (continue a Stage-1
checkpoint on spoken-form, in-domain text) — AlexaTM sec. 3.1-3.2."""

from __future__ import annotations

from omegaconf import DictConfig

from atm.distill.losses import mlm_ce
from atm.engine.loop import device_for
from atm.models.encoder import build_mlm, load_checkpoint, mlm_forward
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import check_mlm_data, train_mlm
from atm.stages.registry import stage


def check(cfg: DictConfig) -> None:
    """Config-time validation of the MLM data and stage keys (:func:`atm.stages.common.check_mlm_data`)."""
    check_mlm_data(cfg)


@stage("pretrain_stage1", "pretrain_stage2", reads=("model", "trainer", "data"), check=check,
       aliases={"stage1": "pretrain_stage1", "stage2": "pretrain_stage2"}, kinds=("mlm", "teacher"))
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Stage 1 builds ``model`` over the ``tokenizer_run`` input; Stage 2 loads the ``init`` checkpoint."""
    if "init" in inputs:
        model, tokenizer = load_checkpoint(inputs["init"].path)
    else:
        tokenizer = load_tokenizer(inputs["tokenizer_run"].path)
        model = build_mlm(cfg.model, tokenizer, max_seq_len=cfg.data.max_seq_len)
    model.to(device_for(cfg.trainer))

    def loss_fn(batch, step):
        masked = batch["labels"] != -100
        out = mlm_forward(model, batch["input_ids"], batch["attention_mask"], masked)
        return mlm_ce(out["logits"], batch["labels"][masked]), {}

    return train_mlm(cfg, model, model, tokenizer, loss_fn)
