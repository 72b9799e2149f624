"""Shared helpers for the ``analysis/*.py`` scripts: MLflow runs -> pandas, CLI plumbing, output.

Conventions (shared with :mod:`atm`'s tracking code):

* Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in
  the current directory.  Experiment: ``--experiment``, else ``$ATM_EXPERIMENT``, else ``atm``.
* Every run carries ``atm.stage``.  An *evaluate* run (``atm.stage=evaluate``) scores the saved
  checkpoints of one training run (``atm.evaluated_run_id``, ``atm.evaluated_stage``) and logs
  its metrics with ``step`` = the checkpoint's training step.
* An analysis script logs its outputs as artifacts of a new run tagged ``atm.stage=analysis``,
  ``atm.analysis=<script name>``, ``atm.consumed_run_ids=<comma-joined run ids>``.

User errors are raised as :class:`atm.errors.AtmError` (one line); :func:`run_main` turns them
into ``error: <message>`` on stderr and exit status 2.  ``mlflow`` is imported lazily so that
``--help`` stays fast.

Typical use from a script::

    client, uri = connect(args.tracking_uri)
    experiment = get_experiment(client, args.experiment, uri)
    runs = find_evaluate_runs(client, experiment, uri)
    frame = metric_history_frame(client, runs, prefix="eval/")
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "atm"

TAG_STAGE = "atm.stage"
TAG_EVALUATED_RUN_ID = "atm.evaluated_run_id"
TAG_EVALUATED_STAGE = "atm.evaluated_stage"
TAG_ANALYSIS = "atm.analysis"
TAG_CONSUMED_RUN_IDS = "atm.consumed_run_ids"
STAGE_EVALUATE = "evaluate"
STAGE_ANALYSIS = "analysis"
PRETRAIN_STAGE_PREFIX = "pretrain"

_MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH

EVALUATE_HINT = "run `python -m atm.train stage=evaluate ...` first"

#: Leading columns of :func:`metric_history_frame`; every other column is a metric key.
FRAME_ID_COLUMNS = (
    "eval_run_id",
    "eval_run_name",
    "evaluated_run_id",
    "evaluated_run_name",
    "evaluated_stage",
    "step",
)


# ---------------------------------------------------------------------------------------------
# CLI plumbing


def add_store_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--tracking-uri`` and ``--experiment`` with the atm defaults."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI} in the current directory)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help=f"MLflow experiment name (default: $ATM_EXPERIMENT, else {DEFAULT_EXPERIMENT!r})",
    )


def resolve_tracking_uri(value: str | None) -> str:
    return value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve_experiment_name(value: str | None) -> str:
    return value or os.environ.get("ATM_EXPERIMENT") or DEFAULT_EXPERIMENT


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


def connect(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """Return ``(client, resolved_uri)`` for ``tracking_uri`` (or the atm default).

    Never creates a store: a ``sqlite:///`` file or local directory that does not exist is an
    :class:`AtmError`.
    """
    uri = resolve_tracking_uri(tracking_uri)
    _check_local_store_exists(uri)
    _quiet_mlflow_logging()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def get_experiment(client: MlflowClient, name: str, uri: str) -> Experiment:
    """The active experiment called ``name``; AtmError listing the existing ones if absent."""
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        state = "not found" if exp is None else "is deleted"
        raise AtmError(
            f"experiment {name!r} {state} at {uri} (experiments there: "
            f"{', '.join(names) or 'none'}); pass --experiment, or {EVALUATE_HINT}"
        )
    return exp


# ---------------------------------------------------------------------------------------------
# finding runs


def search_all_runs(
    client: MlflowClient, experiment_ids: Sequence[str], filter_string: str = ""
) -> list[Run]:
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
    return f"{run.info.run_id} ({run.info.run_name})" if run.info.run_name else run.info.run_id


def find_evaluate_runs(
    client: MlflowClient,
    experiment: Experiment,
    uri: str,
    stages: Iterable[str] | None = None,
    stage_prefix: str | None = PRETRAIN_STAGE_PREFIX,
    finished_only: bool = True,
) -> list[Run]:
    """Evaluate runs of ``experiment``, filtered by the stage they evaluated.

    Args:
        stages: keep runs whose ``atm.evaluated_stage`` is one of these (exact names); when
            ``None``, keep those whose evaluated stage starts with ``stage_prefix`` (default
            ``"pretrain"``: ``pretrain_stage1``, ``pretrain_stage2``, ...; ``None`` = all).
        finished_only: keep only runs with status ``FINISHED`` (a note on stderr says how many
            unfinished ones were skipped).

    Raises:
        AtmError: no evaluate run is left after filtering (message says what was found).
    """
    all_eval = search_all_runs(
        client, [experiment.experiment_id], f"tags.\"{TAG_STAGE}\" = '{STAGE_EVALUATE}'"
    )
    where = f"in experiment {experiment.name!r} at {uri}"
    if not all_eval:
        raise AtmError(f"no evaluate runs {where}; {EVALUATE_HINT}")
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
            f"no {'finished ' if finished_only else ''}evaluate runs of {wanted_txt} {where} "
            f"({len(all_eval)} evaluate run(s) of stages: {', '.join(found)}, "
            f"{len(skipped)} unfinished); {EVALUATE_HINT}"
        )
    return kept


def get_evaluate_runs(client: MlflowClient, run_ids: Sequence[str], uri: str) -> list[Run]:
    """Fetch the given evaluate runs by id, in order; AtmError for unknown/deleted/non-evaluate."""
    from mlflow.exceptions import MlflowException

    runs: list[Run] = []
    for run_id in dict.fromkeys(run_ids):  # dedupe, keep order
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise AtmError(f"run id {run_id!r} not found at {uri}") from None
        if run.info.lifecycle_stage != "active":
            raise AtmError(f"run {run_label(run)} is deleted")
        stage = run.data.tags.get(TAG_STAGE)
        if stage != STAGE_EVALUATE:
            children = search_all_runs(
                client,
                [run.info.experiment_id],
                f"tags.\"{TAG_EVALUATED_RUN_ID}\" = '{run.info.run_id}'",
            )
            hint = (
                "its evaluate runs: " + ", ".join(r.info.run_id for r in children)
                if children
                else "no evaluate run references it"
            )
            raise AtmError(
                f"run {run_label(run)} is not an evaluate run ({TAG_STAGE}={stage!r}); "
                f"--run-id takes evaluate run ids; {hint}"
            )
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# runs -> frames


def metric_history_frame(
    client: MlflowClient,
    runs: Sequence[Run],
    keys: Iterable[str] | None = None,
    prefix: str | None = None,
    resolve_evaluated_names: bool = True,
) -> pd.DataFrame:
    """One row per (run, step) with the full metric histories as columns.

    Args:
        runs: evaluate runs (or any runs that log metrics against a ``step``).
        keys: metric keys to read (missing ones are simply absent for that run); ``None`` = all
            keys the run logged, optionally restricted to those starting with ``prefix``.
        resolve_evaluated_names: look up the name of each run's ``atm.evaluated_run_id`` run
            (empty string if it no longer exists).

    Returns:
        DataFrame with columns :data:`FRAME_ID_COLUMNS` followed by the metric keys (sorted);
        cells a run did not log at that step are NaN.  Rows keep the order of ``runs`` and are
        sorted by ``step`` within a run.  If a metric was logged more than once at one step, the
        value with the latest timestamp wins.
    """
    import pandas as pd

    wanted = list(keys) if keys is not None else None
    name_cache: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    all_keys: set[str] = set()
    for run in runs:
        tags = run.data.tags
        run_keys = wanted if wanted is not None else sorted(run.data.metrics)
        if prefix is not None:
            run_keys = [k for k in run_keys if k.startswith(prefix)]
        per_step: dict[int, dict[str, tuple[int, float]]] = {}
        for key in run_keys:
            for m in client.get_metric_history(run.info.run_id, key):
                slot = per_step.setdefault(int(m.step), {})
                if key not in slot or m.timestamp >= slot[key][0]:
                    slot[key] = (m.timestamp, float(m.value))
                all_keys.add(key)
        evaluated_id = tags.get(TAG_EVALUATED_RUN_ID, "")
        evaluated_name = ""
        if resolve_evaluated_names and evaluated_id:
            if evaluated_id not in name_cache:
                name_cache[evaluated_id] = _run_name_or_empty(client, evaluated_id)
            evaluated_name = name_cache[evaluated_id]
        for step in sorted(per_step):
            row: dict[str, Any] = {
                "eval_run_id": run.info.run_id,
                "eval_run_name": run.info.run_name or "",
                "evaluated_run_id": evaluated_id,
                "evaluated_run_name": evaluated_name,
                "evaluated_stage": tags.get(TAG_EVALUATED_STAGE, ""),
                "step": step,
            }
            row.update({k: v for k, (_, v) in per_step[step].items()})
            rows.append(row)
    columns = list(FRAME_ID_COLUMNS) + sorted(all_keys)
    frame = pd.DataFrame(rows, columns=columns)
    frame["step"] = frame["step"].astype("int64")
    for key in all_keys:
        frame[key] = frame[key].astype("float64")
    return frame


def _run_name_or_empty(client: MlflowClient, run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.run_name or ""
    except MlflowException:
        return ""


def runs_frame(runs: Sequence[Run], tag_prefix: str = "atm.") -> pd.DataFrame:
    """One row per run: id, name, status, experiment, ``params.*`` and tags under ``tag_prefix``.

    Handy for joining run-level settings (model size, stage, config) onto a metric frame.
    """
    import pandas as pd

    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name or "",
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
        }
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items() if k.startswith(tag_prefix)})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# output


def format_markdown_table(
    frame: pd.DataFrame, formats: Mapping[str, str | Callable[[Any], str]] | None = None
) -> str:
    """Render ``frame`` as a GitHub-markdown table (no ``tabulate`` dependency).

    ``formats`` maps column -> format spec (``".6f"``) or callable; NaN floats print as ``nan``.
    Numeric columns are right-aligned.
    """
    import pandas as pd

    formats = dict(formats or {})
    headers = [str(c) for c in frame.columns]
    cells: list[list[str]] = []
    for _, row in frame.iterrows():
        out = []
        for col in frame.columns:
            value = row[col]
            fmt = formats.get(col)
            if isinstance(value, float) and math.isnan(value):
                out.append("nan")
            elif callable(fmt):
                out.append(fmt(value))
            elif fmt is not None:
                out.append(format(value, fmt))
            else:
                out.append(str(value))
            out[-1] = out[-1].replace("|", "\\|")
        cells.append(out)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    widths = [
        max([len(h), 3] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
    ) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    Readers never see a half-written file; on failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:  # os.umask can only be read by setting it; do that once
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_csv(path: Path | str, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def log_analysis_run(
    client: MlflowClient,
    experiment_id: str,
    analysis: str,
    consumed_run_ids: Sequence[str],
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[Path | str] = (),
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Record an analysis as a new finished MLflow run; return its run id.

    Tags: ``atm.stage=analysis``, ``atm.analysis=<analysis>``,
    ``atm.consumed_run_ids=<comma-joined ids>``.  Non-finite metric values are not logged.
    Artifacts are logged at the artifact root.  The run is marked FAILED if logging breaks.
    """
    from mlflow.entities import Metric, Param

    consumed = ",".join(dict.fromkeys(consumed_run_ids))
    overflow = len(consumed) > _MAX_TAG_VALUE
    if overflow:  # MLflow caps tag values; the full list goes to consumed_run_ids.txt
        cut = consumed[: _MAX_TAG_VALUE - 64].rsplit(",", 1)[0]
        consumed, full = cut + ",...(see consumed_run_ids.txt)", consumed
    tags = {
        TAG_STAGE: STAGE_ANALYSIS,
        TAG_ANALYSIS: analysis,
        TAG_CONSUMED_RUN_IDS: consumed,
        **(extra_tags or {}),
    }
    run = client.create_run(experiment_id, tags=tags, run_name=analysis)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metric_objs = [
            Metric(key, float(value), now, 0)
            for key, value in (metrics or {}).items()
            if value is not None and math.isfinite(float(value))
        ]
        param_objs = [Param(k, str(v)) for k, v in (params or {}).items()]
        for i in range(0, max(len(metric_objs), 1), 1000):
            client.log_batch(run_id, metrics=metric_objs[i:i + 1000],
                             params=param_objs if i == 0 else ())
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        if overflow:
            client.log_text(run_id, full.replace(",", "\n") + "\n", "consumed_run_ids.txt")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# What every analysis script shares: its CLI, one index of the experiment's runs with lineage
