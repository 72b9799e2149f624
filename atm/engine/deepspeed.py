"""The DeepSpeed backend of :func:`atm.engine.loop.fit` (``trainer=deepspeed``; Rasley et al. 2020, ZeRO:
Rajbhandari et al. 2020).

``fit`` stays the one loop: :class:`DeepSpeedBackend` replaces the plain optimizer calls by
``engine.backward`` / ``engine.step`` of :func:`deepspeed.initialize` over the same AdamW and linear
schedule. The DeepSpeed JSON config is derived from the trainer config (:func:`ds_config`):

==================================  ======================================================
DeepSpeed key                       trainer key
==================================  ======================================================
train_micro_batch_size_per_gpu      ``trainer.batch_size`` (per rank)
gradient_accumulation_steps         ``trainer.grad_accum_steps``
train_batch_size                    batch_size x grad_accum_steps x world size
gradient_clipping                   ``trainer.grad_clip`` (null: 0, off)
bf16.enabled / fp16.enabled         ``trainer.precision`` (bf16 | fp16 | fp32)
zero_optimization.stage             ``trainer.deepspeed.zero_stage`` (0-3)
==================================  ======================================================

``trainer.deepspeed.config`` may name a DeepSpeed JSON file for everything else (offload, communication,
...); a key in it that contradicts the trainer config, or an ``optimizer``/``scheduler`` section (atm builds
those), is a one-line :class:`AtmError` before training. Launch with ``torchrun`` or the ``deepspeed``
launcher; one process needs no launcher. On CPU the collective backend is gloo.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from atm.errors import AtmError

if TYPE_CHECKING:
    import torch

# DeepSpeed key path -> (trainer key named in errors, how to read it from the trainer config)
_OWNED = {
    "train_micro_batch_size_per_gpu": "trainer.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "train_batch_size": "trainer.batch_size x trainer.grad_accum_steps x world size",
    "gradient_clipping": "trainer.grad_clip",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "zero_optimization.stage": "trainer.deepspeed.zero_stage",
}
# Python objects in a ZeRO 1-2 optimizer state that torch.load(weights_only=True) cannot read; loading a
# checkpoint of the same layout does not need them.
_ZERO_OBJECTS = ("zero_stage", "param_slice_mappings")
_ATM_BUILDS = {"optimizer": "the optimizer (AdamW: trainer.lr, trainer.weight_decay)",
               "scheduler": "the schedule (trainer.schedule, trainer.warmup_steps)"}


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process as set by ``torchrun`` / the ``deepspeed`` launcher (0, 1 alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _read_user_config(path: str) -> dict:
    file = Path(path).expanduser()
    try:
        value = json.loads(file.read_text())
    except OSError as err:
        raise AtmError(f"trainer.deepspeed.config={path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise AtmError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise AtmError(f"{file}: a DeepSpeed config must be a JSON object")
    return value


def _get(tree: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def ds_config(trainer_cfg: DictConfig, world_size: int | None = None) -> dict:
    """The DeepSpeed config dict of ``trainer_cfg`` (see the module doc), merged with the user's file.

    Raises:
        AtmError: unreadable or invalid user file (``file:line``), a user key contradicting the trainer
            config, an ``optimizer``/``scheduler`` section, a ZeRO stage outside 0-3, fp16 on a device
            without fp16 support.
    """
    ds = trainer_cfg.deepspeed
    world_size = world()[1] if world_size is None else world_size
    if ds.zero_stage not in (0, 1, 2, 3):
        raise AtmError(f"trainer.deepspeed.zero_stage={ds.zero_stage} must be 0, 1, 2 or 3")
    accum = int(trainer_cfg.grad_accum_steps)
    ours = {"train_micro_batch_size_per_gpu": int(trainer_cfg.batch_size), "gradient_accumulation_steps": accum,
            "train_batch_size": int(trainer_cfg.batch_size) * accum * world_size,
            "gradient_clipping": float(trainer_cfg.grad_clip or 0.0),
            "bf16": {"enabled": trainer_cfg.precision == "bf16"},
            "fp16": {"enabled": trainer_cfg.precision == "fp16"},
            "zero_optimization": {"stage": int(ds.zero_stage)},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    user = _read_user_config(ds.config) if ds.get("config") else {}
    for key, what in _ATM_BUILDS.items():
        if key in user:
            raise AtmError(f"{ds.config}: remove the '{key}' section: atm builds {what}")
    for path, trainer_key in _OWNED.items():
        theirs, mine = _get(user, path), _get(ours, path)
        if theirs is None or theirs == "auto":
            continue
        if theirs != mine and not (isinstance(theirs, (int, float)) and not isinstance(theirs, bool)
                                   and isinstance(mine, (int, float)) and float(theirs) == float(mine)):
            shown = trainer_cfg.precision if trainer_key == "trainer.precision" else mine
            raise AtmError(f"{ds.config}: {path}={json.dumps(theirs)} contradicts {trainer_key}={shown}")
    # trainer-derived values win (they agree with the user's where both are set); the user adds the rest
    return _merge({k: v for k, v in user.items() if v != "auto"}, ours)


def check(trainer_cfg: DictConfig) -> None:
    """Config-time checks of the DeepSpeed backend (before any training): importable, valid config,
    precision supported by the accelerator, resumable state only with ZeRO stages 0-2.

    Raises:
        AtmError: one line naming the key.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise AtmError("trainer.backend=deepspeed: DeepSpeed is not installed "
                       "(pip install --no-build-isolation 'atm[deepspeed]')") from None
    ds_config(trainer_cfg)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if trainer_cfg.precision == "fp16" and not accelerator.is_fp16_supported():
        raise AtmError(f"trainer.precision=fp16: DeepSpeed's {accelerator.device_name()} accelerator has no fp16 "
                       "support (use bf16 or fp32)")
    if trainer_cfg.get("state_every") and trainer_cfg.deepspeed.zero_stage == 3:
        raise AtmError(f"trainer.state_every={trainer_cfg.state_every} with trainer.deepspeed.zero_stage=3: "
                       "atm's resumable state holds ZeRO stages 0-2 (partitioned parameters are not gathered); "
                       "set trainer.state_every=null or zero_stage<=2")


