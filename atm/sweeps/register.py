"""Registering a sweep's best model in the MLflow model registry.

With ``tracking.register_best=<name>`` a sweep ends (after its report, :func:`atm.sweeps.report.report`) by
registering its best trial's final checkpoint (the trial run's MLflow logged model, tag ``atm.model_id``) as a
version of the registered model ``<name>``; for a sweep already run, or for any one run::

    python -m atm.sweeps.register --study <study> --name <name> [--storage sqlite:///optuna.db] [--tracking-uri URI]
    python -m atm.sweeps.register --run <run id> --name <name> [--tracking-uri URI]

A version's source is ``models:/<model id>`` (its files are the logged model's: ``transformers`` loads
``mlflow.artifacts.download_artifacts("models:/<name>/<version>")``) and its run the trial's run. Its tags say
what it scored and where it came from (:func:`version_tags`): ``atm.objective`` and ``atm.objective_value``, the
run's final metrics as ``metric.<name>``, ``atm.run_id``, ``atm.model_id``, ``atm.stage``, ``atm.config_hash``,
``atm.input.<role>`` (the run each input resolved to), and for a trial ``atm.sweep``, ``atm.sweep_parent_run_id``
and ``optuna.trial_number``; its description says the same in markdown, with links to the runs.

Idempotent: a model already registered under ``<name>`` (a version tagged with its ``atm.model_id``) is not
registered again, so re-running a sweep whose best trial did not change adds no version, and one whose best trial
changed adds the next one. On a SQL tracking store the look-up and the registration hold a lock of the store
(:func:`atm.sweeps.locks.store_lock`), so parallel workers ending the same sweep add one version.

``tracking.register_best`` applies to sweeps only (``python -m atm.train +sweep=<name> -m``): a single-objective
Optuna sweep has one best trial; a plain run with it set, or a multi-objective sweep, is refused before anything
trains (:func:`check`); register such a run's model with ``--run``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig

from atm.errors import AtmError, ArgumentParser

log = logging.getLogger(__name__)

SETTING = "tracking.register_best"
TAG_RUN = "atm.run_id"
TAG_PARENT = "atm.sweep_parent_run_id"
TAG_OBJECTIVE = "atm.objective"
TAG_OBJECTIVE_VALUE = "atm.objective_value"
METRIC_PREFIX = "metric."
#: Sweep parent run tag: the registered version of the sweep's best trial, ``<name>/<version>``.
TAG_REGISTERED = "sweep.registered_model"


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a valid MLflow registered model name (None when it is): MLflow's own rule, a
    non-empty string without ``/`` or ``:`` that is not ``.`` or ``..``; and not both quote characters (an MLflow
    search filter, which has no escapes, could not name it)."""
    if not isinstance(name, str):
        return "must be a registered model name (a string; quote a number)"
    if not name.strip():
        return "is empty: give a registered model name"
    if "/" in name or ":" in name:
        return "must not contain '/' or ':' (MLflow registered model names cannot)"
    if "'" in name and '"' in name:
        return "must not contain both ' and \" (it could not be searched for)"
    if name.strip() in (".", ".."):
        return "is not a valid registered model name"
    return None


def check(cfg: DictConfig, top_level: bool = True) -> None:
    """Validate ``tracking.register_best`` of a job's config, before anything trains.

    Args:
        top_level: the job the user started (not an input that lineage trains for it, which inherits the
            ``tracking`` overrides): only it must be a sweep trial.

    Raises:
        AtmError: naming ``tracking.register_best``: not a valid registered model name; set for a run that is not
            a trial of an Optuna sweep; set for a multi-objective sweep (no single best trial).
    """
    name = _checked_name(cfg)
    if name is None or not top_level:
        return
    from atm.sweeps import in_sweep

    if not in_sweep(cfg):
        raise AtmError(f"{SETTING}={name} registers the best trial of a sweep (python -m atm.train +sweep=<name> -m);"
                       f" to register this run's model, run it without it, then: python -m atm.sweeps.register"
                       f" --run <run id> --name {name}")
    objectives = cfg.optuna.get("objectives")
    if objectives is not None and len(objectives) > 1:
        raise AtmError(multi_objective_error(name, len(objectives)))


