"""Lineage: inputs are named by role, resolved to finished MLflow runs, trained when missing.

A stage names what it consumes by role (``teacher=pretrain_stage2``, ``init=stage1``), never by path.
:func:`resolve` turns the reference into a local checkpoint directory:

* a stage name or alias (``stage1``, ``stage2``, ``intermediate``, ``final``, ``tokenizer``; the aliases are
  declared by the stages, :mod:`atm.stages.registry`), or the name of a stage declared outside atm whose
  config names its module (``stage.module``): compose that stage's config (the same config tree,
  ``stage=<name>``, plus the command-line overrides whose keys start with a prefix in ``lineage.inherit`` and
  the stage's ``lineage.overrides``), hash it, and reuse the newest FINISHED run with that stage and hash;
  when none exists, train it first, once, under a file lock, so that parallel sweep trials that need the same
  teacher wait for one another instead of training it twice;
* ``runs:/<run_id>``: that run's checkpoint;
* a path to a checkpoint directory saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from atm import tracking
from atm.errors import AtmError
from atm.files import file_lock
from atm.stages.registry import all_stages, canonical_name, stage_of


@dataclass(frozen=True)
class Input:
    """A resolved input: the run it came from (None for a path) and its local checkpoint directory."""

    role: str
    path: Path
    run_id: str | None = None
    stage: str | None = None
    config_hash: str | None = None

    @property
    def identity(self) -> str:
        """What this input contributes to its consumer's config hash: the run's hash, or the path."""
        return self.config_hash or str(self.path.resolve())


def inherited_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides an input's training inherits (keys under ``lineage.inherit``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        return []
    prefixes = tuple(cfg.lineage.inherit)
    kept = []
    for item in task:
        key = item.split("=", 1)[0].lstrip("+~")
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            kept.append(item)
    return kept


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """Compose the config tree for ``stage=<stage>`` with ``overrides`` (inside or outside a Hydra app; inside
    one, on the job's config search path: its ``hydra.searchpath`` override is passed on, so that a stage
    declared outside atm is found there)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [f"stage={stage}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=[*args, *_search_path_overrides()])
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=args)


def _search_path_overrides() -> list[str]:
    """The ``hydra.searchpath`` override of the running Hydra job (none outside a job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_overrides = list(HydraConfig.get().overrides.hydra)
    except ValueError:  # not inside a Hydra job
        return []
    return [item for item in hydra_overrides if item.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@contextmanager
def _lock(cfg: DictConfig, name: str) -> Iterator[None]:
    """An exclusive lock named ``name`` (blocks until free): in a sweep whose Optuna storage is PostgreSQL,
    an advisory lock in that database (workers on several machines, see :mod:`atm.sweeps.locks`); else a
    file lock under ``tracking.cache_dir/locks`` (one machine, or a shared filesystem with POSIX locks)."""
    storage = _SWEEP_STORAGE.get()
    if storage and str(storage).startswith("postgresql"):
        from atm.sweeps.locks import storage_lock

        with storage_lock(str(storage), f"atm/lineage/{name}"):
            yield
        return
    with file_lock(Path(cfg.tracking.cache_dir) / "locks" / f"{name}.lock"):
        yield


Trainer = Callable[[DictConfig, "dict[str, Input]", str], str]
# The Optuna storage of the sweep trial whose inputs are being resolved (inputs of inputs included).
_SWEEP_STORAGE: ContextVar[str | None] = ContextVar("atm_sweep_storage", default=None)


def resolve_inputs(cfg: DictConfig, experiment_id: str, train: Trainer) -> dict[str, Input]:
    """Resolve every role in ``cfg.stage.inputs``, and those of ``cfg.stage.optional_inputs`` that are set
    (see :func:`resolve`)."""
    roles = input_roles(cfg)
    storage = cfg.optuna.get("storage") if cfg.get("optuna") else None
    token = _SWEEP_STORAGE.set(str(storage)) if storage else None
    try:
        return {role: resolve(role, cfg, experiment_id, train) for role in roles}
    finally:
        if token is not None:
            _SWEEP_STORAGE.reset(token)


def input_roles(cfg: DictConfig) -> list[str]:
    """The roles ``cfg``'s stage reads: ``stage.inputs``, and those of ``stage.optional_inputs`` that are set."""
    return list(cfg.stage.inputs) + [r for r in cfg.stage.get("optional_inputs", []) if cfg.get(r) is not None]