def init_distributed() -> tuple[int, int]:
    """Join (or, for one process without a launcher, create) the process group; return ``(rank, world)``.

    The collective backend is the accelerator's (NCCL on CUDA, gloo on CPU).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # one process, no launcher
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(verbose=False)
        atexit.register(_leave_process_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_process_group() -> None:
    """At exit, destroy the process group: left to the interpreter's teardown, a gloo rank can abort with
    "terminate called without an active exception" (its communication threads are still joinable)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """With several processes: rank 0 runs the block first (e.g. resolving inputs), then the others."""
    import torch.distributed as dist

    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if many and dist.get_rank() != 0:
        dist.barrier()
    yield
    if many and dist.get_rank() == 0:
        dist.barrier()


@contextmanager
def follower_run() -> Iterator[Any]:
    """The MLflow run of a rank other than 0: a throwaway store in a temporary directory, so that only rank 0
    records params, metrics and checkpoints in the real one."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="atm-rank-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/follower.db")
        mlflow.set_experiment("follower")
        with mlflow.start_run() as run:
            yield run


class DeepSpeedBackend:
    """``fit``'s optimiser side through a DeepSpeed engine (see the module doc).

    ``backward`` is ``engine.backward`` (which divides by the accumulation steps), ``micro_step`` is
    ``engine.step`` after every micro-batch (DeepSpeed steps the optimiser, clips and advances the schedule
    at accumulation boundaries). Losses are averaged over ranks for logging.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, trainer_cfg: DictConfig):
        import deepspeed

        self.rank, self.world_size = init_distributed()
        config = ds_config(trainer_cfg, self.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.device = self.engine.device
        self.config = config
        self.zero_stage = int(config["zero_optimization"]["stage"])

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def micro_step(self) -> None:
        self.engine.step()

    def step(self) -> None:
        """Nothing left to do after the last micro-step of an optimiser step."""

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over all ranks (all-reduce)."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, by rank."""
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def optimizer_state(self) -> dict:
        """Optimizer and scheduler state as plain data. ZeRO 0: the (replicated) optimizer's state dict.
        ZeRO 1-2: every rank's partition (fp32 master weights and AdamW moments), gathered on rank 0, less
        DeepSpeed's Python objects (the loss scaler is kept as its numbers)."""
        import torch.distributed as dist

        state = self.engine.optimizer.state_dict()
        if self.zero_stage == 0:
            return {"optimizer": state, "scheduler": self.scheduler.state_dict()}
        scaler = state.pop("loss_scaler", None)
        state = {k: v for k, v in state.items() if k not in _ZERO_OBJECTS}
        state["loss_scaler_numbers"] = {k: v for k, v in vars(scaler).items()
                                        if isinstance(v, (bool, int, float))}
        partitions = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(state, partitions, dst=0)
        return {"optimizer": partitions, "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(state["optimizer"])
        else:
            mine = state["optimizer"][self.rank]
            for key, value in mine.pop("loss_scaler_numbers").items():
                setattr(self.engine.optimizer.loss_scaler, key, value)
            self.engine.optimizer.load_state_dict(state["optimizer"], load_optimizer_states=True,
                                                  load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])

    def describe(self) -> dict[str, float]:
        return {"trainer/world_size": float(self.world_size),
                "trainer/global_batch_size": float(self.config["train_batch_size"]),
                "trainer/zero_stage": float(self.config["zero_optimization"]["stage"])}