def _checked_name(cfg: DictConfig) -> str | None:
    """``tracking.register_best`` of ``cfg`` (None when unset), after checking it is a registered model name.

    Raises:
        AtmError: ``tracking.register_best=<name> <what is wrong with it>``.
    """
    tracking_cfg = cfg.get("tracking")
    name = tracking_cfg.get("register_best") if tracking_cfg is not None else None
    if name is not None and (problem := name_problem(name)):
        raise AtmError(f"{SETTING}={name!r} {problem}")
    return name


def multi_objective_error(name: str, n: int) -> str:
    """The one-line refusal of ``tracking.register_best`` for a sweep with ``n`` > 1 objectives."""
    return (f"{SETTING}={name}: a sweep with {n} objectives has no single best trial (see its Pareto front in the "
            f"sweep report); register a chosen trial's model with python -m atm.sweeps.register --run <run id> "
            f"--name {name}")


def check_sweep(config: DictConfig, n_objectives: int) -> None:
    """The sweeper's pre-flight check of ``tracking.register_best`` (before a study is opened or a job
    launched), for an app config with a ``tracking`` node.

    Raises:
        AtmError: as :func:`check` (an invalid name; ``n_objectives`` > 1).
    """
    name = _checked_name(config)
    if name is not None and n_objectives > 1:
        raise AtmError(multi_objective_error(name, n_objectives))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def version_tags(run: Any, model_id: str, objective: str | None, value: float | None) -> dict[str, str]:
    """The model-version tags of ``run``'s logged model ``model_id`` (see the module docstring); ``objective``
    and ``value`` name the score it was chosen by (None: none known)."""
    from atm import tracking

    tags = run.data.tags
    out = {TAG_RUN: run.info.run_id, tracking.TAG_MODEL: model_id}
    for key in (tracking.TAG_STAGE, tracking.TAG_HASH, tracking.TAG_SWEEP, tracking.TAG_TRIAL):
        if tags.get(key):
            out[key] = tags[key]
    if tags.get("mlflow.parentRunId"):
        out[TAG_PARENT] = tags["mlflow.parentRunId"]
    out.update({key: value for key, value in tags.items() if key.startswith(tracking.TAG_INPUT)})
    if objective:
        out[TAG_OBJECTIVE] = objective
        if value is not None:
            out[TAG_OBJECTIVE_VALUE] = repr(float(value))
    out.update({f"{METRIC_PREFIX}{key}": repr(float(v)) for key, v in sorted(run.data.metrics.items())
                if not key.startswith("system/")})
    return out


def _description(run: Any, tags: Mapping[str, str], experiment_id: str) -> str:
    """The model version's description (markdown): its score, its run, sweep and inputs as links."""
    from atm import tracking

    rid = run.info.run_id
    lines = [f"**{tags.get(tracking.TAG_STAGE, 'model')}** from run [{run.info.run_name or rid}]"
             f"({tracking.run_link(rid, experiment_id)})", ""]
    if tags.get(TAG_OBJECTIVE):
        value = tags.get(TAG_OBJECTIVE_VALUE)
        lines.append(f"- objective: `{tags[TAG_OBJECTIVE]}` = {float(value):.6g}" if value else
                     f"- objective: `{tags[TAG_OBJECTIVE]}` (not logged by the run)")
    if tags.get(TAG_PARENT):
        lines.append(f"- sweep `{tags.get(tracking.TAG_SWEEP, '?')}`, trial #{tags.get(tracking.TAG_TRIAL, '?')}: "
                     f"parent run [{tags[TAG_PARENT]}]({tracking.run_link(tags[TAG_PARENT], experiment_id)})")
    for key, value in tags.items():
        if key.startswith(tracking.TAG_INPUT):
            role = key[len(tracking.TAG_INPUT):]
            lines.append(f"- input {role}: " + (f"[{value}]({tracking.run_link(value, experiment_id)})"
                                                if value != "path" else "a path"))
    lines.append(f"- config hash `{tags.get(tracking.TAG_HASH, '?')}`, logged model `{tags[tracking.TAG_MODEL]}`")
    return "\n".join(lines) + "\n"


