"""Parts shared by the stages that train masked-language models (pretraining and distillation)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig

from atm import sweeps, tracking
from atm.data import corpora
from atm.data.collate import batch_stream, text_mlm_collator
from atm.engine.deepspeed import world
from atm.engine.loop import LossFn, fit
from atm.engine.state import run_state_dir
from atm.errors import AtmError
from atm.models import cost
from atm.models.encoder import save_checkpoint


def corpus_lines(name: str, data_cfg: DictConfig, seed: int) -> list[str]:
    """Text of pretraining corpus ``name`` (``written``: Stage 1, ``spoken``: Stage 2), capped per source."""
    if name == "written":
        lines = corpora.written_corpus(data_cfg.written.max_lines_per_source, seed=seed)
    elif name == "spoken":
        lines = corpora.spoken_corpus(data_cfg.spoken.max_lines_per_source, seed=seed)
    else:
        raise AtmError(f"stage.corpus={name!r} must be 'written' or 'spoken'")
    return [line.text for line in lines]


def train_mlm(cfg: DictConfig, module: torch.nn.Module, model, tokenizer, loss_fn: LossFn,
              callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, float]:
    """Train ``module`` (which contains ``model``) with ``loss_fn`` on MLM batches of ``stage.corpus``.

    Saves ``model`` + ``tokenizer`` every ``trainer.save_every`` steps (``checkpoints/step-<N>``) and at the
    end (``checkpoint``), then scores held-out written and spoken perplexity and measures ``model``'s cost
    (:func:`atm.models.cost.measure`). In a sweep with a pruner, the perplexities are also scored and
    reported every ``report_every`` steps (:func:`atm.sweeps.pruning_callbacks`). Returns the final metrics.
    """
    from atm.stages.evaluate import heldout_perplexities

    lines = [line for line in corpus_lines(cfg.stage.corpus, cfg.data, cfg.seed) if line.strip()]
    mlflow.log_metric("data/train_lines", len(lines))
    stream = batch_stream(lines, cfg.trainer.batch_size,
                          text_mlm_collator(tokenizer, cfg.data.max_seq_len, cfg.stage.mlm_probability), cfg.seed)

    def evaluate() -> dict[str, float]:
        return heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)

    pruning = sweeps.pruning_callbacks(cfg, module, evaluate)  # [] outside a pruned sweep
    summary = fit(module, stream, loss_fn, cfg.trainer,
                  callbacks=[checkpoint_logger(model, tokenizer, cfg.trainer), *callbacks, *pruning],
                  desc=cfg.stage.name, state_dir=run_state_dir(cfg.trainer))
    log_model(model, tokenizer, tracking.CHECKPOINT)
    metrics = heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)
    mlflow.log_metrics(metrics, step=cfg.trainer.max_steps)
    return {**summary, **metrics, **cost.measure(model, tokenizer, cfg)}


def log_model(model, tokenizer, artifact_path: str) -> None:
    """Save ``model`` + ``tokenizer`` with ``save_pretrained`` and log them under ``artifact_path`` (on rank 0
    only, when several processes train)."""
    if world()[0] != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        save_checkpoint(model, tokenizer, out)
        tracking.log_checkpoint(out, artifact_path)


def checkpoint_logger(model, tokenizer, trainer_cfg: DictConfig) -> Callable[[int], None]:
    """A ``fit`` callback logging an intermediate checkpoint ``checkpoints/step-<N>`` every
    ``trainer.save_every`` steps (before the last step, which :func:`train_mlm` saves as ``checkpoint``)."""

    def on_step(step: int) -> None:
        every = trainer_cfg.get("save_every")
        if every and step % every == 0 and step < trainer_cfg.max_steps:
            log_model(model, tokenizer, f"{tracking.CHECKPOINTS}/step-{step:06d}")

    return on_step
