"""The one entrypoint: ``python -m atm.train stage=<stage> [overrides]``; ``-m`` with ``+sweep=<name>`` sweeps.

The job composes ``conf/``, resolves the stage's inputs by role (training missing ones first, see
:mod:`atm.lineage`), runs the stage inside an MLflow run (:mod:`atm.tracking`) and returns the stage's
objective metric (``stage.objective``), which the Optuna sweeper optimises. A bad input prints
``error: <one line>`` and exits with status 2; inside a sweep the trial is recorded as failed instead.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from atm import sweeps
from atm.engine import deepspeed as distributed
from atm.errors import AtmError, Interrupted
from atm.lineage import CONF_DIR, Input
from atm.run import RunLifecycle
from atm.stages.registry import all_stages, canonical_name, get_stage, import_stage_module

log = logging.getLogger("atm")


def execute(cfg: DictConfig, inputs: dict[str, Input] | None = None,
            hash_: str | None = None) -> tuple[str, dict[str, float]]:
    """Run ``cfg``'s stage in a new (or resumed) MLflow run; return ``(run_id, final metrics)``.

    ``inputs``/``hash_`` are given when lineage trains this stage as another stage's input. The phases are
    those of :class:`atm.run.RunLifecycle`.

    Raises:
        AtmError: unknown stage, unresolvable input, bad data, missing objective metric.
    """
    # stage, config checks (with the dry pass over the inputs at the top level), tracking, data directories, ranks
    life = RunLifecycle.prepare(cfg, check_inputs=inputs is None)
    life.resolve_inputs(_train_input, inputs, hash_)  # lineage: trains missing inputs through execute
    with life.open() as run:  # resumed or new run, nested in the sweep's parent in a sweep
        metrics = life.run_stage(run)
    life.record_trial(run.info.run_id, metrics)
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
        sys.exit(err.exit_code)  # 2; 130 for an interrupt (atm.errors.Interrupted)


def normalise_argv(argv: list[str]) -> list[str]:
    """Expand stage aliases (``stage=stage2``) and reject an unknown ``stage=`` with one line, before
    Hydra would print its multi-line listing; likewise an override Hydra cannot parse (``x=choice()``,
    an empty sweep). A stage declared outside atm is known by its config file ``stage/<name>.yaml`` on the
    search path (``hydra.searchpath=[file://...]``), whose ``stage.module`` is imported here.
    ``-m``/``--multirun`` moves to the front (Python's argparse rejects overrides on both sides of it:
    ``+sweep=x -m a=b``). Raises AtmError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    flags = [a for a in argv if a in ("-m", "--multirun")]
    out = flags[:1]
    search = [CONF_DIR, *(d for a in argv if a.startswith(("hydra.searchpath=", "+hydra.searchpath="))
                          for d in _search_dirs(parser, a))]
    for arg in (a for a in argv if a not in flags):
        if arg.startswith("~") or ("=" in arg and not arg.startswith("-")):  # an override, not an option value
            try:
                parser.parse_override(arg)
            except Exception as err:  # Hydra's OverrideParseException: 3 lines, the reason in the second
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                raise AtmError(f"cannot parse override {arg!r}: {lines[1] if len(lines) > 1 else lines[0]}") from None
        if arg.startswith("stage=") and "(" not in arg:
            arg = "stage=" + ",".join(_known_stage(name, search) for name in arg[len("stage="):].split(","))
        out.append(arg)
    return out


def _search_dirs(parser, arg: str) -> list[Path]:
    """The directories of a ``hydra.searchpath=[...]`` override's ``file://<dir>`` and ``pkg://<package>``
    entries (none when it does not parse: the main loop reports that)."""
    try:
        entries = parser.parse_override(arg).value()
    except Exception:
        return []
    return [d for d in map(_search_dir, entries if isinstance(entries, list) else [entries]) if d is not None]


def _search_dir(entry: str) -> Path | None:
    """The directory of a Hydra search path entry (``file://<dir>`` or ``pkg://<package>``), if it has one."""
    entry = str(entry)
    if entry.startswith("file://"):
        return Path(entry[len("file://"):])
    if entry.startswith("pkg://"):
        try:
            return Path(str(importlib.resources.files(entry[len("pkg://"):].replace("/", "."))))
        except (ImportError, TypeError):
            return None
    return None


def _known_stage(name: str, search: list[Path]) -> str:
    """The stage name of ``name`` (an alias expanded). A name unknown to the registry is looked up as
    ``stage/<name>.yaml`` in the ``search`` directories, and the module it names (``stage.module``) imported.

    Raises:
        AtmError: an unknown stage (naming the known ones).
    """
    if canonical_name(name) not in all_stages():
        for conf in search:
            path = conf / "stage" / f"{name}.yaml"
            if path.is_file():
                import_stage_module(OmegaConf.load(path).get("stage"))
                break
    return get_stage(name).name


def hydra_error(err: BaseException, argv: list[str]) -> AtmError | None:
    """One line for an error Hydra raises before (or around) the job: an unknown config group option
    (``model=doesnotexist``, ``+sweep=nonexistent``: the available choices), an unknown key (``trainer.bogus_key=1``,
    ``foo=1``: the keys there), another composition error (its first line), or an unwritable working directory
    (the path). None for anything else (a bug: its traceback is shown)."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, MissingConfigException):
        missing = str(err.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        if group and err.options:
            return AtmError(f"unknown {group} '{option}' (available {group} options: {', '.join(err.options)})")
        return AtmError(_first_line(err).removeprefix("In 'config': "))
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            parent = str(key).rpartition(".")[0]
            known = _known_keys(parent, argv)
            where = f"'{parent}'" if parent else "the config"
            listing = f" (keys of {where}: {', '.join(known)})" if known else ""
            return AtmError(f"unknown config key '{key}'{listing}; to add a new key write +{key}=<value>")
        return AtmError(_first_line(err))
    if isinstance(err, OSError) and err.filename is not None:
        return AtmError(f"cannot write {os.path.abspath(err.filename)}: {err.strerror or err} (run in a writable "
                        "directory, or set hydra.run.dir / hydra.sweep.dir and tracking.cache_dir to writable paths)")
    return None


def _first_line(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def _known_keys(parent: str, argv: list[str]) -> list[str]:
    """The keys of config node ``parent`` ('' = the root) in the config composed with the command line's
    group choices (``stage=...``, ``model=...``); [] when it cannot be composed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    choices = [a for a in argv if "=" in a and not a.startswith(("-", "~", "hydra")) and "." not in a.split("=")[0]
               and "," not in a and a.split("=")[0].lstrip("+") in _GROUPS]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            node = OmegaConf.select(compose(config_name="config", overrides=choices), parent) if parent else \
                compose(config_name="config", overrides=choices)
    except Exception:  # noqa: BLE001 - only a listing; the error itself is reported anyway
        return []
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


_GROUPS = tuple(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def cli(argv: list[str]) -> None:
    """``python -m atm.train``: expand the arguments (:func:`normalise_argv`) and run :func:`main`; a bad input
    (ours or Hydra's, :func:`hydra_error`) prints ``error: <one line>`` and exits with status 2. With
    ``HYDRA_FULL_ERROR=1`` Hydra's own errors keep their traceback."""
    import hydra._internal.utils as hydra_utils

    try:
        sys.argv[1:] = argv = normalise_argv(argv)
        if os.environ.get("HYDRA_FULL_ERROR") != "1":
            hydra_utils.run_and_report = _raise  # Hydra's errors reach us instead of its multi-line report
        try:
            main()
        except Exception as err:
            converted = None if isinstance(err, AtmError) else hydra_error(err, argv)
            if converted is None:
                raise
            raise converted from None
    except AtmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # outside the training loop (data preparation, tokenizer training, scoring)
        print("error: interrupted; rerun the same command (a run with a training state resumes from it)",
              file=sys.stderr)
        sys.exit(Interrupted.exit_code)


def _raise(func):
    return func()


if __name__ == "__main__":
    cli(sys.argv[1:])
