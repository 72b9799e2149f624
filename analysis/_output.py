"""What the ``analysis/*.py`` scripts put out: markdown tables, CSV and PNG files (written atomically through
:mod:`atm.files`), plots, and the MLflow run that records an analysis (:func:`publish`).

An analysis run is tagged ``atm.stage=analysis``, ``atm.analysis=<script name>`` and
``atm.consumed_run_ids=<comma-joined ids of the runs it read>``; its files are its artifacts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atm.files import atomic_path, atomic_write_text
from atm.tracking import TAG_CONSUMED, TAG_STAGE

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient

    from analysis._store import RunIndex

TAG_ANALYSIS = "atm.analysis"
STAGE_ANALYSIS = "analysis"
_MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH


# ---------------------------------------------------------------------------------------------
# tables


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


def human_count(n: float) -> str:
    """``1234567`` -> ``"1.23M"`` (parameter counts in tables and plot labels)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "nan"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def interval_metrics(key: str, row: Mapping[str, Any], column: str) -> dict[str, float]:
    """MLflow metrics of one estimate and its interval from a table row: ``{key: row[column],
    key + "_lo": row[column + "_lo"], key + "_hi": row[column + "_hi"]}``."""
    return {key + suffix: row[column + suffix] for suffix in ("", "_lo", "_hi")}


# ---------------------------------------------------------------------------------------------
# plots and files


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
    """Write a matplotlib figure as a PNG (120 dpi) atomically and close it; returns ``path``."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        return Path(path)
    finally:
        pyplot().close(fig)


def save_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write ``frame`` as a CSV file (no index column) atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# the analysis run


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
    ``atm.consumed_run_ids=<comma-joined ids>`` (a list longer than MLflow's tag limit is cut there and
    logged whole as ``consumed_run_ids.txt``).  Non-finite metric values are not logged.
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
        TAG_CONSUMED: consumed,
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
            paths.append(save_csv(content, out / name))
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