def register_run(run_id: str, name: str, objective: str | None = None, value: float | None = None) -> tuple[Any, bool]:
    """Register the logged model of run ``run_id`` (its final checkpoint) as a version of registered model
    ``name`` in the current MLflow tracking store (``mlflow.set_tracking_uri``), unless a version of ``name``
    already holds that model.

    Args:
        objective: the metric the model was chosen by; default the run's ``stage.objective`` param.
        value: its value; default the run's metric ``objective`` (its last value).

    Returns:
        ``(model version, created)``: the new version, or the existing one (``created`` False).

    Raises:
        AtmError: ``name`` invalid; no such run; the run has no READY logged model (tag ``atm.model_id``); the
            registry refused (its first line).
    """
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from atm import tracking
    from atm.sweeps.locks import store_lock

    problem = name_problem(name)
    if problem:
        raise AtmError(f"registered model name {name!r} {problem}")
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as err:  # MlflowException RESOURCE_DOES_NOT_EXIST, or the store is unreachable
        raise AtmError(f"run {run_id}: not found in {mlflow.get_tracking_uri()}: {_first_line(err)}") from None
    model_id = run.data.tags.get(tracking.TAG_MODEL)
    if not model_id:
        raise AtmError(f"run {run_id} ({run.info.run_name}) has no logged model (no tag {tracking.TAG_MODEL}: it logged "
                       f"no final checkpoint, or predates logged models): nothing registered as {name!r}")
    model = client.get_logged_model(model_id)
    if model.status != LoggedModelStatus.READY:
        raise AtmError(f"run {run_id}: its logged model {model_id} is {model.status}, not READY: nothing registered")
    if objective is None:
        objective = run.data.params.get("stage.objective") or None
    if value is None and objective:
        value = run.data.metrics.get(objective)
    tags = version_tags(run, model_id, objective, value)
    try:
        with store_lock(mlflow.get_tracking_uri(), f"atm/registry/{name}"):
            existing = _version_of(client, name, model_id)
            if existing is not None:
                return existing, False
            if not client.search_registered_models(filter_string=f"name = {_quoted(name)}"):
                client.create_registered_model(name, description=(
                    "Registered by atm (`tracking.register_best`, `python -m atm.sweeps.register`): each version is "
                    "a run's final checkpoint (model + tokenizer, `save_pretrained`); its tags and description "
                    "give its metrics and lineage."))
            version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
            client.update_model_version(name, version.version,
                                        description=_description(run, tags, run.info.experiment_id))
    except AtmError:
        raise
    except Exception as err:  # the registry's errors (MlflowException), an unreachable server
        raise AtmError(f"cannot register the model of run {run_id} as {name!r}: {_first_line(err)}") from err
    return client.get_model_version(name, version.version), True


def _quoted(name: str) -> str:
    """``name`` as a string of an MLflow search filter (quoted; MLflow has no escapes: a name with ``'`` is
    double-quoted, :func:`name_problem` refuses one with both quotes)."""
    return f'"{name}"' if "'" in name else f"'{name}'"


def _version_of(client: Any, name: str, model_id: str) -> Any | None:
    """The version of registered model ``name`` holding logged model ``model_id``, or None (also when ``name`` is
    not registered yet)."""
    from atm import tracking

    for version in client.search_model_versions(f"name = {_quoted(name)}"):
        if (version.tags.get(tracking.TAG_MODEL) == model_id or getattr(version, "model_id", None) == model_id
                or version.source == f"models:/{model_id}"):
            return version
    return None


def best_run(study: Any) -> tuple[str, int, str | None, float]:
    """The best trial of a single-objective Optuna ``study``: ``(MLflow run id, trial number, objective name,
    value)``.

    Raises:
        AtmError: several objectives; no completed trial; the best trial recorded no MLflow run.
    """
    from atm.sweeps import OBJECTIVES_ATTR, RUN_ATTR

    if len(study.directions) > 1:
        raise AtmError(f"study {study.study_name!r} has {len(study.directions)} objectives: no single best trial; "
                       "register a chosen trial's model with --run <run id>")
    try:
        best = study.best_trial
    except ValueError:  # Optuna: no completed trial
        raise AtmError(f"study {study.study_name!r} has no completed trial: nothing to register") from None
    run_id = best.user_attrs.get(RUN_ATTR)
    if not run_id:
        raise AtmError(f"study {study.study_name!r}: its best trial #{best.number} recorded no MLflow run")
    names = best.user_attrs.get(OBJECTIVES_ATTR) or [None]
    return run_id, best.number, names[0], float(best.value)


