"""The one entrypoint: ``python -m atm.train stage=<stage> [overrides]``; ``-m`` with ``+sweep=<name>`` sweeps.

The job composes ``conf/``, resolves the stage's inputs by role (training missing ones first, see
:mod:`atm.lineage`), runs the stage inside an MLflow run (:mod:`atm.tracking`) and returns the stage's
objective metric (``stage.objective``), which the Optuna sweeper optimises. A bad input prints
``error: <one line>`` and exits with status 2; inside a sweep the trial is recorded as failed instead.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from atm import lineage, sweeps, tracking
from atm.engine import deepspeed as distributed
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
    if cfg.get("trainer") is not None:
        from atm.engine.loop import check_trainer

        check_trainer(cfg.trainer)
    experiment_id = tracking.configure(cfg)
    _data_environment(cfg)
    rank = distributed.init_distributed()[0] if distributed.world()[1] > 1 else 0
    if inputs is None:
        with distributed.rank_zero_first():  # rank 0 resolves first; the other ranks then find its runs
            inputs = lineage.resolve_inputs(cfg, experiment_id, _train_input)
        hash_ = lineage.run_hash(cfg, inputs)
    from atm.engine.state import resumable_run

    resume_id = resumable_run(cfg, experiment_id, stage.name, hash_) if rank == 0 else None
    if resume_id:
        log.info("stage %s: resuming run %s from its training state", stage.name, resume_id)
    parent, tags = None, {}
    if cfg.get("optuna"):
        parent = tracking.sweep_parent(experiment_id, cfg.optuna.study_name, cfg.optuna.get("storage"))
        tags = {tracking.TAG_SWEEP: cfg.optuna.study_name, tracking.TAG_TRIAL: str(cfg.optuna.trial_number)}
    with (tracking.start_run(cfg, hash_, {r: i.run_id for r, i in inputs.items()}, parent, tags, run_id=resume_id)
          if rank == 0 else distributed.follower_run()) as run:
        seed_everything(cfg.seed)
        log.info("stage %s: run %s (%s)", stage.name, run.info.run_id, tracking.run_name(cfg))
        if rank == 0:
            sweeps.attach(cfg, run.info.run_id)
        try:
            metrics = stage.run(cfg, inputs)
        except BaseException as err:
            sweeps.end_if_pruned(err)  # a pruned trial: run KILLED + atm.trial_state=PRUNED, metrics kept
            raise
    if parent and rank == 0:
        names = sweeps.objective_names(cfg)
        tracking.record_trial(parent, int(cfg.optuna.trial_number), run.info.run_id,
                              metrics.get(names[0]) if len(names) == 1 else tuple(metrics.get(n) for n in names))
    return run.info.run_id, metrics


def _train_input(cfg: DictConfig, inputs: dict[str, Input], hash_: str) -> str:
    if distributed.world()[1] > 1:
        raise AtmError(f"input stage {cfg.stage.name} (config hash {hash_}) has no finished run: train it first "
                       "in one process; a multi-process launch trains only its own stage")
    log.info("training missing input: stage %s (config hash %s)", cfg.stage.name, hash_)
    run_id, _ = execute(cfg, inputs, hash_)
    return run_id


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | tuple[float, ...]:
    """The value a sweep optimises: ``metrics[cfg.stage.objective]``, or one value per name in
    ``optuna.objectives`` (multi-objective sweep, see :func:`atm.sweeps.objectives`). AtmError if one is
    missing or NaN."""
    return sweeps.objectives(cfg, metrics)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra task function: run the stage, return the objective."""
    try:
        _, metrics = execute(cfg)
        return objective(cfg, metrics) if _in_sweep() else None  # only a sweep optimises it
    except AtmError as err:
        if _in_sweep():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def normalise_argv(argv: list[str]) -> list[str]:
    """Expand stage aliases (``stage=stage2``) and reject an unknown ``stage=`` with one line, before
    Hydra would print its multi-line listing; likewise an override Hydra cannot parse (``x=choice()``,
    an empty sweep). ``-m``/``--multirun`` moves to the front (Python's argparse rejects overrides on both
    sides of it: ``+sweep=x -m a=b``). Raises AtmError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    flags = [a for a in argv if a in ("-m", "--multirun")]
    out = flags[:1]
    for arg in (a for a in argv if a not in flags):
        if arg.startswith("~") or ("=" in arg and not arg.startswith("-")):  # an override, not an option value
            try:
                parser.parse_override(arg)
            except Exception as err:  # Hydra's OverrideParseException: 3 lines, the reason in the second
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                raise AtmError(f"cannot parse override {arg!r}: {lines[1] if len(lines) > 1 else lines[0]}") from None
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
