"""The one training loop: every stage (MLM pretraining, distillation, fine-tuning) calls :func:`fit`.

Plain PyTorch: AdamW (no weight decay on biases and LayerNorm weights), linear warm-up then linear
decay, gradient clipping, optional bf16 autocast, metrics to the active MLflow run every
``trainer.log_every`` steps, a progress bar, and callbacks after every step.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

LossFn = Callable[[dict, int], "tuple[torch.Tensor, dict[str, float]]"]


def device_for(trainer_cfg: DictConfig) -> torch.device:
    """``trainer.device``: ``auto`` picks CUDA when available, else CPU."""
    name = trainer_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def to_device(batch: Mapping, device: torch.device) -> dict:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_optimizer(module: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay for 1-D tensors (biases, LayerNorm weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def fit(module: torch.nn.Module, stream: Iterator[dict], loss_fn: LossFn, cfg: DictConfig, *,
        callbacks: Sequence[Callable[[int], None]] = (), desc: str = "train",
        metric_prefix: str = "train", log_metrics: bool = True) -> dict[str, float]:
    """Train ``module`` for ``cfg.max_steps`` optimiser steps on batches from ``stream``.

    Args:
        module: everything trained (e.g. a student plus its projections); already on its device.
        stream: endless iterator of CPU batches (dicts of tensors); moved to the module's device here.
        loss_fn: ``(batch, step) -> (scalar loss, {part name: float})``; ``step`` counts from 1.
        cfg: the ``trainer`` config (max_steps, lr, weight_decay, warmup_steps, grad_clip, precision,
            log_every, save_every).
        callbacks: each called with the step number after every optimiser step (checkpointing,
            evaluation, teacher switching).

    Returns:
        ``{"<prefix>/loss": mean loss of the last logging window, "<prefix>/step": steps,
        "<prefix>/seconds": wall time, "<prefix>/samples_per_second": throughput}``.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    import mlflow
    from transformers import get_linear_schedule_with_warmup

    device = next(module.parameters()).device
    optimizer = make_optimizer(module, cfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    module.train()
    window: dict[str, float] = {}
    window_steps, samples, start = 0, 0, time.perf_counter()
    last: dict[str, float] = {}
    progress = tqdm(range(1, cfg.max_steps + 1), desc=desc, leave=False, mininterval=2.0)
    for step in progress:
        batch = to_device(next(stream), device)
        with autocast:
            loss, parts = loss_fn(batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        samples += int(batch["input_ids"].shape[0])
        window_steps += 1
        for name, value in {"loss": loss.item(), **parts}.items():
            window[name] = window.get(name, 0.0) + float(value)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last = {f"{metric_prefix}/{k}": v / window_steps for k, v in window.items()}
            last[f"{metric_prefix}/lr"] = scheduler.get_last_lr()[0]
            if log_metrics:
                mlflow.log_metrics(last, step=step)
            progress.set_postfix(loss=f"{last[f'{metric_prefix}/loss']:.3f}")
            window, window_steps = {}, 0
        for callback in callbacks:
            callback(step)
    seconds = time.perf_counter() - start
    totals = {f"{metric_prefix}/step": float(cfg.max_steps), f"{metric_prefix}/seconds": seconds,
              f"{metric_prefix}/samples_per_second": samples / max(seconds, 1e-9)}
    if log_metrics:
        mlflow.log_metrics(totals, step=cfg.max_steps)
    module.eval()
    return {f"{metric_prefix}/loss": last.get(f"{metric_prefix}/loss", math.nan), **totals}
