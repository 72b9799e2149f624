"""The one training loop: every stage (MLM pretraining, distillation, fine-tuning) calls :func:`fit`.

AdamW (no weight decay on biases and LayerNorm weights), a learning-rate schedule (``trainer.schedule``:
linear warm-up then linear decay, or the triangular one-cycle of short budgets), gradient accumulation
(``trainer.grad_accum_steps``) and clipping, optional bf16 autocast (``trainer.precision=auto``: bf16 where
the hardware computes it natively), optional ``torch.compile`` of the encoders, activation checkpointing,
metrics to the active MLflow run every ``trainer.log_every`` steps, a progress bar, and callbacks after every
step. Two backends (``trainer.backend``): ``torch`` (plain PyTorch, one process) and ``deepspeed``
(:mod:`atm.engine.deepspeed`: ZeRO 0-3, bf16/fp16, one or many processes). With a state directory ``fit``
writes a resumable training state every ``trainer.state_every`` steps and continues from the newest one it
finds there (:mod:`atm.engine.state`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atm.engine import state as S
from atm.errors import AtmError, Interrupted

BACKENDS = ("torch", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
SCHEDULES = ("linear", "one_cycle", "constant")

LossFn = Callable[[dict, int], "tuple[torch.Tensor, dict[str, float]]"]


class StopTraining(Exception):
    """Raised by a ``fit`` callback to end training after the current step (early stopping)."""


def device_for(trainer_cfg: DictConfig) -> torch.device:
    """``trainer.device``: ``auto`` picks CUDA when available, else CPU. Under a launcher (``LOCAL_RANK``
    set) each process of a node gets its own GPU, ``cuda:<LOCAL_RANK>``."""
    import os

    name = trainer_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(name)
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


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or
    AMX-BF16 instructions (PyTorch's ``torch.cpu._is_avx512_bf16_supported``/``_is_amx_tile_supported``, which
    read the CPUID flags ``avx512_bf16``/``amx_bf16`` shown in ``/proc/cpuinfo``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` for ``device``: ``auto`` is ``bf16`` where :func:`bf16_native`, else ``fp32``;
    anything else is returned unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_native(device) else "fp32"


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig):
    """The learning-rate schedule ``trainer.schedule`` over ``trainer.max_steps`` optimiser steps (a
    ``LambdaLR`` multiplying ``trainer.lr``):

    * ``linear`` (default): linear warm-up from 0 over ``trainer.warmup_steps``, then linear decay to 0 at
      ``max_steps`` (BERT, Devlin et al. 2019; RoBERTa);
    * ``one_cycle``: the triangular one-cycle schedule (Smith & Topin 2019) that Cramming (Geiping &
      Goldstein 2022, sec. 4.3) finds best for a fixed budget: linear warm-up to the peak at
      ``trainer.peak_fraction`` (default 0.5) of ``max_steps``, then linear decay to 0 at ``max_steps``;
      ``warmup_steps`` is not used;
    * ``constant``: warm-up over ``warmup_steps``, then constant.
    """
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    schedule, steps = cfg.get("schedule", "linear"), int(cfg.max_steps)
    if schedule == "one_cycle":
        peak = max(1, round(float(cfg.get("peak_fraction", 0.5)) * steps))
        return get_linear_schedule_with_warmup(optimizer, min(peak, steps), steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, min(cfg.warmup_steps, steps))
    return get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, steps), steps)


def compile_encoders(module: torch.nn.Module) -> int:
    """``torch.compile`` (in place, ``nn.Module.compile``: parameter names and state dicts unchanged) the
    forward pass of every Hugging Face base model (encoder) inside ``module``; returns how many. Inputs of
    new shapes recompile, after the second one with dynamic shapes."""
    from transformers import PreTrainedModel

    bases = [m for m in module.modules() if isinstance(m, PreTrainedModel) and m.base_model is m]
    for base in bases:
        base.compile()
    return len(bases)


def check_trainer(cfg: DictConfig) -> None:
    """Config-time checks of the ``trainer`` config (before inputs are resolved or anything trains).

    Raises:
        AtmError: naming the key: a count out of range (``max_steps``, ``batch_size``, ``grad_accum_steps``,
            ``log_every`` >= 1; ``warmup_steps`` >= 0; ``save_every``, ``state_every``, ``keep_last`` null or
            >= 1), a rate out of range (``lr`` > 0; ``weight_decay``, ``grad_clip`` >= 0, ``grad_clip`` may be
            null), an unknown device, backend, precision or schedule, ``peak_fraction`` outside (0, 1),
            ``compile``/``resume``/``activation_checkpointing`` not a boolean, fp16 without DeepSpeed, several
            processes with the torch backend, DeepSpeed config problems (:func:`atm.engine.deepspeed.check`).
    """
    from atm.engine import deepspeed as D

    _check_trainer_values(cfg)
    backend = cfg.get("backend", "torch")
    if backend not in BACKENDS:
        raise AtmError(f"trainer.backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if cfg.precision not in PRECISIONS:
        raise AtmError(f"trainer.precision={cfg.precision!r} must be one of {', '.join(PRECISIONS)}")
    if cfg.get("schedule", "linear") not in SCHEDULES:
        raise AtmError(f"trainer.schedule={cfg.schedule!r} must be one of {', '.join(SCHEDULES)}")
    peak = cfg.get("peak_fraction", 0.5)
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0.0 < peak < 1.0:
        raise AtmError(f"trainer.peak_fraction={peak!r} must be a number in (0, 1)")
    if not isinstance(cfg.get("compile", False), bool):
        raise AtmError(f"trainer.compile={cfg.compile!r} must be true or false")
    if backend == "torch":
        if cfg.precision == "fp16":
            raise AtmError("trainer.precision=fp16 needs loss scaling: use trainer=deepspeed (or bf16)")
        if D.world()[1] > 1:
            raise AtmError(f"{D.world()[1]} processes need trainer=deepspeed (trainer.backend=torch trains in one)")
    else:
        D.check(cfg)


#: The trainer's counts: key -> (smallest value, null allowed). The loop reads them as Python ints.
_TRAINER_COUNTS = {"max_steps": (1, False), "batch_size": (1, False), "grad_accum_steps": (1, False),
                   "log_every": (1, False), "warmup_steps": (0, False), "save_every": (1, True),
                   "state_every": (1, True), "keep_last": (1, True)}
#: The trainer's rates: key -> (lower bound, bound included, null allowed).
_TRAINER_RATES = {"lr": (0.0, False, False), "weight_decay": (0.0, True, False), "grad_clip": (0.0, True, True)}


def _check_trainer_values(cfg: DictConfig) -> None:
    """Range checks of the ``trainer`` counts, rates, device and flags (:func:`check_trainer`).

    Raises:
        AtmError: ``trainer.<key>=<value> must be ...``, naming the first bad key.
    """
    for key, (low, nullable) in _TRAINER_COUNTS.items():
        value = cfg.get(key, None if nullable else low)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AtmError(f"trainer.{key}={value!r} must be an integer >= {low}" + (" or null" if nullable else ""))
    for key, (low, closed, nullable) in _TRAINER_RATES.items():
        value = cfg.get(key)
        if value is None and nullable:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not (value >= low if closed else value > low)):
            bound = f">= {low:g}" if closed else f"> {low:g}"
            raise AtmError(f"trainer.{key}={value!r} must be a number {bound}" + (" or null" if nullable else ""))
    device = cfg.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise AtmError(f"trainer.device={device!r} must be auto, cpu, cuda or cuda:<index>")
    for key in ("compile", "resume", "activation_checkpointing"):
        if not isinstance(cfg.get(key, False), bool):
            raise AtmError(f"trainer.{key}={cfg.get(key)!r} must be true or false")


def enable_activation_checkpointing(module: torch.nn.Module) -> int:
    """Recompute activations in the backward pass (Chen et al. 2016) in every Hugging Face model inside
    ``module`` (``gradient_checkpointing_enable``); returns how many models were switched."""
    count = 0
    for sub in module.modules():
        if getattr(sub, "supports_gradient_checkpointing", False) and hasattr(sub, "gradient_checkpointing_enable"):
            sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            count += 1
    return count


class TorchBackend:
    """``fit``'s optimiser side in plain PyTorch, one process: gradients of ``grad_accum_steps``
    micro-batches are summed (each loss divided by their number), then clipped, stepped, zeroed."""

    rank, world_size = 0, 1

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: DictConfig):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.device = next(module.parameters()).device
        self.accum, self.clip = int(cfg.get("grad_accum_steps", 1)), cfg.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def micro_step(self) -> None:
        """Gradients accumulate in ``.grad`` between micro-batches."""

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def mean(self, values: list[float]) -> list[float]:
        return values

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def describe(self) -> dict[str, float]:
        return {}


def make_backend(module: torch.nn.Module, cfg: DictConfig):
    """The backend named by ``trainer.backend`` over AdamW and :func:`make_scheduler`
    (:class:`TorchBackend` or :class:`atm.engine.deepspeed.DeepSpeedBackend`); ``precision=auto`` must have
    been resolved (:func:`resolve_precision`)."""
    check_trainer(cfg)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if cfg.get("backend", "torch") == "deepspeed":
        from atm.engine.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(module, optimizer, scheduler, cfg)
    return TorchBackend(module, optimizer, scheduler, cfg)


def fit(module: torch.nn.Module, stream: Iterator[dict], loss_fn: LossFn, cfg: DictConfig, *,
        callbacks: Sequence[Callable[[int], None]] = (), desc: str = "train",
        metric_prefix: str = "train", log_metrics: bool = True,
        state_dir: str | Path | None = None) -> dict[str, float]:
    """Train ``module`` for ``cfg.max_steps`` optimiser steps on batches from ``stream``.

    Args:
        module: everything trained (e.g. a student plus its projections); already on its device.
        stream: endless iterator of CPU batches (dicts of tensors); moved to the module's device here. With
            several processes it must have ``shard(rank, world_size)``, and to resume ``state_dict()`` /
            ``load_state_dict()`` (:class:`atm.data.collate.BatchStream` has both).
        loss_fn: ``(batch, step) -> (scalar loss, {part name: float})``; ``step`` counts from 1.
        cfg: the ``trainer`` config (max_steps, batch_size, grad_accum_steps, lr, weight_decay,
            warmup_steps, schedule, peak_fraction, grad_clip, precision, compile, backend, deepspeed,
            activation_checkpointing, log_every, state_every, keep_last); ``precision=auto`` is resolved
            for the module's device (:func:`resolve_precision`) and recorded as the run tag ``atm.precision``.
        callbacks: each called with the step number after every optimiser step (checkpointing,
            evaluation, teacher switching, pruning, early stopping); their exceptions propagate, except
            :class:`StopTraining`, which ends training after that step (the remaining callbacks still run). A callback with
            ``state_dict()``/``load_state_dict()`` has its state saved and restored with the training state.
        state_dir: where this run's resumable states live (:func:`atm.engine.state.run_state_dir`); None:
            no state. ``fit`` resumes from the newest state there, and writes one every
            ``cfg.state_every`` steps and after the last step. Only rank 0 writes and logs.

    Each optimiser step consumes ``grad_accum_steps`` micro-batches of ``batch_size`` on each of the
    ``world_size`` processes. The logged loss of a step is the mean over its micro-batches and ranks.

    Returns:
        ``{"<prefix>/loss": mean loss of the last logging window, "<prefix>/step": steps trained (fewer than
        ``max_steps`` after :class:`StopTraining`),
        "<prefix>/seconds": wall time, "<prefix>/samples_per_second": throughput}``.

    Raises:
        FloatingPointError: the loss became NaN or infinite.
        atm.errors.Interrupted: SIGINT (Ctrl-C) arrived: one line ``interrupted at step N; rerun the same command
            to resume ...`` (exit status 130 in the CLI); the active MLflow run has been ended KILLED (rank 0), a
            state write in progress was completed first (:func:`atm.engine.state.deferred_sigint`).
        AtmError: bad trainer config (:func:`check_trainer`); an unreadable state (:func:`atm.engine.state.load`);
            a state of a different number of processes; the run is being trained by another process.
    """
    import mlflow
    from omegaconf import OmegaConf

    precision = resolve_precision(cfg.precision, next(module.parameters()).device)
    if precision != cfg.precision:
        cfg = OmegaConf.merge(cfg, {"precision": precision})
    backend = make_backend(module, cfg)
    module, device, main = backend.module, backend.device, backend.rank == 0
    if cfg.get("activation_checkpointing"):
        enable_activation_checkpointing(module)
    if cfg.get("compile"):
        compile_encoders(module)
    if backend.world_size > 1:
        if not hasattr(stream, "shard"):
            raise AtmError(f"{desc}: {backend.world_size} processes need a shardable batch stream")
        stream.shard(backend.rank, backend.world_size)
    log_metrics = log_metrics and main
    accum = int(cfg.get("grad_accum_steps", 1))
    use_autocast = precision == "bf16" and isinstance(backend, TorchBackend)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)
    run_dir = Path(state_dir) if state_dir is not None else None
    progress_state = {"step": 0, "window": {}, "window_steps": 0, "samples": 0, "seconds": 0.0, "last": {}}
    with S.claim(run_dir) if run_dir is not None and main else nullcontext(), \
            _interruption(cfg, run_dir, main) as interruption:
        if run_dir is not None:
            _resume(run_dir, backend, stream, callbacks, progress_state)
        if log_metrics:
            mlflow.set_tag("atm.precision", precision)
        if log_metrics and backend.describe():
            mlflow.log_metrics(backend.describe(), step=progress_state["step"])
        module.train()
        window, window_steps = progress_state["window"], progress_state["window_steps"]
        samples, last = progress_state["samples"], progress_state["last"]
        start = time.perf_counter() - progress_state["seconds"]
        first = progress_state["step"] + 1
        progress = tqdm(range(first, cfg.max_steps + 1), desc=desc, leave=False, mininterval=2.0,
                        initial=first - 1, total=cfg.max_steps, **({} if main else {"disable": True}))
        interruption.progress = progress
        for step in progress:
            interruption.step = step
            sums: dict[str, float] = {}
            for _ in range(accum):
                batch = to_device(next(stream), device)
                with autocast:
                    loss, parts = loss_fn(batch, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
                backend.backward(loss)
                backend.micro_step()
                samples += int(batch["input_ids"].shape[0]) * backend.world_size
                for name, value in {"loss": loss.item(), **parts}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) / accum
            backend.step()
            names = sorted(sums)  # every rank reports the same parts
            for name, value in zip(names, backend.mean([sums[n] for n in names])):
                window[name] = window.get(name, 0.0) + value
            window_steps += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = {f"{metric_prefix}/{k}": v / window_steps for k, v in window.items()}
                last[f"{metric_prefix}/lr"] = backend.scheduler.get_last_lr()[0]
                if log_metrics:
                    mlflow.log_metrics(last, step=step)
                progress.set_postfix(loss=f"{last[f'{metric_prefix}/loss']:.3f}")
                window, window_steps = {}, 0
            stop = False
            for callback in callbacks:
                try:
                    callback(step)
                except StopTraining:
                    stop = True
            every = cfg.get("state_every")
            if run_dir is not None and every and (step % every == 0 or step == cfg.max_steps or stop):
                _save(run_dir, step, backend, stream, callbacks, cfg,
                      {"window": window, "window_steps": window_steps, "samples": samples,
                       "seconds": time.perf_counter() - start, "last": last})
            if stop:
                if window_steps:
                    last = {f"{metric_prefix}/{k}": v / window_steps for k, v in window.items()}
                break
        seconds = time.perf_counter() - start
    totals = {f"{metric_prefix}/step": float(step if cfg.max_steps >= first else cfg.max_steps),
              f"{metric_prefix}/seconds": seconds,
              f"{metric_prefix}/samples_per_second": samples / max(seconds, 1e-9)}
    if log_metrics:
        mlflow.log_metrics(totals, step=cfg.max_steps)
    module.eval()
    return {f"{metric_prefix}/loss": last.get(f"{metric_prefix}/loss", math.nan), **totals}


class _Interruption:
    """What :func:`_interruption` needs to report a Ctrl-C: the step being trained and the progress bar."""

    step: int | None = None
    progress: Any = None


@contextmanager
def _interruption(cfg: DictConfig, run_dir: Path | None, main: bool) -> Iterator[_Interruption]:
    """Turn a ``KeyboardInterrupt`` inside the block into :class:`atm.errors.Interrupted` (one line saying how
    to resume), after ending the active MLflow run ``KILLED`` on rank 0 (a killed run is resumable)."""
    import mlflow

    holder = _Interruption()
    try:
        yield holder
    except KeyboardInterrupt:
        if holder.progress is not None:
            holder.progress.close()
        if main and mlflow.active_run() is not None:
            mlflow.end_run("KILLED")
        at = f"at step {holder.step}" if holder.step is not None else "before the first step"
        found = S.latest(run_dir) if run_dir is not None else None
        if found is not None:
            how = f"resume (from its training state {found})"
        elif run_dir is not None:
            how = f"start over (no training state was written yet; trainer.state_every={cfg.get('state_every')})"
        else:
            how = "start over (trainer.state_every is unset: set it to make a run resumable)"
        raise Interrupted(f"interrupted {at}; rerun the same command to {how}", holder.step or 0) from None


def _stateful(callbacks: Sequence[Callable]) -> dict[str, Any]:
    return {str(i): c for i, c in enumerate(callbacks) if hasattr(c, "state_dict") and hasattr(c, "load_state_dict")}


def _save(run_dir: Path, step: int, backend, stream, callbacks, cfg: DictConfig, progress: dict) -> None:
    """Write the training state after ``step`` (rank 0; every rank contributes its RNG state)."""
    rng = backend.gather(S.capture_rng())
    optimizer = backend.optimizer_state()  # collective with ZeRO 1-2: every rank takes part
    if backend.rank != 0:
        return
    trainer_state = {"step": step, "world_size": backend.world_size, "rng": rng,
                     "data": stream.state_dict() if hasattr(stream, "state_dict") else None,
                     "callbacks": {k: c.state_dict() for k, c in _stateful(callbacks).items()},
                     **optimizer, **progress}
    S.save(run_dir, step, backend.module.state_dict(), trainer_state, cfg.get("keep_last"), backend.world_size)


def _resume(run_dir: Path, backend, stream, callbacks, progress: dict) -> None:
    """Load the newest state of ``run_dir`` (read and verified on rank 0, sent to every rank) into the
    module, optimizer, scheduler, data stream, callbacks, RNGs and ``progress``; nothing if none."""
    loaded = None
    if backend.rank == 0:
        found = S.latest(run_dir)
        loaded = S.load(found) if found is not None else None
    loaded = backend.broadcast(loaded)
    if loaded is None:
        return
    model_state, trainer_state, _ = loaded
    if int(trainer_state["world_size"]) != backend.world_size:
        raise AtmError(f"training state {run_dir}/step-{trainer_state['step']:06d} was written by "
                       f"{trainer_state['world_size']} processes, this run has {backend.world_size}: "
                       "restart with the same number")
    if trainer_state["data"] is None or not hasattr(stream, "load_state_dict"):
        raise AtmError(f"training state {run_dir}: the batch stream cannot resume (no data position)")
    backend.module.load_state_dict(model_state)
    backend.load_optimizer_state(trainer_state)
    try:
        stream.load_state_dict(trainer_state["data"])
    except ValueError as err:
        raise AtmError(f"training state {run_dir}: {err}") from None
    for key, callback in _stateful(callbacks).items():
        if key in trainer_state["callbacks"]:
            callback.load_state_dict(trainer_state["callbacks"][key])
    S.restore_rng(trainer_state["rng"][backend.rank])
    progress.update({k: trainer_state[k] for k in ("step", "window", "window_steps", "samples", "seconds", "last")})