# look-ups, run-level values (MASSIVE scores, model size, fine-tuning variant) and its outputs.

TAG_INPUT = "atm.input."  # + role: the run id the role resolved to (atm.tracking.TAG_INPUT)
TAG_SWEEP = "atm.sweep"
TAG_SWEEP_PARENT = "atm.sweep_parent"
TAG_TRIAL = "atm.trial"
TAG_OPTUNA_TRIAL = "optuna.trial_number"
TAG_TRIAL_STATE = "atm.trial_state"
TAG_PARENT_RUN = "mlflow.parentRunId"
#: Tags of a finetune run (atm.stages.finetune.TAG_SETTING / TAG_FROZEN).
TAG_FINETUNE_SETTING = "atm.finetune.setting"
TAG_FINETUNE_FROZEN = "atm.finetune.freeze_encoder"
STAGE_FINETUNE = "finetune"
#: Training stages whose runs are MLM encoders (their checkpoints are evaluated and fine-tuned).
MLM_STAGES = ("pretrain_stage1", "pretrain_stage2", "distill_intermediate", "distill_final")
MASSIVE_SCORES = ("intent_accuracy", "slot_f1", "exact_match")
#: Params of a finetune run that say how it was trained, compared when two runs are matched; the
#: ``model.*`` params of a finetune run are the config default, not its encoder, so they are left out.
_RECIPE_PREFIXES = ("finetune.", "trainer.", "data.max_seq_len", "seed")
_RECIPE_IGNORED = ("trainer.device", "trainer.log_every")