def check_inputs(cfg: DictConfig) -> None:
    """The dry resolution pass, before anything is trained: walk ``cfg``'s input graph as :func:`resolve` would,
    composing each input stage's config and running its stage check and :func:`atm.engine.loop.check_trainer`,
    and check every role's reachability: the role's stage produces the artifact the role needs (a tokenizer
    for ``tokenizer_run``, a model checkpoint for the others), a ``runs:/<id>`` exists, a path is a saved
    checkpoint (``config.json``) or tokenizer. Finally the consumer's ``check_inputs`` (:class:`Stage`) sees
    the inputs' model configs (e.g. a layer mapping against the teacher's depth). Nothing is trained or written,
    and the tracking store is not read: the ``runs:/<id>`` references found are returned, for
    :func:`check_runs` once the store is configured.

    Returns:
        ``[(role, run id), ...]``: the run references of the graph.

    Raises:
        AtmError: naming the role (and the input stage whose config is bad), the key and the value.
    """
    runs: list[tuple[str, str]] = []
    _check_graph(cfg, (stage_of(cfg).name,), set(), runs)
    return runs


def check_runs(runs: list[tuple[str, str]], cfg: DictConfig) -> None:
    """Every ``(role, run id)`` of :func:`check_inputs` names a run of the configured tracking store.

    Raises:
        AtmError: ``<role>=runs:/<id>: no such MLflow run at <uri>``.
    """
    if not runs:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for role, run_id in runs:
        try:
            MlflowClient().get_run(run_id)
        except (MlflowException, OSError):
            raise AtmError(f"{role}=runs:/{run_id}: no such MLflow run at {tracking.tracking_uri(cfg)}") from None


def _check_graph(cfg: DictConfig, chain: tuple[str, ...], seen: set, runs: list) -> None:
    models = {role: _check_role(role, cfg, chain, seen, runs) for role in input_roles(cfg)}
    stage = stage_of(cfg)
    if stage.check_inputs is not None:
        stage.check_inputs(cfg, models)


def _check_role(role: str, cfg: DictConfig, chain: tuple[str, ...], seen: set, runs: list) -> dict | None:
    """Check one role of ``cfg`` (see :func:`check_inputs`); return the input's model config when known."""
    ref = cfg.get(role)
    if ref is None or str(ref) == "":
        raise AtmError(f"input '{role}' of stage {cfg.stage.name} is not set (give {role}=<stage|runs:/id|path>)")
    ref = str(ref)
    # what the role needs: atm's own stages load a tokenizer (tokenizer_run) or a model checkpoint (every other
    # role); a stage declared outside atm says what its roles accept in its own check_inputs
    needed = None
    if stage_of(cfg).module.startswith("atm."):
        needed = "tokenizer" if role == "tokenizer_run" else tracking.CHECKPOINT
    if ref.startswith("runs:/"):
        runs.append((role, ref[len("runs:/"):].strip("/")))
        return None
    name = canonical_name(ref)
    if name in all_stages():
        overrides = _input_overrides(cfg, name)
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            sub_cfg = compose_stage(name, overrides)
        except (HydraException, OmegaConfBaseException) as err:  # a bad lineage.overrides entry
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise AtmError(f"{role}={ref}: cannot compose stage {name} with {overrides}: {first}") from None
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            return _check_path(role, path, needed) if needed else None
        sub_cfg = _declared_elsewhere(cfg, ref)
        if sub_cfg is None:
            raise AtmError(f"{role}={ref!r} is neither a stage ({', '.join(sorted(all_stages()))}), a run "
                           f"(runs:/<id>) nor an existing checkpoint directory")
    sub = stage_of(sub_cfg)
    if needed and sub.artifact != needed:
        raise AtmError(f"{role}={ref}: stage {sub.name} produces a {sub.artifact}, not the {needed} that "
                       f"role {role} of stage {cfg.stage.name} needs")
    if sub.name in chain:
        raise AtmError(f"{role}={ref}: the inputs form a cycle ({' -> '.join((*chain, sub.name))})")
    key = (sub.name, tuple(_input_overrides(cfg, sub.name)))
    if key not in seen:
        seen.add(key)
        from atm.engine.loop import check_trainer

        try:
            sub.validate(sub_cfg)
            if sub_cfg.get("trainer") is not None:
                check_trainer(sub_cfg.trainer)
        except AtmError as err:
            raise AtmError(f"input {role}={ref} (stage {sub.name}, trained first): {err}") from None
        _check_graph(sub_cfg, (*chain, sub.name), seen, runs)
    model = sub_cfg.get("model") if "model" in sub.reads else None
    return OmegaConf.to_container(model, resolve=True) if model is not None else None


