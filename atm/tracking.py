"""MLflow conventions: where runs go, what they are called, what they record.

* Tracking URI: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else the embedded default
  ``sqlite:///mlflow.db`` in the working directory (no server needed). Browse with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
* One experiment per project (``tracking.experiment``, default ``atm``).
* A run records: params = the flattened resolved config, the resolved YAML as ``config.yaml``, metrics
  with slash names and steps (``train/loss``, ``eval/perplexity/spoken``), the final checkpoint (model +
  tokenizer, ``save_pretrained``) as the run's MLflow logged model (tag ``atm.model_id``; :func:`download`
  fetches it as ``checkpoint``), intermediate ones as artifacts under ``checkpoints/step-<N>/``, and the tags
  below.
* Tags: ``atm.stage``, ``atm.config_hash``, ``atm.input.<role>`` (the run id each input role resolved to),
  ``atm.consumed_run_ids`` (comma-joined), ``atm.sweep`` and ``optuna.trial_number`` for sweep trials.
* A sweep is a parent run tagged ``atm.sweep_parent=<study name>``; every trial is a nested run.
* For the MLflow UI: the experiment is of kind ``custom_model_development`` (the UI opens on its training runs);
  a run's description lists its inputs by role as links to their runs; a sweep parent's description names the
  best trial (a link) and shows the report's plots; ``tracking.system_metrics`` logs CPU, memory (and GPU) use
  under ``system/`` through MLflow's system-metrics monitor (a value a minute).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import quote

from omegaconf import DictConfig, OmegaConf

from atm.errors import AtmError
from atm.files import atomic_dir

DEFAULT_URI = "sqlite:///mlflow.db"
TAG_STAGE = "atm.stage"
TAG_HASH = "atm.config_hash"
TAG_CONSUMED = "atm.consumed_run_ids"
TAG_INPUT = "atm.input."
TAG_SWEEP = "atm.sweep"
TAG_SWEEP_PARENT = "atm.sweep_parent"
TAG_TRIAL = "optuna.trial_number"
#: MLflow's own tags: the run's description (markdown, shown on its page) and the experiment's kind (which
#: page the UI opens on: ``custom_model_development`` is "Training runs", not the GenAI overview).
TAG_NOTE = "mlflow.note.content"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
CHECKPOINT = "checkpoint"
CHECKPOINTS = "checkpoints"
#: The MLflow logged model (MLflow 3 ``LoggedModel``) holding a run's final checkpoint.
TAG_MODEL = "atm.model_id"

# Keys that say where and how a run is recorded, not what it trains: left out of the hash. (Token shards are the
# same bytes whoever builds them, and batches the same whichever loader worker collates them.)
_UNHASHED = ("data.mirror", "data.dir", "data.shards", "data.loader", "trainer.device", "trainer.log_every",
             "stage.objective", "distill.cache.dir", "trainer.state_every", "trainer.state_dir", "trainer.keep_last",
             "trainer.resume")


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """The MLflow tracking URI: config, then ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``."""
    uri = cfg.tracking.uri if cfg is not None and cfg.get("tracking") else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def configure(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    The experiment is tagged ``mlflow.experimentKind=custom_model_development`` (created or not), so the MLflow
    UI opens it on its training runs. Race-free with concurrent workers on a fresh store: the store's schema
    (MLflow's migrations), its default experiment and ``tracking.experiment`` are created by the first process
    to get the store's lock
    (:func:`atm.sweeps.locks.store_lock`: a file lock next to a SQLite file, an advisory lock in a PostgreSQL
    database), which the others wait for; they then find everything created.

    Raises:
        AtmError: the tracking server cannot be reached, or the store cannot be opened (its cause chained: a
            sweep retries a trial that failed so, see ``hydra_plugins/atm_optuna_sweeper``).
    """
    import mlflow

    from atm.sweeps.locks import store_lock

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        probe_server(uri, cfg.tracking.experiment)
    mlflow.set_tracking_uri(uri)
    try:
        with store_lock(uri, "atm/tracking/init"):
            experiment = mlflow.set_experiment(cfg.tracking.experiment)
            if experiment.tags.get(TAG_EXPERIMENT_KIND) is None:  # an older experiment gets it on its next run
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND,
                                                         EXPERIMENT_KIND)
    except Exception as err:  # mlflow raises many types for an unreachable or broken store
        raise AtmError(f"tracking store {uri} is not usable: {str(err).strip().splitlines()[0]}") from err
    return experiment.experiment_id


