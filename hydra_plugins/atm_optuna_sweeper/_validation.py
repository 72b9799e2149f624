"""The settings of the ``atm_optuna`` sweeper (``hydra.sweeper.*``), their validation and the sampler.

:class:`SweeperSettings` holds the keys of :class:`~hydra_plugins.atm_optuna_sweeper.config.AtmOptunaSweeperConf`
as plain Python values; its checks run before any job starts and raise a
:class:`~atm.sweeps.pruners.SweepError` naming the key at fault.
"""

from typing import Any, Dict, List, Optional

import optuna
from omegaconf import OmegaConf

from atm.sweeps.pruners import SweepError, make_pruner

from ._space import Param


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its end-of-grid ``study.stop()``, which only works inside
    ``Study.optimize``; the sweeper caps the number of trials at the grid size instead."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": _GridSampler,
}


class SweeperSettings:
    """``hydra.sweeper.*`` (see the config schema for each key); OmegaConf nodes become plain values."""

    def __init__(
        self,
        study_name: Optional[str] = None,
        storage: Optional[str] = "sqlite:///optuna.db",
        direction: Any = "minimize",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        params: Any = None,
        load_if_exists: bool = True,
        pruner: Any = None,
        objectives: Any = None,
        heartbeat_interval: Optional[int] = 10,
        grace_period: Optional[int] = 30,
        max_retry: Optional[int] = 2,
        report: Optional[str] = "atm.sweeps.report:report",
    ) -> None:
        def plain(x: Any) -> Any:
            return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x

        self.study_name = study_name
        self.storage = storage
        self.direction = plain(direction)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler_spec: Dict[str, Any] = dict(plain(sampler) or {})
        self.params: Dict[str, Any] = dict(plain(params) or {})
        self.load_if_exists = load_if_exists
        self.pruner_spec: Dict[str, Any] = dict(plain(pruner) or {"name": "none"})
        self.objectives = plain(objectives)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.report = report

    def _directions(self) -> List[str]:
        """``direction`` as a list of ``minimize``/``maximize`` (one per objective).

        Raises:
            SweepError: anything else.
        """
        d = self.direction
        dirs = [d] if isinstance(d, str) else list(d) if isinstance(d, (list, tuple)) else []
        if not dirs or any(x not in ("minimize", "maximize") for x in dirs):
            raise SweepError(
                f"hydra.sweeper.direction: expected minimize, maximize or a list of them, got {d!r}"
            )
        return dirs

    def _make_sampler(self, space: Dict[str, Param], seed_offset: int) -> Any:
        """The sampler of ``hydra.sweeper.sampler``, seeded with ``seed + seed_offset`` (unseeded without a seed).

        Raises:
            SweepError: a bad seed or bad kwargs, or the grid sampler over conditional or continuous params.
        """
        spec = dict(self.sampler_spec)
        name = spec.pop("name", "tpe")
        seed = spec.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SweepError(f"hydra.sweeper.sampler.seed: expected an int or null, got {seed!r}")
        seed = None if seed is None else seed + seed_offset
        try:
            if name == "grid":
                cond = [p for p in space.values() if p.when]
                if cond:
                    raise SweepError(
                        "hydra.sweeper.sampler.name: the grid sampler does not support"
                        f" conditional params ({cond[0].when_origin} has 'when')"
                    )
                grid = {p.name: p.grid_values() for p in space.values()}
                return SAMPLERS[name](grid, seed=seed, **spec)
            return SAMPLERS[name](seed=seed, **spec)
        except (TypeError, ValueError) as e:
            raise SweepError(f"hydra.sweeper.sampler: {e}") from None

    def _validate(self, directions: List[str]) -> None:
        """Check the scalar settings, the sampler name, the pruner, ``objectives`` and ``report``.

        Raises:
            SweepError: naming the first key at fault.
        """
        for key in ("n_trials", "n_jobs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SweepError(f"hydra.sweeper.{key}: expected an int >= 1, got {v!r}")
        for key in ("heartbeat_interval", "grace_period", "max_retry"):
            v = getattr(self, key)
            low = 0 if key == "max_retry" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise SweepError(f"hydra.sweeper.{key}: expected an int >= {low} or null, got {v!r}")
        if self.heartbeat_interval and self.grace_period and self.grace_period <= self.heartbeat_interval:
            raise SweepError(
                f"hydra.sweeper.grace_period: {self.grace_period} s must exceed heartbeat_interval"
                f" ({self.heartbeat_interval} s)"
            )
        sampler_name = self.sampler_spec.get("name", "tpe")
        if not isinstance(sampler_name, str) or sampler_name not in SAMPLERS:
            raise SweepError(
                f"hydra.sweeper.sampler.name: unknown sampler {sampler_name!r}"
                f" (choose from {', '.join(SAMPLERS)})"
            )
        pruner, _ = make_pruner(self.pruner_spec)
        if len(directions) > 1 and not isinstance(pruner, optuna.pruners.NopPruner):
            raise SweepError(
                "hydra.sweeper.pruner: Optuna prunes single-objective studies only"
                f" (direction has {len(directions)} entries)"
            )
        objs = self.objectives
        if objs is not None:
            if not isinstance(objs, list) or not all(isinstance(o, str) and o for o in objs):
                raise SweepError(f"hydra.sweeper.objectives: expected a list of metric names, got {objs!r}")
            if len(objs) != len(directions):
                raise SweepError(
                    f"hydra.sweeper.objectives: {len(objs)} metric(s) for {len(directions)}"
                    f" direction(s) {directions}"
                )
        if self.report is not None and ":" not in str(self.report):
            raise SweepError(f"hydra.sweeper.report: expected 'module:function' or null, got {self.report!r}")
