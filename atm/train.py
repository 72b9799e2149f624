"""The one entrypoint: ``python -m atm.train stage=<stage> [overrides]``; ``-m`` with ``+sweep=<name>`` sweeps.

The job composes ``conf/``, resolves the stage's inputs by role (training missing ones first, see
:mod:`atm.lineage`), runs the stage inside an MLflow run (:mod:`atm.tracking`) and returns the stage's
objective metric (``stage.objective``), which the Optuna sweeper optimises. A bad input prints
``error: <one line>`` and exits with status 2; inside a sweep the trial is recorded as failed instead.
"""

from __future__ import annotations

import importlib.resources
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from atm import sweeps
from atm.engine import deepspeed as distributed
from atm.errors import AtmError
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
    life = RunLifecycle.prepare(cfg)  # stage, config checks, tracking, data directories, ranks
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
        sys.exit(2)


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


if __name__ == "__main__":
    try:
        sys.argv[1:] = normalise_argv(sys.argv[1:])
    except AtmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
