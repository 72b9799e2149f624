"""Config schema of the ``atm_optuna`` sweeper, registered as ``hydra/sweeper: atm_optuna``.

Select it in a primary config with ``defaults: [_self_, override hydra/sweeper: atm_optuna]`` and
fill ``hydra.sweeper`` (see the package docstring for an example and the meaning of each key).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class AtmOptunaSweeperConf:
    _target_: str = "hydra_plugins.atm_optuna_sweeper.atm_optuna_sweeper.AtmOptunaSweeper"

    # Optuna study name; null -> the Hydra job name (hydra.job.name, e.g. the script's name).
    study_name: Optional[str] = None
    # SQLAlchemy URL of the Optuna RDB storage. A relative SQLite path is resolved against the
    # directory the command was launched from; null -> in-memory study (jobs cannot reach it).
    storage: Optional[str] = "sqlite:///optuna.db"
    # "minimize" | "maximize", or a list of them for a multi-objective study.
    direction: Any = "minimize"
    # Target number of finished (COMPLETE or PRUNED) trials in the study.
    n_trials: int = 20
    # Trials per launcher batch (run in parallel when the launcher supports it).
    n_jobs: int = 1
    # name: tpe | random | grid; seed: int | null; any other key is passed to the sampler class.
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    # Search space: override key (may start with + or ++) -> Hydra sweep string, e.g.
    # "choice(a, b)", "interval(0.0, 1.0)", or a conditional param
    # {when: {<earlier param>: value or [values]}, space: <sweep string>}.
    params: Dict[str, Any] = field(default_factory=dict)
    # Resume an existing study of the same name instead of failing.
    load_if_exists: bool = True
    # name: none | median | percentile | successive_halving | hyperband | threshold | patient | wilcoxon
    # (Optuna's pruners; any other key is passed to the pruner class), plus report_every: N (jobs report
    # their objective every N training steps; atm's stages do it through atm.sweeps.pruning_callbacks).
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    # Metric names the job returns, one per direction (multi-objective); null: the job's own objective.
    # Passed to jobs as ++optuna.objectives.
    objectives: Optional[List[str]] = None
    # Heartbeat of running trials (seconds; RDB storage only; null: off). A trial whose worker died (no
    # heartbeat for grace_period seconds) is failed and retried with the same params, up to max_retry times.
    heartbeat_interval: Optional[int] = 10
    grace_period: Optional[int] = 30
    max_retry: Optional[int] = 2
    # `module:function` called as f(study=, sweep_dir=, config=) after the sweep (plots, CSV, MLflow); null: none.
    report: Optional[str] = "atm.sweeps.report:report"


ConfigStore.instance().store(
    group="hydra/sweeper", name="atm_optuna", node=AtmOptunaSweeperConf, provider="atm"
)