def analysis_parser(name: str, description: str, run_ids_help: str) -> argparse.ArgumentParser:
    """The CLI every ``analysis/<name>.py`` starts from.

    Options: ``--tracking-uri``, ``--experiment`` (:func:`add_store_args`), ``--run-id RUN_ID...``
    (repeatable; what the ids select is ``run_ids_help``), ``--out DIR`` (default
    ``analysis/out/<name>``) and ``--no-log``.
    """
    parser = argparse.ArgumentParser(prog=f"python analysis/{name}.py", description=description)
    add_store_args(parser)
    parser.add_argument("--run-id", dest="run_ids", action="extend", nargs="+", metavar="RUN_ID",
                        help=run_ids_help)
    default_out = Path("analysis") / "out" / name
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"output directory, relative to the current directory (default: {default_out}/)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the analysis run to MLflow (only print and write files)")
    return parser


def cli(build_parser: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], int],
        argv: Sequence[str] | None = None) -> int:
    """A script's ``main``: parse ``argv`` with ``build_parser()`` and return :func:`run_main` of
    ``body(args)`` (0 ok, 2 and one ``error:`` line for a user error)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: body(args))


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
        client, uri = connect(args.tracking_uri)
        return cls(client, get_experiment(client, resolve_experiment_name(args.experiment), uri), uri)

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


def is_sweep_trial(run: Run) -> bool:
    """True for a trial of a sweep (a nested run tagged ``atm.sweep``)."""
    tags = run.data.tags
    return TAG_SWEEP in tags and TAG_SWEEP_PARENT not in tags


def param_value(text: str | None) -> Any:
    """An MLflow param (always text) back as bool/None/int/float where it reads as one, else the text."""
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def finetune_variant(run: Run) -> tuple[str, bool]:
    """``(setting, frozen)`` of a finetune run: ``atm.finetune.setting`` (else param
    ``finetune.setting``, else ``"full"``) and ``atm.finetune.freeze_encoder`` (else param
    ``finetune.freeze_encoder``, else False)."""
    tags, params = run.data.tags, run.data.params
    setting = tags.get(TAG_FINETUNE_SETTING) or params.get("finetune.setting") or "full"
    frozen = param_value(tags.get(TAG_FINETUNE_FROZEN, params.get("finetune.freeze_encoder", "false")))
    return str(setting), bool(frozen)


def encoder_label(frozen: bool) -> str:
    return "frozen" if frozen else "fine-tuned"


def finetune_recipe(run: Run) -> tuple[tuple[str, str], ...]:
    """What a finetune run trained apart from its encoder: its ``finetune.*``, ``trainer.*``,
    ``data.max_seq_len`` and ``seed`` params (less device and logging), sorted.  Two finetune runs
    with equal recipes over different encoders compare the encoders."""
    return tuple(sorted((k, v) for k, v in run.data.params.items()
                        if k.startswith(_RECIPE_PREFIXES) and k not in _RECIPE_IGNORED))


def massive_scores(run: Run) -> dict[tuple[str, str], float]:
    """``{(locale, score): value}`` of a finetune run's ``eval/massive/<locale>/<score>`` metrics for
    the scores in :data:`MASSIVE_SCORES` and their ``<score>_se``; ``locale`` ``"avg"`` is the mean
    over evaluation locales."""
    out = {}
    for key, value in run.data.metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[:2] == ["eval", "massive"] and \
                parts[3].removesuffix("_se") in MASSIVE_SCORES:
            out[(parts[2], parts[3])] = float(value)
    return out


def finetunes_of(index: RunIndex, encoder_run_id: str) -> dict[tuple[str, bool], list[Run]]:
    """Finished finetune runs over encoder ``encoder_run_id`` that logged MASSIVE scores, by
    :func:`finetune_variant`, newest first."""
    out: dict[tuple[str, bool], list[Run]] = {}
    for run in reversed(index.consumers(encoder_run_id, "encoder", stage=STAGE_FINETUNE)):
        if massive_scores(run):
            out.setdefault(finetune_variant(run), []).append(run)
    return out


def matching_finetune(candidates: Sequence[Run], like: Run) -> Run | None:
    """The newest of ``candidates`` with the same :func:`finetune_recipe` as ``like``, else None."""
    recipe = finetune_recipe(like)
    return next((r for r in candidates if finetune_recipe(r) == recipe), None)


def error_change(score: float, baseline_score: float) -> float:
    """Relative error-rate change of a score against a baseline's, with error = 1 - score:
    ``(err - err_base) / err_base`` (:func:`atm.metrics.relative_error_change`; AlexaTM, FitzGerald
    et al. KDD 2022; negative = fewer errors).  NaN where either score is missing (NaN) or the
    baseline makes no error."""
    from atm.metrics import relative_error_change

    if math.isnan(score) or math.isnan(baseline_score) or baseline_score >= 1.0:
        return math.nan
    return relative_error_change(1.0 - score, 1.0 - baseline_score)


def model_size(run: Run) -> tuple[float, float, str]:
    """``(non_embedding_parameters, parameters, source)`` of an MLM training run.

    From the run's metrics ``cost/non_embedding_parameters`` and ``cost/parameters`` (source
    ``"logged"``); when absent, the non-embedding count is computed from the ``model.*`` params by
    :func:`atm.models.encoder.count_parameters` (it does not depend on the vocabulary; the total,
    which does, is NaN; source ``"params"``).  NaN with source ``""`` when neither is possible.
    """
    metrics = run.data.metrics
    if "cost/non_embedding_parameters" in metrics:
        return (float(metrics["cost/non_embedding_parameters"]),
                float(metrics.get("cost/parameters", math.nan)), "logged")
    preset = {k[len("model."):]: param_value(v) for k, v in run.data.params.items()
              if k.startswith("model.")}
    if not preset:
        return math.nan, float(metrics.get("cost/parameters", math.nan)), ""
    from atm.models.encoder import PRESET_KEYS, count_parameters

    preset = {k: v for k, v in preset.items() if k in PRESET_KEYS or k == "name"}
    try:
        count = count_parameters(preset, vocab_size=1, non_embedding=True)
    except AtmError:
        return math.nan, float(metrics.get("cost/parameters", math.nan)), ""
    return float(count), float(metrics.get("cost/parameters", math.nan)), "params"


def human_count(n: float) -> str:
    """``1234567`` -> ``"1.23M"`` (parameter counts in tables and plot labels)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "nan"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def change_bar_axes(ax: Any, labels: Sequence[str], ylabel: str, title: str, fontsize: int = 8) -> None:
    """Finish the axes of a bar chart of relative changes: zero line, one tick label per bar group,
    y label, title, grid and legend."""
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), list(labels), fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def save_png(fig: Any, path: Path | str) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        pyplot().close(fig)


