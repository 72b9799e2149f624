"""Where the ``analysis/*.py`` scripts read runs from: their CLI, the MLflow store, and the one way to query runs.

Conventions (atm's tag names and defaults are :mod:`atm.tracking`'s; the scripts import them from there):

* Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the current
  directory (:func:`atm.tracking.tracking_uri`).  Experiment: ``--experiment``, else ``$ATM_EXPERIMENT``, else
  ``atm``.
* Every run carries ``atm.stage``.  An *evaluate* run (``atm.stage=evaluate``) scores the saved checkpoints of one
  training run (``atm.evaluated_run_id``, ``atm.evaluated_stage``) and logs its metrics with ``step`` = the
  checkpoint's training step.  A sweep trial carries ``atm.sweep`` and ``optuna.trial_number``.
* An analysis script logs its outputs as artifacts of a new run tagged ``atm.stage=analysis``,
  ``atm.analysis=<script name>``, ``atm.consumed_run_ids=<comma-joined run ids>`` (:mod:`analysis._output`).

Every script queries runs through :class:`RunIndex`: all active runs of one experiment, fetched once, with the
lineage look-ups of atm's tags (:meth:`RunIndex.of_stage`, :meth:`RunIndex.select`,
:meth:`RunIndex.evaluate_runs`, :meth:`RunIndex.select_evaluate`, :meth:`RunIndex.input`, ...).

User errors are raised as :class:`atm.errors.AtmError` (one line); :func:`run_main` turns them into
``error: <message>`` on stderr and exit status 2.  ``mlflow`` is imported lazily so that ``--help`` stays fast.

Typical use from a script::

    index = RunIndex.open(args)
    runs = index.evaluate_runs()
    frame = metric_history_frame(index.client, runs, prefix="eval/")  # analysis._runs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atm.errors import ArgumentParser, AtmError
from atm.tracking import DEFAULT_URI, TAG_INPUT, TAG_STAGE, TAG_SWEEP, TAG_SWEEP_PARENT, tracking_uri

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run

#: atm's experiment unless ``tracking.experiment`` says otherwise (conf/tracking).
DEFAULT_EXPERIMENT = "atm"
#: Tags of an evaluate run (written by atm.stages.evaluate).
TAG_EVALUATED_RUN_ID = "atm.evaluated_run_id"
TAG_EVALUATED_STAGE = "atm.evaluated_stage"
#: MLflow's own tag of a nested run (a sweep trial): its parent run's id.
TAG_PARENT_RUN = "mlflow.parentRunId"
STAGE_EVALUATE = "evaluate"
PRETRAIN_STAGE_PREFIX = "pretrain"

EVALUATE_HINT = "run `python -m atm.train stage=evaluate ...` first"


# ---------------------------------------------------------------------------------------------
# CLI plumbing


def add_store_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri`` and ``--experiment`` with the atm defaults."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_URI} in the current directory)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help=f"MLflow experiment name (default: $ATM_EXPERIMENT, else {DEFAULT_EXPERIMENT!r})",
    )


def resolve_tracking_uri(value: str | None) -> str:
    """``value``, else atm's tracking URI (``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    return value or tracking_uri()


def resolve_experiment_name(value: str | None) -> str:
    """``value``, else ``$ATM_EXPERIMENT``, else :data:`DEFAULT_EXPERIMENT`."""
    return value or os.environ.get("ATM_EXPERIMENT") or DEFAULT_EXPERIMENT


def local_store_uri(directory: Path | str) -> str:
    """The store atm writes by default (:data:`atm.tracking.DEFAULT_URI`, relative to the working directory)
    as seen from a process that ran ``python -m atm.train`` in ``directory``, e.g. ``sqlite:////tmp/x/mlflow.db``."""
    scheme = "sqlite:///"
    return scheme + str(Path(directory) / DEFAULT_URI.removeprefix(scheme))


def analysis_parser(name: str, description: str, run_ids_help: str) -> argparse.ArgumentParser:
    """The CLI every ``analysis/<name>.py`` starts from.

    Options: ``--tracking-uri``, ``--experiment`` (:func:`add_store_args`), ``--run-id RUN_ID...``
    (repeatable; what the ids select is ``run_ids_help``), ``--out DIR`` (default
    ``analysis/out/<name>``) and ``--no-log``.
    """
    parser = ArgumentParser(prog=f"python analysis/{name}.py", description=description)
    add_store_args(parser)
    parser.add_argument("--run-id", dest="run_ids", action="extend", nargs="+", metavar="RUN_ID",
                        help=run_ids_help)
    default_out = Path("analysis") / "out" / name
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"output directory, relative to the current directory (default: {default_out}/)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the analysis run to MLflow (only print and write files)")
    return parser


def run_main(body: Callable[[], int]) -> int:
    """Call ``body()``; turn :class:`AtmError` (and MLflow errors) into one line + status 2."""
    try:
        return body()
    except AtmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # MLflow errors caused by the store/URI the user pointed us at
        if type(exc).__name__ != "MlflowException":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: mlflow: {first}", file=sys.stderr)
        return 2