#: MLflow HTTP settings for :func:`probe_server`: one attempt, 10 s timeout. MLflow's defaults (7 retries,
#: exponential back-off) take minutes to give up on a server that is down.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_ERRNO = re.compile(r"\[Errno -?\d+\][^)\"']*")


def probe_server(uri: str, experiment: str) -> None:
    """Check that the tracking server at ``uri`` answers and accepts this client's credentials
    (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), with one
    short request (get experiment ``experiment`` by name) and no retries, before any stage work.

    Raises:
        AtmError: one line naming ``uri``: unreachable (connection refused, unknown host, timeout),
            credentials rejected (HTTP 401/403), or another error answer.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    saved = {key: os.environ.get(key) for key in _PROBE_ENV}
    os.environ.update(_PROBE_ENV)
    try:
        MlflowClient(uri).get_experiment_by_name(experiment)
    except MlflowException as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        status = err.get_http_status_code()
        if err.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise AtmError(f"tracking server {uri} rejected the request ({err.error_code}, HTTP {status}): "
                           "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") from err
        if "failed with exception" in text or "timeout" in text:
            reason = _ERRNO.search(text)
            raise AtmError(f"tracking server {uri} is not reachable ({reason.group(0).strip() if reason else text}):"
                           " start it, or fix tracking.uri / MLFLOW_TRACKING_URI") from err
        raise AtmError(f"tracking server {uri} is not usable: {text}") from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flatten(cfg: DictConfig | Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into ``{"a.b.c": value}``; lists become their JSON text."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def config_hash(cfg: DictConfig, keys: tuple[str, ...], inputs: Mapping[str, str] | None = None) -> str:
    """A 16-hex-digit hash of what a run trains: the top-level config ``keys`` its stage reads
    (e.g. ``stage, seed, model, trainer, data`` and its input roles), less where/how it is recorded.

    Two runs with the same hash trained the same thing, so a finished run can stand in for a new
    request (lineage reuse), while settings a stage never reads do not change its hash. ``inputs`` maps
    each input role to the identity of what it resolved to (the input run's own hash, or a path), so a
    change anywhere upstream changes every hash downstream.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    flat = {k: v for k, v in flatten({key: resolved.get(key) for key in keys}).items()
            if not any(k == u or k.startswith(u + ".") for u in _UNHASHED)}
    flat.update({f"inputs.{role}": identity for role, identity in (inputs or {}).items()})
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(cfg: DictConfig) -> str:
    """A name that says what the run is, e.g. ``distill_final/soft_ce+hidden_mse/uniform/T=2``."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    stage = cfg.stage.name
    if stage.startswith("distill"):
        d = cfg.distill
        losses = "+".join(x for x in (d.logit.loss, d.intermediate.loss) if x)
        mapping = d.intermediate.layer_mapping if d.intermediate.loss else "none"
        aug = "" if cfg.augment.name == "none" else f"/{cfg.augment.name}"
        return f"{stage}/{losses}/{mapping}/T={d.logit.temperature:g}{aug}"
    if stage == "evaluate" or stage == "finetune":
        role = cfg.get("target" if stage == "evaluate" else "encoder")
        return f"{stage}/{role}"
    if stage.startswith("pretrain"):
        return f"{stage}/{cfg.model.name}"
    return stage


def find_finished_run(experiment_id: str, stage: str, hash_: str) -> str | None:
    """The newest FINISHED run id of ``stage`` with config hash ``hash_``, or None."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_HASH}` = '{hash_}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_resumable_run(experiment_id: str, stage: str, hash_: str, has_state) -> str | None:
    """The newest unfinished (RUNNING, FAILED or KILLED) top-level run of ``stage`` with config hash ``hash_``
    for which ``has_state(run_id)`` is true (a training state on disk that no live process holds), or None."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_HASH}` = '{hash_}' "
                       "and attributes.status != 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags and has_state(run.info.run_id):
            return run.info.run_id
    return None


def sweep_parent(experiment_id: str, study_name: str, storage: str | None) -> str:
    """Get or create the parent run of the sweep ``study_name``; return its run id.

    Race-free across processes and machines: the lookup and the creation happen under a lock in the Optuna
    storage's database (:func:`atm.sweeps.locks.storage_lock`), so workers sharing a study share one parent.
    """
    from mlflow.tracking import MlflowClient

    from atm.sweeps.locks import storage_lock

    client = MlflowClient()
    with storage_lock(storage, f"atm/sweep_parent/{study_name}"):
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_SWEEP_PARENT}` = '{study_name}'",
                                  order_by=["attributes.start_time ASC"], max_results=1)
        if runs:
            return runs[0].info.run_id
        run = client.create_run(experiment_id, run_name=f"sweep/{study_name}",
                                tags={TAG_SWEEP_PARENT: study_name, TAG_SWEEP: study_name,
                                      TAG_STAGE: "sweep", "optuna.storage": storage or ""})
    return run.info.run_id


def record_trial(parent_run_id: str, trial_number: int, run_id: str,
                 value: float | tuple[float | None, ...] | None) -> None:
    """Log a finished trial on its sweep's parent run: ``sweep/objective`` at step = trial number, and
    the best trial so far (direction from the Optuna study named in the parent's tags) as tags. A
    multi-objective trial (a tuple) logs ``sweep/objective_<i>`` only: its Pareto front is in the sweep
    report. The read-compare-write of the best tags holds the sweep's storage lock (several workers)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from atm.sweeps.locks import storage_lock

    client = MlflowClient()
    if value is None:
        return
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            if v is not None:
                client.log_metric(parent_run_id, f"sweep/objective_{i}", float(v), step=trial_number)
        client.set_terminated(parent_run_id, "FINISHED")
        return
    client.log_metric(parent_run_id, "sweep/objective", float(value), step=trial_number)
    tags = client.get_run(parent_run_id).data.tags
    with storage_lock(tags.get("optuna.storage") or None, f"atm/sweep_parent/{tags[TAG_SWEEP]}"):
        _record_best(client, optuna, parent_run_id, trial_number, run_id, float(value))


def _record_best(client, optuna, parent_run_id: str, trial_number: int, run_id: str, value: float) -> None:
    parent = client.get_run(parent_run_id)
    direction = parent.data.tags.get("optuna.direction")
    if direction is None:
        study = optuna.load_study(study_name=parent.data.tags[TAG_SWEEP],
                                  storage=parent.data.tags.get("optuna.storage") or None)
        direction = study.direction.name.lower()
        client.set_tag(parent_run_id, "optuna.direction", direction)
    best = parent.data.tags.get("sweep.best_value")
    better = best is None or (value < float(best) if direction == "minimize" else value > float(best))
    if better:
        client.set_tag(parent_run_id, "sweep.best_value", repr(float(value)))
        client.set_tag(parent_run_id, "sweep.best_trial", str(trial_number))
        client.set_tag(parent_run_id, "sweep.best_run_id", run_id)
        client.log_metric(parent_run_id, "sweep/best_objective", float(value), step=trial_number)
        update_sweep_note(parent_run_id)
    client.set_terminated(parent_run_id, "FINISHED")


@contextmanager
def start_run(cfg: DictConfig, hash_: str, consumed: Mapping[str, str | None],
              parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """Start the MLflow run of this job: params, resolved YAML, lineage tags; FAILED on exceptions.

    Args:
        consumed: role -> run id each input resolved to (None for a path input).
        parent_run_id: the sweep's parent run, for a trial.
        run_id: reopen this existing run (resuming it) instead of creating one.
    """
    import mlflow

    tags = {TAG_STAGE: cfg.stage.name, TAG_HASH: hash_,
            TAG_CONSUMED: ",".join(r for r in consumed.values() if r)}
    tags.update({f"{TAG_INPUT}{role}": rid or "path" for role, rid in consumed.items()})
    tags.update(extra_tags or {})
    tags[TAG_NOTE] = run_note(cfg, consumed)
    system_metrics = _system_metrics(cfg)
    with mlflow.start_run(run_id=run_id, run_name=run_name(cfg), parent_run_id=parent_run_id,
                          nested=parent_run_id is not None, tags=tags, log_system_metrics=system_metrics) as run:
        params = flatten(cfg)
        logged = run.data.params if run_id else {}  # a resumed run keeps its params (MLflow cannot change one)
        items = [(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run


def run_link(run_id: str, experiment_id: str | None = None) -> str:
    """The MLflow UI's address of a run, relative to the UI's root (``#/experiments/<id>/runs/<run id>``), for
    markdown links in run descriptions. The run's experiment is looked up when not given."""
    if experiment_id is None:
        from mlflow.tracking import MlflowClient

        try:
            experiment_id = MlflowClient().get_run(run_id).info.experiment_id
        except Exception:  # a run of another store: a link within this experiment is the best guess
            experiment_id = "0"
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def run_note(cfg: DictConfig, consumed: Mapping[str, str | None]) -> str:
    """A run's description (markdown, tag ``mlflow.note.content``): the stage, and its inputs by role as links
    to the runs they resolved to (or the path given)."""
    lines = [f"**{cfg.stage.name}** ({run_name(cfg)})", ""]
    if consumed:
        lines.append("Inputs:")
        for role, rid in consumed.items():
            given = cfg.get(role)
            lines.append(f"- {role}: [{rid}]({run_link(rid)})" if rid else f"- {role}: path `{given}`")
    else:
        lines.append("Inputs: none (trained from the data alone)")
    return "\n".join(lines) + "\n"


def update_sweep_note(parent_run_id: str) -> None:
    """Write the sweep parent's description (tag ``mlflow.note.content``): the study, the best trial so far as a
    link to its run (tags ``sweep.best_*``), the registered model version of the best trial (tag
    ``sweep.registered_model``, :mod:`atm.sweeps.register`) as a link, and the sweep report's plots (``report/*.png``) as images served by
    the MLflow UI (``get-artifact``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    lines = [f"**Sweep {tags.get(TAG_SWEEP, '?')}** (Optuna storage `{tags.get('optuna.storage') or 'in memory'}`)",
             ""]
    if tags.get("sweep.best_run_id"):
        best = tags["sweep.best_run_id"]
        lines.append(f"Best trial: [#{tags.get('sweep.best_trial')}]({run_link(best, parent.info.experiment_id)}),"
                     f" objective {float(tags['sweep.best_value']):.6g} ({tags.get('optuna.direction', '?')})")
    else:
        lines.append("Best trial: none finished yet")
    if tags.get("sweep.registered_model"):  # tracking.register_best (atm.sweeps.register)
        name, _, version = tags["sweep.registered_model"].rpartition("/")
        lines.append(f"\nRegistered: [{name} version {version}](#/models/{quote(name)}/versions/{version})")
    try:
        plots = sorted(f.path for f in client.list_artifacts(parent_run_id, "report") if f.path.endswith(".png"))
    except Exception:  # no report yet
        plots = []
    for path in plots:
        lines += ["", f"![{path}](get-artifact?path={path}&run_uuid={parent_run_id})"]
    client.set_tag(parent_run_id, TAG_NOTE, "\n".join(lines) + "\n")


def check(cfg: DictConfig) -> None:
    """Validate the ``tracking`` settings a run reads, before anything is trained or written.

    Raises:
        AtmError: naming the key: ``tracking.experiment`` empty, ``tracking.system_metrics`` not a boolean,
            ``tracking.system_metrics_interval`` not > 0, ``tracking.system_metrics_log_every`` below the interval,
            ``tracking.register_best`` not a registered model name (:func:`atm.sweeps.register.check`; the run
            :mod:`atm.run` checks that it is a sweep's trial).
    """
    t = cfg.get("tracking")
    if t is None:
        return
    if not str(t.get("experiment") or "").strip():
        raise AtmError("tracking.experiment is empty: name the MLflow experiment (default atm)")
    if not isinstance(t.get("system_metrics", False), bool):
        raise AtmError(f"tracking.system_metrics={t.get('system_metrics')!r} must be true or false")
    interval, every = t.get("system_metrics_interval", 10), t.get("system_metrics_log_every", 60)
    for key, value in (("system_metrics_interval", interval), ("system_metrics_log_every", every)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AtmError(f"tracking.{key}={value!r} must be a number of seconds > 0")
    if every < interval:
        raise AtmError(f"tracking.system_metrics_log_every={every!r} must be at least "
                       f"tracking.system_metrics_interval={interval!r} (a logged value is the mean of the samples)")
    from atm.sweeps.register import check as check_register_best

    check_register_best(cfg, top_level=False)


def _system_metrics(cfg: DictConfig) -> bool:
    """Whether the run logs MLflow system metrics (``tracking.system_metrics``); when it does, set MLflow's
    sampling: a sample every ``tracking.system_metrics_interval`` seconds, their mean logged every
    ``tracking.system_metrics_log_every`` seconds (so a shorter run logs none)."""
    tracking_cfg = cfg.get("tracking") or {}
    if not tracking_cfg.get("system_metrics", False):
        return False
    import mlflow

    interval = float(tracking_cfg.get("system_metrics_interval", 10))
    every = float(tracking_cfg.get("system_metrics_log_every", 60))
    mlflow.set_system_metrics_sampling_interval(interval)
    mlflow.set_system_metrics_samples_before_logging(max(1, round(every / interval)))
    return True


def log_checkpoint(local_dir: Path, artifact_path: str = CHECKPOINT) -> None:
    """Log a ``save_pretrained`` directory (model + tokenizer) to the active run.

    The final checkpoint (``artifact_path`` = ``checkpoint``) becomes the run's MLflow logged model (an MLflow 3
    ``LoggedModel`` named after the stage, linked to the run as its output at its last ``train/step``; the run's
    tag ``atm.model_id`` names it): the UI lists it in the run's Models column and the Models page, and
    ``transformers`` loads its artifact directory (:func:`download` fetches it). Anything else (intermediate
    ``checkpoints/step-<N>``, the ``tokenizer``) is logged as artifacts of the run.

    Whole or absent: when the upload fails part-way (a full disk, a lost artifact store), what was uploaded is
    deleted (where the artifact store can delete), a logged model is marked FAILED, and the error raised, so the
    run ends FAILED (:func:`start_run`) with no partial checkpoint; lineage reuses only FINISHED runs, and a run is
    FINISHED only after its checkpoint was logged.

    Raises:
        AtmError: the upload failed (naming ``local_dir``, ``artifact_path`` and the run).
    """
    import mlflow

    run = mlflow.active_run()
    as_model = artifact_path == CHECKPOINT and run is not None
    try:
        if as_model:
            _log_model(run, local_dir)
        else:
            mlflow.log_artifacts(str(local_dir), artifact_path)
    except Exception as err:  # any artifact store's error
        run_id = run.info.run_id if run is not None else "?"
        if run is not None and not as_model:  # (a logged model cleans up after itself)
            _delete_artifacts(run.info.artifact_uri, artifact_path)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AtmError(f"cannot log checkpoint {local_dir} as '{artifact_path}' of run {run_id}: {reason}") from err


def _log_model(run: Any, local_dir: Path) -> None:
    """Create the run's logged model, upload ``local_dir`` into it, mark it READY and link it to the run; on a
    failed upload, delete what was uploaded, mark it FAILED and re-raise."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stage = run.data.tags.get(TAG_STAGE, "model")
    model = client.create_logged_model(run.info.experiment_id, name=stage, source_run_id=run.info.run_id,
                                       tags={TAG_STAGE: stage, TAG_HASH: run.data.tags.get(TAG_HASH, "")},
                                       model_type="transformers")
    try:
        client.log_model_artifacts(model.model_id, str(local_dir))
    except BaseException:
        _delete_artifacts(model.artifact_location, "")
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    step = client.get_run(run.info.run_id).data.metrics.get("train/step")
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step=int(step or 0))])
    client.set_tag(run.info.run_id, TAG_MODEL, model.model_id)


def _delete_artifacts(artifact_uri: str, artifact_path: str) -> None:
    """Delete ``artifact_path`` under a run's ``artifact_uri`` (best effort: a store that cannot delete keeps it,
    a warning says so)."""
    import logging

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(artifact_uri).delete_artifacts(artifact_path)
    except Exception as err:  # NotImplementedError for stores without delete, or the store is gone
        logging.getLogger(__name__).warning("could not delete the partial artifacts '%s' of %s: %s", artifact_path,
                                            artifact_uri, str(err).strip().splitlines()[0] if str(err).strip()
                                            else type(err).__name__)


def download(run_id: str, artifact_path: str, cache_dir: str | Path) -> Path:
    """Download (once) an artifact directory of a run into ``cache_dir/<run_id>/<artifact_path>``: the final
    ``checkpoint`` from the run's logged model (:func:`log_checkpoint`), anything else from the run's artifacts.

    The copy is made in a temporary directory and renamed (:func:`atm.files.atomic_dir`), so an interrupted
    download leaves nothing; when another process (a parallel sweep worker) renamed its copy first, that one is
    used.

    Raises:
        AtmError: the run or the artifact does not exist.
    """
    import mlflow

    target = Path(cache_dir) / run_id / artifact_path
    if target.exists():
        return target
    try:
        with atomic_dir(target, replace=False) as tmp:
            staging = tmp / ".download"
            staging.mkdir()
            local = Path(mlflow.artifacts.download_artifacts(**_artifact_source(run_id, artifact_path),
                                                             dst_path=str(staging)))
            for child in local.iterdir():
                os.replace(child, tmp / child.name)
            shutil.rmtree(staging)
    except Exception as err:
        raise AtmError(f"cannot download artifact '{artifact_path}' of run {run_id}: "
                       f"{str(err).splitlines()[0]}") from err
    return target


def _artifact_source(run_id: str, artifact_path: str) -> dict[str, str]:
    """Where ``artifact_path`` of a run is: the final ``checkpoint`` in the run's logged model (tag
    ``atm.model_id``), anything else (and the checkpoint of a run logged before logged models) in the run."""
    if artifact_path == CHECKPOINT:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        model_id = client.get_run(run_id).data.tags.get(TAG_MODEL)
        if model_id:
            return {"artifact_uri": client.get_logged_model(model_id).artifact_location}
    return {"run_id": run_id, "artifact_path": artifact_path}


def log_table(rows: list[dict], artifact: str, floatfmt: str = ".4f") -> None:
    """Log ``rows`` as ``<artifact>.csv`` and a markdown ``<artifact>.md`` to the active MLflow run (integers
    stay integers, missing cells are blank in the markdown)."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(rows)
    mlflow.log_text(frame.to_csv(index=False), f"{artifact}.csv")
    cells = frame.astype(object).where(frame.notna(), None)
    mlflow.log_text(cells.to_markdown(index=False, floatfmt=floatfmt, missingval="") + "\n", f"{artifact}.md")


def list_checkpoints(run_id: str) -> list[tuple[int, str]]:
    """``(step, artifact_path)`` of every intermediate checkpoint of a run, by step, then the final one.

    The final checkpoint's step is the run's ``train/step`` metric (its last value).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = []
    for item in client.list_artifacts(run_id, CHECKPOINTS):
        name = item.path.rsplit("/", 1)[-1]
        if item.is_dir and name.startswith("step-"):
            found.append((int(name[5:]), item.path))
    found.sort()
    final = final_step(run_id)
    if final is not None and all(step != final for step, _ in found):
        found.append((final, CHECKPOINT))
    return found


def final_step(run_id: str) -> int | None:
    """The training step of a run's final checkpoint: its ``train/step`` metric (None when it logged none)."""
    from mlflow.tracking import MlflowClient

    value = MlflowClient().get_run(run_id).data.metrics.get("train/step")
    return None if value is None else int(value)
