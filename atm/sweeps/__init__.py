"""The job side of atm's Optuna sweeps (the sweeper itself is ``hydra_plugins/atm_optuna_sweeper``).

A sweep job receives ``++optuna.{study_name, storage, trial_number}`` (and ``++optuna.objectives`` for a
multi-objective sweep). :func:`trial_from_config` turns them into the live Optuna trial (any Hydra app run by
the sweeper may call it), :func:`report_every` says how often the sweep wants intermediate values.
:func:`atm.train.execute` runs an atm job inside an MLflow run nested under the sweep's parent run and:

* :func:`attach` records the MLflow run id on the Optuna trial (user attribute ``mlflow_run_id``) and, for
  a trial that retries trials whose worker died, closes their MLflow runs (FAILED, tag
  ``atm.trial_state=FAIL``);
* the stages pass :func:`pruning_callbacks` to ``fit``: every ``hydra.sweeper.pruner.report_every`` steps
  the stage's own evaluation runs, its metrics are logged to MLflow at that step, the objective is
  reported to the trial, and ``optuna.TrialPruned`` is raised when the sweep's pruner says so;
* :func:`end_if_pruned` ends a pruned trial's MLflow run with status ``KILLED`` and tag
  ``atm.trial_state=PRUNED``, keeping the metrics logged so far. KILLED (not FINISHED) because lineage
  reuses only FINISHED runs: a partly trained model must never stand in for a finished one;
* :func:`objectives` is what the job returns: ``metrics[stage.objective]``, or a tuple of
  ``metrics[name]`` for each of ``optuna.objectives``.

The sweep report (plots, trials CSV, Pareto front) is :mod:`atm.sweeps.report`; locks shared by workers
are :mod:`atm.sweeps.locks`; the pruner built from the sweep's spec is :mod:`atm.sweeps.pruners`. The sweeper
plugin imports all of these; nothing here imports the plugin.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from omegaconf import DictConfig

from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

TAG_TRIAL_STATE = "atm.trial_state"
TAG_PRUNED_AT = "atm.pruned_at_step"
RUN_ATTR = "mlflow_run_id"
#: Trial user attribute: the metric names the trial's values are (:func:`objective_names` of the job's config).
OBJECTIVES_ATTR = "objectives"
#: Trial user attribute: which worker (``host:pid``) runs the trial (set by the sweeper).
WORKER_ATTR = "worker"
#: Study user attribute: the sweep's pruner spec (``hydra.sweeper.pruner``), set by the sweeper, read by jobs.
PRUNER_ATTR = "atm_optuna.pruner"


def in_sweep(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is a sweep job's config (it has ``optuna.trial_number``)."""
    node = cfg.get("optuna")
    return bool(node) and node.get("trial_number") is not None


def objective_names(cfg: DictConfig) -> list[str]:
    """``optuna.objectives`` (multi-objective sweep), else ``[stage.objective]`` (``[]`` for a stage without one)."""
    node = cfg.get("optuna")
    names = node.get("objectives") if node else None
    if names:
        return [str(n) for n in names]
    return [str(cfg.stage.objective)] if cfg.stage.get("objective") else []


def objectives(cfg: DictConfig, metrics: Mapping[str, float]) -> float | tuple[float, ...]:
    """The value(s) a sweep optimises, one per :func:`objective_names` (a float for one).

    Raises:
        AtmError: a metric is missing or NaN.
    """
    if not objective_names(cfg):
        raise AtmError(f"stage.objective: stage {cfg.stage.name} has no objective to optimise "
                       "(set stage.objective=<metric name>)")
    values = []
    for name in objective_names(cfg):
        value = metrics.get(name)
        if value is None or math.isnan(value):
            key = "optuna.objectives" if len(objective_names(cfg)) > 1 else "stage.objective"
            raise AtmError(f"{key}={name}: stage {cfg.stage.name} produced no such metric "
                           f"(it produced: {', '.join(sorted(metrics)) or 'none'})")
        values.append(float(value))
    return values[0] if len(values) == 1 else tuple(values)


@lru_cache(maxsize=8)
def _storage(url: str) -> Any:
    import optuna

    return optuna.storages.RDBStorage(url)


def trial_from_config(cfg: Any) -> optuna.Trial | None:
    """The live Optuna trial of a job launched by the ``atm_optuna`` sweeper, else None.

    Reads ``cfg.optuna.{study_name, storage, trial_number}``; returns None when any is missing (not in a
    sweep, or an in-memory study). The study carries the sweep's pruner, so ``trial.should_prune()`` asks the
    configured one.

    Raises:
        Optuna's errors: the study or the trial is gone.
    """
    node = cfg.get("optuna") if hasattr(cfg, "get") else None
    if not node:
        return None
    name, url, number = (node.get(k) for k in ("study_name", "storage", "trial_number"))
    if name is None or url is None or number is None:
        return None
    import optuna

    from atm.sweeps.pruners import make_pruner

    study = optuna.load_study(study_name=str(name), storage=_storage(str(url)))
    study.pruner, _ = make_pruner(study.user_attrs.get(PRUNER_ATTR))
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(number))
    return optuna.Trial(study, trial_id)