def cli(build_parser: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], int],
        argv: Sequence[str] | None = None) -> int:
    """A script's ``main``: parse ``argv`` with ``build_parser()`` and return :func:`run_main` of
    ``body(args)`` (0 ok, 2 and one ``error:`` line for a user error)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: body(args))


# ---------------------------------------------------------------------------------------------
# connecting


def _quiet_mlflow_logging() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_local_store_exists(uri: str) -> None:
    """Refuse to silently create an empty store when pointed at a local path that isn't there."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            return  # in-memory or unusual form: let MLflow judge it
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path in ("", ":memory:"):
            return
        if not Path(path).is_file():
            raise AtmError(
                f"no MLflow store at {Path(path).resolve()} (tracking URI {uri}); pass "
                f"--tracking-uri or set MLFLOW_TRACKING_URI, or {EVALUATE_HINT}"
            )
        return
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")
        if not Path(path).is_dir():
            raise AtmError(f"no MLflow store at {Path(path).resolve()} (tracking URI {uri})")


def connect(uri: str | None) -> tuple[MlflowClient, str]:
    """Return ``(client, resolved_uri)`` for tracking URI ``uri`` (or the atm default, :func:`resolve_tracking_uri`).

    Raises:
        AtmError: a ``sqlite:///`` file or local directory that does not exist (a store is never created).
    """
    uri = resolve_tracking_uri(uri)
    _check_local_store_exists(uri)
    _quiet_mlflow_logging()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def get_experiment(client: MlflowClient, name: str, uri: str) -> Experiment:
    """The active experiment called ``name``.

    Raises:
        AtmError: no such (active) experiment; the message lists the existing ones.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        state = "not found" if exp is None else "is deleted"
        raise AtmError(
            f"experiment {name!r} {state} at {uri} (experiments there: "
            f"{', '.join(names) or 'none'}); pass --experiment, or {EVALUATE_HINT}"
        )
    return exp


def search_all_runs(client: MlflowClient, experiment_ids: Sequence[str], filter_string: str = "") -> list[Run]:
    """All active runs matching ``filter_string`` (follows MLflow's pagination), oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiment_ids),
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_label(run: Run) -> str:
    """``"<run id> (<run name>)"``, or the run id alone for an unnamed run (in messages)."""
    return f"{run.info.run_id} ({run.info.run_name})" if run.info.run_name else run.info.run_id


def is_sweep_trial(run: Run) -> bool:
    """True for a trial of a sweep (a nested run tagged ``atm.sweep``)."""
    tags = run.data.tags
    return TAG_SWEEP in tags and TAG_SWEEP_PARENT not in tags


# ---------------------------------------------------------------------------------------------
# the run index


class RunIndex:
    """Every active run of one experiment, fetched once, with the lineage look-ups of atm's tags.

    Attributes:
        client, experiment, uri: where the runs come from.
        runs: all active runs, oldest first; ``by_id`` maps run id -> run.
    """

    def __init__(self, client: MlflowClient, experiment: Experiment, uri: str):
        self.client, self.experiment, self.uri = client, experiment, uri
        self.runs = search_all_runs(client, [experiment.experiment_id])
        self.by_id = {r.info.run_id: r for r in self.runs}

    @classmethod
    def open(cls, args: argparse.Namespace) -> RunIndex:
        """Connect to ``args.tracking_uri`` and index experiment ``args.experiment``.

        Raises:
            AtmError: no store there, or no such experiment.
        """
        return cls.at(args.tracking_uri, resolve_experiment_name(args.experiment))

    @classmethod
    def at(cls, uri: str | None, experiment: str = DEFAULT_EXPERIMENT) -> RunIndex:
        """Connect to tracking URI ``uri`` (None: atm's default) and index experiment ``experiment``.

        Raises:
            AtmError: no store there, or no such experiment.
        """
        client, uri = connect(uri)
        return cls(client, get_experiment(client, experiment, uri), uri)

    @property
    def where(self) -> str:
        return f"in experiment {self.experiment.name!r} at {self.uri}"

    def of_stage(self, *stages: str, finished_only: bool = True) -> list[Run]:
        """Runs whose ``atm.stage`` is one of ``stages`` (FINISHED ones only by default), oldest first."""
        return [r for r in self.runs if r.data.tags.get(TAG_STAGE) in stages
                and (not finished_only or r.info.status == "FINISHED")]

    def get(self, run_id: str) -> Run:
        """The run ``run_id`` (it may live in another experiment of the store).

        Raises:
            AtmError: no such run, or it is deleted.
        """
        if run_id in self.by_id:
            return self.by_id[run_id]
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise AtmError(f"run id {run_id!r} not found at {self.uri}") from None
        if run.info.lifecycle_stage != "active":
            raise AtmError(f"run {run_label(run)} is deleted")
        self.by_id[run_id] = run
        return run

    def select(self, run_ids: Sequence[str], stages: Sequence[str], option: str = "--run-id") -> list[Run]:
        """The runs ``run_ids`` (deduplicated, in order), each of which must have a stage in ``stages``.

        Raises:
            AtmError: an unknown or deleted run id, or a run of another stage.
        """
        runs = []
        for run_id in dict.fromkeys(run_ids):
            run = self.get(run_id)
            stage = run.data.tags.get(TAG_STAGE)
            if stage not in stages:
                raise AtmError(f"run {run_label(run)} is a {stage!r} run; {option} takes runs of stage "
                               f"{' or '.join(stages)}")
            runs.append(run)
        return runs

    def evaluate_runs(self, stages: Iterable[str] | None = None, stage_prefix: str | None = PRETRAIN_STAGE_PREFIX,
                      finished_only: bool = True) -> list[Run]:
        """The evaluate runs of the experiment, filtered by the stage they evaluated, oldest first.

        Args:
            stages: keep runs whose ``atm.evaluated_stage`` is one of these (exact names); when ``None``, keep
                those whose evaluated stage starts with ``stage_prefix`` (default ``"pretrain"``:
                ``pretrain_stage1``, ``pretrain_stage2``, ...; ``None`` = all).
            finished_only: keep only runs with status ``FINISHED`` (a note on stderr says how many unfinished
                ones were skipped).

        Raises:
            AtmError: no evaluate run is left after filtering (the message says what was found).
        """
        all_eval = self.of_stage(STAGE_EVALUATE, finished_only=False)
        if not all_eval:
            raise AtmError(f"no evaluate runs {self.where}; {EVALUATE_HINT}")
        wanted = set(stages) if stages is not None else None

        def stage_ok(run: Run) -> bool:
            st = run.data.tags.get(TAG_EVALUATED_STAGE, "")
            if wanted is not None:
                return st in wanted
            return stage_prefix is None or st.startswith(stage_prefix)

        by_stage = [r for r in all_eval if stage_ok(r)]
        kept = [r for r in by_stage if not finished_only or r.info.status == "FINISHED"]
        skipped = [r for r in by_stage if r not in kept]
        if skipped:
            print(
                f"note: skipped {len(skipped)} unfinished evaluate run(s): "
                + ", ".join(f"{run_label(r)} {r.info.status}" for r in skipped)
                + "; pass --run-id to include them",
                file=sys.stderr,
            )
        if not kept:
            found = sorted({r.data.tags.get(TAG_EVALUATED_STAGE, "<untagged>") for r in all_eval})
            wanted_txt = (
                "stages " + ", ".join(sorted(wanted)) if wanted is not None
                else f"stages {stage_prefix}*" if stage_prefix else "any stage"
            )
            raise AtmError(
                f"no {'finished ' if finished_only else ''}evaluate runs of {wanted_txt} {self.where} "
                f"({len(all_eval)} evaluate run(s) of stages: {', '.join(found)}, "
                f"{len(skipped)} unfinished); {EVALUATE_HINT}"
            )
        return kept

    def select_evaluate(self, run_ids: Sequence[str]) -> list[Run]:
        """The evaluate runs ``run_ids`` (deduplicated, in order), of any status.

        Raises:
            AtmError: an unknown or deleted run id, or a run that is not an evaluate run (the message names
                the evaluate runs that scored it, if any).
        """
        runs = []
        for run_id in dict.fromkeys(run_ids):
            run = self.get(run_id)
            stage = run.data.tags.get(TAG_STAGE)
            if stage != STAGE_EVALUATE:
                children = search_all_runs(self.client, [run.info.experiment_id],
                                           f"tags.\"{TAG_EVALUATED_RUN_ID}\" = '{run.info.run_id}'")
                hint = ("its evaluate runs: " + ", ".join(r.info.run_id for r in children) if children
                        else "no evaluate run references it")
                raise AtmError(f"run {run_label(run)} is not an evaluate run ({TAG_STAGE}={stage!r}); "
                               f"--run-id takes evaluate run ids; {hint}")
            runs.append(run)
        return runs

    def input(self, run: Run, role: str) -> Run | None:
        """The run that ``run``'s input ``role`` resolved to (tag ``atm.input.<role>``), or None when
        the role is absent, was a path, or its run no longer exists."""
        run_id = run.data.tags.get(TAG_INPUT + role, "")
        if not run_id or run_id == "path":
            return None
        try:
            return self.get(run_id)
        except AtmError:
            return None

    def consumers(self, run_id: str, role: str, stage: str | None = None,
                  finished_only: bool = True) -> list[Run]:
        """Runs (of ``stage``, if given) whose input ``role`` is ``run_id``, oldest first."""
        return [r for r in self.runs if r.data.tags.get(TAG_INPUT + role) == run_id
                and (stage is None or r.data.tags.get(TAG_STAGE) == stage)
                and (not finished_only or r.info.status == "FINISHED")]

    def evaluations(self, run_id: str) -> list[Run]:
        """Finished evaluate runs that scored the checkpoints of training run ``run_id``, oldest first."""
        return [r for r in self.runs if r.data.tags.get(TAG_STAGE) == STAGE_EVALUATE
                and r.data.tags.get(TAG_EVALUATED_RUN_ID) == run_id and r.info.status == "FINISHED"]
