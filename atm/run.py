"""The lifecycle of one stage run, phase by phase, as :func:`atm.train.execute` drives it::

    life = RunLifecycle.prepare(cfg)
    life.resolve_inputs(train_missing_input, inputs, hash_)
    with life.open() as run:
        metrics = life.run_stage(run)
    life.record_trial(run.info.run_id, metrics)


1. :meth:`RunLifecycle.prepare`: look the stage up (importing ``stage.module`` when set), export the data
   directories, validate the config (the stage's check, the trainer settings) and, at the top level, every
   input stage's config and every role's reachability (a dry pass, :func:`atm.lineage.check_inputs`), point
   MLflow at the store and join the distributed job, if any;
2. :meth:`RunLifecycle.resolve_inputs`: resolve the stage's inputs by role (:mod:`atm.lineage`, training
   missing ones first; rank 0 first, the other ranks then find its runs) and the config hash;
3. :meth:`RunLifecycle.open`: reopen a resumable run of the same stage and hash (rank 0), or start a new MLflow
   run, nested in the sweep's parent run inside a sweep; the other ranks follow in a throwaway run;
4. :meth:`RunLifecycle.run_stage`: seed, attach the Optuna trial, run the stage (a pruned trial's run ends
   KILLED with its metrics kept);
5. :meth:`RunLifecycle.record_trial`: record a sweep trial's objective on the sweep's parent run.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from atm import lineage, sweeps, tracking
from atm.engine import deepspeed as distributed
from atm.errors import AtmError
from atm.lineage import Input
from atm.stages.registry import Stage, stage_of

log = logging.getLogger("atm")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_environment(cfg: DictConfig) -> None:
    """Export ``data.mirror``/``data.dir`` as ``ATM_DATA_MIRROR``/``ATM_DATA_DIR`` for :mod:`atm.data`.

    Raises:
        AtmError: ``data.mirror`` is not a directory.
    """
    for key, env in (("mirror", "ATM_DATA_MIRROR"), ("dir", "ATM_DATA_DIR")):
        value = cfg.data.get(key)
        if value:
            path = Path(value).expanduser().resolve()
            if key == "mirror" and not path.is_dir():
                raise AtmError(f"data.mirror={value}: data directory does not exist")
            os.environ[env] = str(path)


@dataclass
class RunLifecycle:
    """One run of ``cfg``'s stage, from validation to the sweep record (phases in the module doc).

    Attributes:
        cfg: the composed config.
        stage: its registered stage.
        experiment_id: the MLflow experiment.
        rank: this process's rank (0 without a distributed launch).
        inputs: role -> resolved input, after :meth:`resolve_inputs`.
        hash_: the run's config hash, after :meth:`resolve_inputs`.
        parent: the sweep's parent run id inside a sweep, after :meth:`open`.
    """

    cfg: DictConfig
    stage: Stage
    experiment_id: str
    rank: int
    inputs: dict[str, Input] = field(default_factory=dict)
    hash_: str | None = None
    parent: str | None = None

    @classmethod
    def prepare(cls, cfg: DictConfig, check_inputs: bool = True) -> RunLifecycle:
        """Phase 1: stage lookup and config checks, then tracking, data environment and distributed setup.

        Args:
            cfg: the composed config.
            check_inputs: also run lineage's dry pass over the input graph (:func:`atm.lineage.check_inputs`:
                every input stage's config and every role's reachability), before the tracking store is
                touched; false for an input lineage trains (its consumer's pass covered it).

        Raises:
            AtmError: unknown stage, bad config (of this stage or of an input stage), an unreachable input,
                unusable tracking store, missing data mirror.
        """
        stage = stage_of(cfg)
        data_environment(cfg)  # first: a stage check may read the mirror (e.g. the MASSIVE locales)
        stage.validate(cfg)
        if cfg.get("trainer") is not None:
            from atm.engine.loop import check_trainer

            check_trainer(cfg.trainer)
        tracking.check(cfg)
        if check_inputs:  # the job started (a lineage input inherits tracking.register_best, and is no trial)
            from atm.sweeps.register import check as check_register_best

            check_register_best(cfg, top_level=True)
        runs = lineage.check_inputs(cfg) if check_inputs else []
        experiment_id = tracking.configure(cfg)
        lineage.check_runs(runs, cfg)
        rank = distributed.init_distributed()[0] if distributed.world()[1] > 1 else 0
        return cls(cfg, stage, experiment_id, rank)

    def resolve_inputs(self, train: lineage.Trainer, inputs: dict[str, Input] | None = None,
                       hash_: str | None = None) -> None:
        """Phase 2: the inputs by role and the config hash; ``inputs``/``hash_`` when lineage already resolved
        them (this run trains another stage's input). ``train`` trains a missing input (:func:`lineage.resolve`).

        Raises:
            AtmError: an input that cannot be resolved.
        """
        if inputs is None:
            with distributed.rank_zero_first():  # rank 0 resolves first; the other ranks then find its runs
                inputs = lineage.resolve_inputs(self.cfg, self.experiment_id, train)
            hash_ = lineage.run_hash(self.cfg, inputs)
        self.inputs, self.hash_ = inputs, hash_

    @contextmanager
    def open(self) -> Iterator[Any]:
        """Phase 3: the MLflow run of this job (``mlflow.ActiveRun``): a resumable run of the same stage and hash
        reopened, or a new one (nested in the sweep's parent run in a sweep); a follower run on ranks > 0."""
        from atm.engine.state import resumable_run

        cfg = self.cfg
        resume_id = resumable_run(cfg, self.experiment_id, self.stage.name, self.hash_) if self.rank == 0 else None
        if resume_id:
            log.info("stage %s: resuming run %s from its training state", self.stage.name, resume_id)
        tags = {}
        if cfg.get("optuna"):
            self.parent = tracking.sweep_parent(self.experiment_id, cfg.optuna.study_name, cfg.optuna.get("storage"))
            tags = {tracking.TAG_SWEEP: cfg.optuna.study_name, tracking.TAG_TRIAL: str(cfg.optuna.trial_number)}
        consumed = {role: inp.run_id for role, inp in self.inputs.items()}
        with (tracking.start_run(cfg, self.hash_, consumed, self.parent, tags, run_id=resume_id)
              if self.rank == 0 else distributed.follower_run()) as run:
            yield run

    def run_stage(self, run: Any) -> dict[str, float]:
        """Phase 4, inside :meth:`open`: seed, attach the sweep trial (rank 0), run the stage; return its metrics.
        A pruned trial ends its run KILLED with ``atm.trial_state=PRUNED`` (:func:`atm.sweeps.end_if_pruned`)."""
        seed_everything(self.cfg.seed)
        log.info("stage %s: run %s (%s)", self.stage.name, run.info.run_id, tracking.run_name(self.cfg))
        if self.rank == 0:
            sweeps.attach(self.cfg, run.info.run_id)
        try:
            return self.stage.run(self.cfg, self.inputs)
        except BaseException as err:
            sweeps.end_if_pruned(err)
            raise

    def record_trial(self, run_id: str, metrics: dict[str, float]) -> None:
        """Phase 5: a sweep trial's objective (one value, or one per ``optuna.objectives``) on the parent run."""
        if not self.parent or self.rank != 0:
            return
        names = sweeps.objective_names(self.cfg)
        tracking.record_trial(self.parent, int(self.cfg.optuna.trial_number), run_id,
                              metrics.get(names[0]) if len(names) == 1 else tuple(metrics.get(n) for n in names))