def _check_path(role: str, path: Path, needed: str) -> dict | None:
    """A checkpoint directory given as ``role``: a saved model (``config.json``) or, for ``tokenizer_run``, a saved
    tokenizer; returns the model's config (None for a tokenizer).

    Raises:
        AtmError: naming the role, the path and the file missing.
    """
    if needed == "tokenizer":
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise AtmError(f"{role}={path}: no tokenizer.json or tokenizer_config.json (not a saved tokenizer)")
        return None
    config = path / "config.json"
    if not config.is_file():
        raise AtmError(f"{role}={path}: not a checkpoint directory (no config.json; give a directory written by "
                       "save_pretrained, a stage or runs:/<id>)")
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AtmError(f"{config}: unreadable checkpoint config ({err})") from None
    if not isinstance(loaded, dict):
        raise AtmError(f"{config}: not a model config (a JSON object)")
    return loaded


def run_hash(cfg: DictConfig, inputs: dict[str, Input]) -> str:
    """The config hash of a run of ``cfg`` over resolved ``inputs`` (see :func:`atm.tracking.config_hash`)."""
    return tracking.config_hash(cfg, stage_of(cfg).hashed_keys(cfg),
                                {role: inp.identity for role, inp in inputs.items()})


def resolve(role: str, cfg: DictConfig, experiment_id: str, train: Trainer) -> Input:
    """Resolve input ``role`` of ``cfg`` to a local checkpoint directory.

    Args:
        role: a top-level config key naming the input (``teacher``, ``init``, ``encoder``, ...).
        train: ``train(stage_cfg, its_inputs, its_hash)`` trains a composed stage config and returns the id
            of its FINISHED run.

    Raises:
        AtmError: the reference is unset, names no stage, run or path, or the stage has no finished run
            and ``lineage.train_missing`` is false.
    """
    ref = cfg.get(role)
    if ref is None or str(ref) == "":
        raise AtmError(f"input '{role}' of stage {cfg.stage.name} is not set (give {role}=<stage|runs:/id|path>)")
    ref = str(ref)
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/")
        return _from_run(role, run_id, cfg)
    stage = canonical_name(ref)
    if stage in all_stages():
        sub_cfg = compose_stage(stage, _input_overrides(cfg, stage))
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            return Input(role, path)
        sub_cfg = _declared_elsewhere(cfg, ref)
        if sub_cfg is None:
            raise AtmError(f"{role}={ref!r} is neither a stage ({', '.join(sorted(all_stages()))}), a run "
                           f"(runs:/<id>) nor an existing checkpoint directory")
        stage = stage_of(sub_cfg).name
    sub_inputs = resolve_inputs(sub_cfg, experiment_id, train)
    hash_ = run_hash(sub_cfg, sub_inputs)
    run_id = tracking.find_finished_run(experiment_id, stage, hash_)
    if run_id is None:
        if not cfg.lineage.train_missing:
            raise AtmError(f"{role}={ref}: no finished {stage} run with config hash {hash_} in experiment "
                           f"'{cfg.tracking.experiment}' and lineage.train_missing=false")
        with _lock(cfg, f"{stage}-{hash_}"):
            run_id = tracking.find_finished_run(experiment_id, stage, hash_) or train(sub_cfg, sub_inputs, hash_)
    return _from_run(role, run_id, cfg)


def _input_overrides(cfg: DictConfig, stage: str) -> list[str]:
    """The overrides of an input of ``stage``: the inherited command-line ones, then ``lineage.overrides``."""
    return inherited_overrides(cfg) + list(cfg.lineage.overrides.get(stage, []))


def _declared_elsewhere(cfg: DictConfig, ref: str) -> DictConfig | None:
    """The composed config of ``stage=<ref>`` when ``ref`` is a stage declared outside atm (its config file
    names ``stage.module``), else None."""
    try:
        sub_cfg = compose_stage(ref, _input_overrides(cfg, ref))
    except Exception:  # no conf/stage/<ref>.yaml on the search path (Hydra's MissingConfigException, ...)
        return None
    return sub_cfg if sub_cfg.stage.get("module") else None


def _from_run(role: str, run_id: str, cfg: DictConfig) -> Input:
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except Exception as err:
        raise AtmError(f"{role}=runs:/{run_id}: no such MLflow run at {tracking.tracking_uri(cfg)}") from err
    stage = run.data.tags.get(tracking.TAG_STAGE)
    stages = all_stages()
    artifact = stages[stage].artifact if stage in stages else tracking.CHECKPOINT
    return Input(role, tracking.download(run_id, artifact, cfg.tracking.cache_dir), run_id, stage,
                 run.data.tags.get(tracking.TAG_HASH))
