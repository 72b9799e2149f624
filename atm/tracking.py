"""MLflow conventions: where runs go, what they are called, what they record.

* Tracking URI: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else the embedded default
  ``sqlite:///mlflow.db`` in the working directory (no server needed). Browse with
  ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
* One experiment per project (``tracking.experiment``, default ``atm``).
* A run records: params = the flattened resolved config, the resolved YAML as ``config.yaml``, metrics
  with slash names and steps (``train/loss``, ``eval/perplexity/spoken``), the checkpoint (model +
  tokenizer, ``save_pretrained``) under ``checkpoint/`` and intermediate ones under
  ``checkpoints/step-<N>/``, and the tags below.
* Tags: ``atm.stage``, ``atm.config_hash``, ``atm.input.<role>`` (the run id each input role resolved to),
  ``atm.consumed_run_ids`` (comma-joined), ``atm.sweep`` and ``optuna.trial_number`` for sweep trials.
* A sweep is a parent run tagged ``atm.sweep_parent=<study name>``; every trial is a nested run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from atm.errors import AtmError

DEFAULT_URI = "sqlite:///mlflow.db"
TAG_STAGE = "atm.stage"
TAG_HASH = "atm.config_hash"
TAG_CONSUMED = "atm.consumed_run_ids"
TAG_INPUT = "atm.input."
TAG_SWEEP = "atm.sweep"
TAG_SWEEP_PARENT = "atm.sweep_parent"
TAG_TRIAL = "optuna.trial_number"
CHECKPOINT = "checkpoint"
CHECKPOINTS = "checkpoints"

# Keys that say where and how a run is recorded, not what it trains: left out of the hash.
_UNHASHED = ("data.mirror", "data.dir", "trainer.device", "trainer.log_every", "stage.objective",
             "distill.cache.dir")


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """The MLflow tracking URI: config, then ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``."""
    uri = cfg.tracking.uri if cfg is not None and cfg.get("tracking") else None
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def configure(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    Raises:
        AtmError: the tracking server cannot be reached.
    """
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
    except Exception as err:  # mlflow raises many types for an unreachable or broken store
        raise AtmError(f"tracking store {uri} is not usable: {str(err).splitlines()[0]}") from err
    return experiment.experiment_id


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


def sweep_parent(experiment_id: str, study_name: str, storage: str | None) -> str:
    """Get or create the parent run of the sweep ``study_name``; return its run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_SWEEP_PARENT}` = '{study_name}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"sweep/{study_name}",
                            tags={TAG_SWEEP_PARENT: study_name, TAG_SWEEP: study_name,
                                  TAG_STAGE: "sweep", "optuna.storage": storage or ""})
    return run.info.run_id


def record_trial(parent_run_id: str, trial_number: int, run_id: str, value: float | None) -> None:
    """Log a finished trial on its sweep's parent run: ``sweep/objective`` at step = trial number, and
    the best trial so far (direction from the Optuna study named in the parent's tags) as tags."""
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if value is None:
        return
    client.log_metric(parent_run_id, "sweep/objective", float(value), step=trial_number)
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
    client.set_terminated(parent_run_id, "FINISHED")


@contextmanager
def start_run(cfg: DictConfig, hash_: str, consumed: Mapping[str, str | None],
              parent_run_id: str | None = None, extra_tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start the MLflow run of this job: params, resolved YAML, lineage tags; FAILED on exceptions.

    Args:
        consumed: role -> run id each input resolved to (None for a path input).
        parent_run_id: the sweep's parent run, for a trial.
    """
    import mlflow

    tags = {TAG_STAGE: cfg.stage.name, TAG_HASH: hash_,
            TAG_CONSUMED: ",".join(r for r in consumed.values() if r)}
    tags.update({f"{TAG_INPUT}{role}": rid or "path" for role, rid in consumed.items()})
    tags.update(extra_tags or {})
    with mlflow.start_run(run_name=run_name(cfg), parent_run_id=parent_run_id, nested=parent_run_id is not None,
                          tags=tags) as run:
        params = flatten(cfg)
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run


def log_checkpoint(local_dir: Path, artifact_path: str = CHECKPOINT) -> None:
    """Log a ``save_pretrained`` directory (model + tokenizer) as artifacts of the active run."""
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)


def download(run_id: str, artifact_path: str, cache_dir: str | Path) -> Path:
    """Download (once) an artifact directory of a run into ``cache_dir/<run_id>/<artifact_path>``.

    The copy is made in a temporary directory and renamed, so an interrupted download leaves nothing.

    Raises:
        AtmError: the run or the artifact does not exist.
    """
    import mlflow

    target = Path(cache_dir) / run_id / artifact_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(tmp))
        os.replace(local, target)
    except Exception as err:
        raise AtmError(f"cannot download artifact '{artifact_path}' of run {run_id}: "
                       f"{str(err).splitlines()[0]}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    final_step = client.get_run(run_id).data.metrics.get("train/step")
    if final_step is not None and all(step != int(final_step) for step, _ in found):
        found.append((int(final_step), CHECKPOINT))
    return found