def register_best(study: Any, name: str, parent_run_id: str | None = None) -> tuple[Any, bool]:
    """Register the model of the best trial of ``study`` as a version of ``name`` (:func:`register_run`, with
    the trial's objective value); on the sweep's parent run (``parent_run_id``), tag ``sweep.registered_model``
    ``<name>/<version>`` and rewrite its description, which then links the version.

    Raises:
        AtmError: as :func:`best_run` and :func:`register_run`.
    """
    run_id, number, objective, value = best_run(study)
    version, created = register_run(run_id, name, objective, value)
    log.info("%s version %s of registered model %r: best trial #%d (run %s, %s=%.6g)",
             "registered" if created else "already", version.version, name, number, run_id, objective, value)
    if parent_run_id:
        from mlflow.tracking import MlflowClient

        from atm import tracking

        MlflowClient().set_tag(parent_run_id, TAG_REGISTERED, f"{name}/{version.version}")
        tracking.update_sweep_note(parent_run_id)
    return version, created


def after_sweep(study: Any, config: DictConfig, parent_run_id: str | None) -> None:
    """The end of a sweep with ``tracking.register_best`` set: :func:`register_best`. A failure is logged as one
    warning line and swallowed: the trials, their runs and the report are recorded already, and the command
    ``python -m atm.sweeps.register --study <study> --name <name>`` retries it."""
    name = config.tracking.get("register_best") if config.get("tracking") is not None else None
    if name is None:
        return
    try:
        register_best(study, str(name), parent_run_id)
    except Exception as err:  # AtmError, or the registry's own: the sweep's results must stay
        log.warning("%s=%s: not registered (%s); the sweep's results are kept; retry with: python -m "
                    "atm.sweeps.register --study %s --name %s", SETTING, name, _first_line(err), study.study_name,
                    name)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: register a study's best trial's model (``--study``) or a run's (``--run``). Exit status 2 with
    ``error: <one line>`` on bad input; prints ``<name> version <v>: models:/<name>/<v> (run <id>)``."""
    parser = ArgumentParser(prog="python -m atm.sweeps.register", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Optuna study name: register its best trial's model")
    which.add_argument("--run", help="MLflow run id: register its model")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna storage URL (with --study)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    problem = name_problem(args.name)
    if problem:
        parser.error(f"--name {args.name!r} {problem}")
    import mlflow

    from atm import tracking
    from atm.sweeps.locks import sqlite_file

    uri = args.tracking_uri or tracking.tracking_uri()
    try:
        local = sqlite_file(uri)
    except Exception:  # not a database URL (a server, a file store)
        local = None
    if local is not None and not local.is_file():  # MLflow would create an empty store there
        print(f"error: --tracking-uri {uri}: no MLflow store at {local.resolve()}", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(uri)
    try:
        if args.run:
            version, created = register_run(args.run, args.name)
        else:
            study = _load_study(args.study, args.storage)
            version, created = register_best(study, args.name, _parent(study.study_name))
    except AtmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = "registered" if created else "already registered"
    print(f"{state}: {args.name} version {version.version}: models:/{args.name}/{version.version} "
          f"(run {version.run_id})")
    return 0


def _load_study(name: str, storage: str) -> Any:
    """The Optuna study ``name`` of ``storage``. Raises AtmError: no such storage or study."""
    import optuna

    from atm.sweeps.locks import sqlite_file

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        local = sqlite_file(storage)
    except Exception:  # not a database URL: optuna.load_study says so
        local = None
    if local is not None and not local.is_file():
        raise AtmError(f"--storage {storage}: no Optuna storage at {local.resolve()}")
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception as err:
        raise AtmError(f"cannot load study {name!r} from {storage}: {_first_line(err)}") from None


def _parent(study_name: str) -> str | None:
    """The sweep parent run of ``study_name`` in the current tracking store (found, never created), or None."""
    from mlflow.tracking import MlflowClient

    from atm import tracking

    client = MlflowClient()
    for experiment in client.search_experiments():
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{tracking.TAG_SWEEP_PARENT}` = '{study_name}'", max_results=1)
        if runs:
            return runs[0].info.run_id
    return None


if __name__ == "__main__":
    sys.exit(main())