def publish(
    args: argparse.Namespace,
    index: RunIndex,
    analysis: str,
    markdown: str,
    files: Mapping[str, Any],
    consumed_run_ids: Sequence[str],
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str | None:
    """Print ``markdown``, write ``files`` under ``args.out`` and log them as an analysis run.

    Args:
        files: file name -> content: ``str`` (text, e.g. the markdown), a DataFrame (CSV) or a
            matplotlib figure (PNG); each is written atomically.
        consumed_run_ids: the runs the analysis read (tag ``atm.consumed_run_ids``).

    Returns:
        The analysis run's id, or None with ``--no-log``.
    """
    print(markdown, end="" if markdown.endswith("\n") else "\n")
    out = Path(args.out)
    paths = []
    for name, content in files.items():
        if isinstance(content, str):
            paths.append(atomic_write_text(out / name, content))
        elif hasattr(content, "to_csv"):
            paths.append(atomic_write_csv(out / name, content))
        else:
            paths.append(save_png(content, out / name))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    if args.no_log:
        return None
    run_id = log_analysis_run(index.client, index.experiment.experiment_id, analysis, consumed_run_ids,
                              metrics=metrics, params=params, artifacts=paths)
    print(f"logged analysis run {run_id} to experiment '{index.experiment.name}' at {index.uri}",
          file=sys.stderr)
    return run_id
