"""The sweep report: plots and tables of an Optuna study, logged on the sweep's MLflow parent run.

Written at the end of every sweeper run (``hydra.sweeper.report: atm.sweeps.report:report``) and on demand::

    python -m atm.sweeps.report <study name> --storage sqlite:///optuna.db [--tracking-uri URI]

Files (under ``<sweep dir>/report/``, each written to a temporary file and renamed, and logged as artifacts
``report/...`` of the parent run ``sweep/<study>``):

* ``trials.csv``: every trial (``study.trials_dataframe()``: number, state, value(s), params, start/end,
  duration) plus ``mlflow_run_id`` (the trial's MLflow run), ``worker`` (host:pid), ``retry_of`` (the
  trial a retried trial repeats) and ``last_step`` (the last reported step, where a pruned trial stopped);
* ``optimization_history.png`` (one per objective for several), ``param_importances.png`` (fANOVA,
  Hutter et al. 2014, through Optuna's ``FanovaImportanceEvaluator``), ``parallel_coordinate.png``;
* multi-objective: ``pareto_front.png`` and ``pareto_front.csv`` (the trials no other trial dominates,
  ``study.best_trials``);
* ``summary.md``: trial counts, the best trial or the Pareto front as a table, plots left out and why (e.g.
  too few finished trials for importances).

It also closes the MLflow runs left RUNNING by trials that failed because their worker died
(:func:`atm.sweeps.close_failed_runs`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from atm.errors import ArgumentParser
from atm.files import atomic_path, atomic_write_text
from atm.sweeps import OBJECTIVES_ATTR, RUN_ATTR, WORKER_ATTR
from atm.sweeps.locks import sqlite_file

log = logging.getLogger(__name__)


def objective_names(study: Any, names: Sequence[str] | None = None) -> list[str]:
    """Display names of the study's objectives: ``names`` when they match, else ``objective`` or
    ``objective_<i>``."""
    n = len(study.directions)
    if names and len(names) == n:
        return [str(x) for x in names]
    return ["objective"] if n == 1 else [f"objective_{i}" for i in range(n)]


def trials_table(study: Any, names: Sequence[str]):
    """``study.trials_dataframe()`` with ``mlflow_run_id``, ``worker``, ``retry_of``, ``last_step`` columns and
    the value columns named after the objectives."""
    import pandas as pd

    df = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                       "duration", "params", "user_attrs"), multi_index=False)
    if df.empty:
        return df
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    df = df.drop(columns=[f"user_attrs_{OBJECTIVES_ATTR}"], errors="ignore")  # the value columns' names
    rename = {f"user_attrs_{RUN_ATTR}": RUN_ATTR, f"user_attrs_{WORKER_ATTR}": WORKER_ATTR}
    if len(names) == 1:
        rename["value"] = names[0]
    else:
        rename.update({f"values_{i}": name for i, name in enumerate(names)})
    df = df.rename(columns=rename)
    df["retry_of"] = [trials[n].system_attrs.get("failed_trial") for n in df["number"]]
    df["last_step"] = [trials[n].last_step for n in df["number"]]
    df["duration_s"] = pd.to_timedelta(df["duration"]).dt.total_seconds()
    return df.drop(columns=["duration"])


def _markdown(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.6g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(study: Any, out_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Write the report files of ``study`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    out_dir.mkdir(parents=True, exist_ok=True)
    names = objective_names(study, names)
    multi = len(names) > 1
    written: list[Path] = []
    skipped: list[str] = []

    df = trials_table(study, names)
    csv = out_dir / "trials.csv"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    written.append(csv)

    def plot(filename: str, make: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            path = out_dir / filename
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            written.append(path)
        except Exception as err:  # too few trials, a single distinct value, ...
            skipped.append(f"{filename}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        finally:
            plt.close("all")

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for i, name in enumerate(names):
        target = (lambda t, i=i: t.values[i]) if multi else None
        suffix = f"_{i}" if multi else ""
        plot(f"optimization_history{suffix}.png",
             lambda target=target, name=name: vis.plot_optimization_history(study, target=target, target_name=name))
        plot(f"param_importances{suffix}.png",
             lambda target=target, name=name: vis.plot_param_importances(
                 study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target,
                 target_name=name))
        plot(f"parallel_coordinate{suffix}.png",
             lambda target=target, name=name: vis.plot_parallel_coordinate(study, target=target, target_name=name))

    summary = [f"# Sweep `{study.study_name}`\n"]
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    summary.append(", ".join(f"{n.lower()}: {c}" for n, c in counts.items() if c) + "\n")
    columns = ["number", *names, "mlflow_run_id"]
    if multi:
        front = study.best_trials if complete else []
        rows = [{"number": t.number, **dict(zip(names, t.values)), **t.params,
                 "mlflow_run_id": t.user_attrs.get(RUN_ATTR)} for t in front]
        params = sorted({k for t in front for k in t.params})
        pareto = out_dir / "pareto_front.csv"
        import pandas as pd

        with atomic_path(pareto) as tmp:
            pd.DataFrame(rows, columns=[*columns, *params]).to_csv(tmp, index=False)
        written.append(pareto)
        plot("pareto_front.png", lambda: vis.plot_pareto_front(study, target_names=list(names)))
        summary.append(f"\n## Pareto front ({len(front)} trial(s))\n\n" + _markdown(rows, [*columns, *params]))
    elif complete:
        best = study.best_trial
        row = {"number": best.number, names[0]: best.value, **best.params,
               "mlflow_run_id": best.user_attrs.get(RUN_ATTR)}
        summary.append("\n## Best trial\n\n" + _markdown([row], [*columns, *sorted(best.params)]))
    if skipped:
        summary.append("\n## Plots left out\n\n" + "".join(f"- {s}\n" for s in skipped))
    md = out_dir / "summary.md"
    atomic_write_text(md, "".join(summary))
    written.append(md)
    return written


def log_to_parent(study: Any, out_dir: Path, storage: str | None, experiment_id: str) -> str:
    """Close the MLflow runs of trials whose worker died, then log ``out_dir`` as ``report/`` on the sweep's
    parent run (created if missing) in the current MLflow tracking store; return the parent run id."""
    from mlflow.tracking import MlflowClient

    from atm import tracking
    from atm.sweeps import close_failed_runs

    close_failed_runs(study.get_trials(deepcopy=False))
    parent = tracking.sweep_parent(experiment_id, study.study_name, storage)
    MlflowClient().log_artifacts(parent, str(out_dir), "report")
    tracking.update_sweep_note(parent)  # the description shows the report's plots
    return parent


def report(study: Any, sweep_dir: str | Path, config: Any = None) -> Path:
    """The sweeper's end-of-run hook: write the report under ``<sweep_dir>/report`` and, for an atm app (its
    config has ``tracking``), log it on the sweep's MLflow parent run, then, with ``tracking.register_best=<name>``,
    register the best trial's model (:func:`atm.sweeps.register.after_sweep`: a failure to register is a
    warning). Returns the report directory."""
    from omegaconf import OmegaConf

    # what the jobs recorded (a job override may change the stage, and so its objective), else the sweep's config
    recorded = {tuple(t.user_attrs[OBJECTIVES_ATTR]) for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get(OBJECTIVES_ATTR)}
    names = list(recorded.pop()) if len(recorded) == 1 else None
    if names is None and config is not None:
        names = OmegaConf.select(config, "hydra.sweeper.objectives")
        if names is None and len(study.directions) == 1:
            names = [OmegaConf.select(config, "stage.objective", default="objective")]
    out = Path(sweep_dir) / "report"
    write_report(study, out, names)
    if config is not None and config.get("tracking") is not None:
        from atm import tracking
        from atm.sweeps.locks import absolute_url

        experiment_id = tracking.configure(config)
        # the URL the sweeper opened (and passed to its jobs as optuna.storage): relative SQLite paths are
        # taken from the launch directory, where this hook runs
        storage = absolute_url(OmegaConf.select(config, "hydra.sweeper.storage", default=None))
        parent = log_to_parent(study, out, storage, experiment_id)
        log.info("sweep report: %s (MLflow parent run %s, artifacts report/)", out, parent)
        if config.tracking.get("register_best") is not None:  # never raises: the results above are kept
            from atm.sweeps.register import after_sweep

            after_sweep(study, config, parent)
    else:
        log.info("sweep report: %s", out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write (and log) the report of a stored study. Exit status 2 with ``error: <one line>`` on bad input."""
    parser = ArgumentParser(prog="python -m atm.sweeps.report", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="Optuna study name")
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna storage URL")
    parser.add_argument("--out", default=None, help="output directory (default: .atm/sweep_reports/<study>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=os.environ.get("ATM_EXPERIMENT", "atm"), help="MLflow experiment")
    parser.add_argument("--objectives", nargs="*", default=None, help="names of the objectives, in order")
    parser.add_argument("--no-mlflow", action="store_true", help="only write the files")
    args = parser.parse_args(argv)
    import optuna

    from atm import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        local = sqlite_file(args.storage)
    except Exception:  # not a database URL: optuna.load_study below says so
        local = None
    if local is not None and not local.is_file():  # Optuna would create an empty storage there
        print(f"error: --storage {args.storage}: no Optuna storage at {local.resolve()}", file=sys.stderr)
        return 2
    try:
        study = optuna.load_study(study_name=args.study, storage=args.storage)
    except Exception as err:
        print(f"error: cannot load study {args.study!r} from {args.storage}: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    out = Path(args.out or Path(".atm/sweep_reports") / args.study)
    files = write_report(study, out, args.objectives)
    if not args.no_mlflow:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri or tracking.tracking_uri())
        experiment = mlflow.set_experiment(args.experiment)
        parent = log_to_parent(study, out, args.storage, experiment.experiment_id)
        print(f"logged on MLflow run {parent} (artifacts report/)")
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