def report_every(trial: optuna.Trial) -> int:
    """Steps between two ``trial.report`` calls asked by the sweep (``hydra.sweeper.pruner.report_every``;
    0: none)."""
    from atm.sweeps.pruners import make_pruner

    return make_pruner(trial.study.user_attrs.get(PRUNER_ATTR))[1]


def _trial(cfg: DictConfig):
    if not in_sweep(cfg):
        return None
    return trial_from_config(cfg)


def attach(cfg: DictConfig, run_id: str):
    """Link the running sweep trial to its MLflow run and record the names of its objectives (the job's
    config knows them: a job override may change the stage); return the ``optuna.Trial`` (None outside a sweep).

    Closes the MLflow runs still RUNNING of the trials this trial retries (their worker died).
    """
    trial = _trial(cfg)
    if trial is None:
        return None
    study = trial.study
    frozen = study._storage.get_trial(trial._trial_id)
    retried = set(frozen.system_attrs.get("retry_history", []))
    if retried:
        close_failed_runs(t for t in study.get_trials(deepcopy=False) if t.number in retried)
    trial.set_user_attr(RUN_ATTR, run_id)
    trial.set_user_attr(OBJECTIVES_ATTR, objective_names(cfg))
    return trial


def close_failed_runs(trials: Iterable[Any]) -> list[str]:
    """Mark FAILED (tag ``atm.trial_state=FAIL``) the MLflow runs of FAIL Optuna trials: a worker killed
    mid-trial leaves its run RUNNING; one killed between ending its run and telling Optuna the result
    leaves it FINISHED, and one interrupted by Ctrl-C in its training loop ends it KILLED; yet the trial is FAIL and
    is retried in a new run, so the run must not count (nor be reused by lineage) beside its retry. Runs already
    FAILED, and KILLED runs of a pruned job (tag ``atm.trial_state=PRUNED``: a worker died before telling Optuna),
    are left alone. Returns the run ids closed."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    client, closed = MlflowClient(), []
    for t in trials:
        run_id = t.user_attrs.get(RUN_ATTR)
        if t.state != TrialState.FAIL or not run_id:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:  # a run of another tracking store
            continue
        pruned = run.info.status == "KILLED" and run.data.tags.get(TAG_TRIAL_STATE) == "PRUNED"
        if run.info.status in ("RUNNING", "FINISHED", "KILLED") and not pruned:
            client.set_tag(run_id, TAG_TRIAL_STATE, "FAIL")
            client.set_terminated(run_id, "FAILED")
            closed.append(run_id)
            log.info("trial #%d failed (worker died or interrupted): MLflow run %s (%s) marked FAILED", t.number, run_id,
                     run.info.status)
    return closed


def pruning_callbacks(cfg: DictConfig, module: Any,
                      evaluate: Callable[[], Mapping[str, float]]) -> list[Callable[[int], None]]:
    """``fit`` callbacks that report the objective to the sweep trial every ``report_every`` steps.

    Args:
        module: what ``fit`` trains; put back in training mode after ``evaluate``.
        evaluate: the stage's evaluation, ``() -> {metric name: value}`` containing the objective; its
            metrics are logged to MLflow at the step.

    Returns:
        ``[]`` outside a sweep, for a multi-objective study (Optuna prunes single-objective studies only)
        or when the sweep reports nothing (``report_every`` 0); else one callback, which raises
        ``optuna.TrialPruned`` when the pruner prunes. The last step is not reported (the stage's final
        evaluation follows).
    """
    trial = _trial(cfg)
    if trial is None or len(trial.study.directions) > 1:
        return []
    every = report_every(trial)
    if not every or not objective_names(cfg):
        return []
    name, max_steps = objective_names(cfg)[0], int(cfg.trainer.max_steps)

    def on_step(step: int) -> None:
        if step % every or step >= max_steps:
            return
        import mlflow
        import optuna
        import torch

        # the evaluation must not move the training's random streams (masking, dropout): reporting or not
        # then trains the same model
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            metrics = dict(evaluate())
        module.train()
        if name not in metrics:
            raise AtmError(f"stage.objective={name}: the evaluation of stage {cfg.stage.name} does not "
                           f"produce it (it produced: {', '.join(sorted(metrics))})")
        mlflow.log_metrics(metrics, step=step)
        trial.report(float(metrics[name]), step)
        if trial.should_prune():
            mlflow.set_tag(TAG_PRUNED_AT, str(step))
            raise optuna.TrialPruned(f"trial #{trial.number} pruned at step {step}: {name}={metrics[name]:g}")

    return [on_step]


def end_if_pruned(err: BaseException) -> None:
    """Called with the exception leaving a stage: for ``optuna.TrialPruned``, tag the active MLflow run
    ``atm.trial_state=PRUNED`` and end it KILLED (its metrics stay). The caller re-raises."""
    import optuna

    if isinstance(err, optuna.TrialPruned):
        import mlflow

        mlflow.set_tag(TAG_TRIAL_STATE, "PRUNED")
        mlflow.end_run("KILLED")
