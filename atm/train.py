"""The one entrypoint: ``python -m atm.train stage=<stage> [overrides]``; ``-m`` with ``+sweep=<name>`` sweeps.

The job composes ``conf/``, resolves the stage's inputs by role (training missing ones first, see
:mod:`atm.lineage`), runs the stage inside an MLflow run (:mod:`atm.tracking`) and returns the stage's
objective metric (``stage.objective``), which the Optuna sweeper optimises. A bad input prints
``error: <one line>`` and exits with status 2; inside a sweep the trial is recorded as failed instead.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from atm import lineage, tracking
from atm.errors import AtmError
from atm.lineage import Input
from atm.stages import get_stage

log = logging.getLogger("atm")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data_environment(cfg: DictConfig) -> None:
    """Export ``data.mirror``/``data.dir`` as ``ATM_DATA_MIRROR``/``ATM_DATA_DIR`` for :mod:`atm.data`."""
    for key, env in (("mirror", "ATM_DATA_MIRROR"), ("dir", "ATM_DATA_DIR")):
        value = cfg.data.get(key)
        if value:
            path = Path(value).expanduser().resolve()
            if key == "mirror" and not path.is_dir():
                raise AtmError(f"data.mirror={value}: data directory does not exist")
            os.environ[env] = str(path)


def execute(cfg: DictConfig, inputs: dict[str, Input] | None = None,
            hash_: str | None = None) -> tuple[str, dict[str, float]]:
    """Run ``cfg``'s stage in a new MLflow run; return ``(run_id, final metrics)``.

    ``inputs``/``hash_`` are given when lineage trains this stage as another stage's input.

    Raises:
        AtmError: unknown stage, unresolvable input, bad data, missing objective metric.
    """
    stage = get_stage(cfg.stage.name)
    stage.validate(cfg)
    experiment_id = tracking.configure(cfg)
    _data_environment(cfg)
    if inputs is None:
        inputs = lineage.resolve_inputs(cfg, experiment_id, _train_input)
        hash_ = lineage.run_hash(cfg, inputs)
    parent, tags = None, {}
    if cfg.get("optuna"):
        parent = tracking.sweep_parent(experiment_id, cfg.optuna.study_name, cfg.optuna.get("storage"))
        tags = {tracking.TAG_SWEEP: cfg.optuna.study_name, tracking.TAG_TRIAL: str(cfg.optuna.trial_number)}
    with tracking.start_run(cfg, hash_, {r: i.run_id for r, i in inputs.items()}, parent, tags) as run:
        seed_everything(cfg.seed)
        log.info("stage %s: run %s (%s)", stage.name, run.info.run_id, tracking.run_name(cfg))
        metrics = stage.run(cfg, inputs)
    if parent:
        tracking.record_trial(parent, int(cfg.optuna.trial_number), run.info.run_id,
                              metrics.get(cfg.stage.objective))
    return run.info.run_id, metrics


def _train_input(cfg: DictConfig, inputs: dict[str, Input], hash_: str) -> str:
    log.info("training missing input: stage %s (config hash %s)", cfg.stage.name, hash_)
    run_id, _ = execute(cfg, inputs, hash_)
    return run_id


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """The value a sweep optimises: ``metrics[cfg.stage.objective]``. AtmError if it is missing or NaN."""
    name = cfg.stage.objective
    value = metrics.get(name)
    if value is None or math.isnan(value):
        raise AtmError(f"stage.objective={name}: stage {cfg.stage.name} produced no such metric "
                       f"(it produced: {', '.join(sorted(metrics)) or 'none'})")
    return float(value)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra task function: run the stage, return the objective."""
    try:
        _, metrics = execute(cfg)
        return objective(cfg, metrics)
    except AtmError as err:
        if _in_sweep():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def normalise_argv(argv: list[str]) -> list[str]:
    """Expand stage aliases (``stage=stage2``) and reject an unknown ``stage=`` with one line, before
    Hydra would print its multi-line listing. Raises AtmError."""
    out = []
    for arg in argv:
        if arg.startswith("stage=") and "(" not in arg:
            names = [lineage.canonical_stage(n) for n in arg[len("stage="):].split(",")]
            for name in names:
                get_stage(name)
            arg = "stage=" + ",".join(names)
        out.append(arg)
    return out


if __name__ == "__main__":
    try:
        sys.argv[1:] = normalise_argv(sys.argv[1:])
    except AtmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
