#!/usr/bin/env python
"""How well do cheap pretraining probes predict XNLI accuracy?  (ATM, FitzGerald et al. 2022)

Reads the *evaluate* runs of pretraining stages from MLflow (one row per evaluated checkpoint)
and correlates each probe with ``eval/xnli/avg_accuracy``, pooled over all selected runs:

* ``eval/perplexity/written``, ``eval/perplexity/spoken`` (lower is better, so a useful probe
  correlates *negatively*),
* ``eval/mask_fill/noun_accuracy`` (higher is better).

For each probe it reports Pearson r and Spearman rho with their two-sided p-values and the
number n of checkpoints that have both values.  Outputs (written atomically to ``--out``):

* ``correlations.md``  -- the markdown table also printed on stdout,
* ``correlations.csv`` -- the same table at full precision,
* ``checkpoints.csv``  -- one row per (evaluate run, checkpoint step), every ``eval/`` metric,
* ``scatter.png``      -- one panel per probe vs XNLI accuracy, points coloured by run.

They are also logged as artifacts of a new MLflow run tagged ``atm.stage=analysis``,
``atm.analysis=correlate_xnli``, ``atm.consumed_run_ids=<evaluate run ids>``, with the
correlations as metrics ``corr/{pearson,pearson_p,spearman,spearman_p,n}/<probe>``.

Usage (from the repo root)::

    python analysis/correlate_xnli.py                      # all finished pretrain evaluate runs
    python analysis/correlate_xnli.py --stage pretrain_stage1 --per-run
    python analysis/correlate_xnli.py --run-id <evaluate run id> <evaluate run id> --no-log

Errors (no store/experiment, no evaluate runs, unknown run id, fewer than 3 checkpoints) print
one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in {str(Path(p).resolve()) for p in sys.path if p}:
    sys.path.insert(0, str(_REPO_ROOT))  # `python analysis/correlate_xnli.py` without installing

from analysis import _mlflow_frames as mf  # noqa: E402
from atm.errors import AtmError  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ANALYSIS_NAME = "correlate_xnli"
TARGET = "eval/xnli/avg_accuracy"
#: (short name used in the table and in MLflow metric keys, MLflow metric key)
PREDICTORS: tuple[tuple[str, str], ...] = (
    ("perplexity_written", "eval/perplexity/written"),
    ("perplexity_spoken", "eval/perplexity/spoken"),
    ("mask_fill_noun_accuracy", "eval/mask_fill/noun_accuracy"),
)
MIN_POINTS = 3
DEFAULT_OUT = Path("analysis/out/correlate_xnli")

TABLE_COLUMNS = [
    "scope", "predictor", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p",
]
TABLE_FORMATS = {
    "n": "d",
    "pearson_r": ".6f",
    "spearman_rho": ".6f",
    "pearson_p": ".3g",
    "spearman_p": ".3g",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python analysis/correlate_xnli.py",
        description="Correlate perplexity and noun mask-filling accuracy with XNLI accuracy "
        "across evaluated pretraining checkpoints (pooled over runs).",
    )
    mf.add_store_args(parser)
    parser.add_argument(
        "--run-id",
        dest="run_ids",
        action="extend",
        nargs="+",
        metavar="RUN_ID",
        help="evaluate run id(s) to use (repeatable); default: every finished evaluate run of "
        "a pretraining stage in the experiment",
    )
    parser.add_argument(
        "--stage",
        dest="stages",
        action="extend",
        nargs="+",
        metavar="STAGE",
        help="keep only evaluate runs whose atm.evaluated_stage is one of these "
        "(default: stages starting with 'pretrain')",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory, relative to the current directory (default: {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--per-run",
        action="store_true",
        help="also report correlations within each evaluate run (runs with >= 3 points)",
    )
    parser.add_argument(
        "--no-log",
        action="store_true",
        help="do not log the analysis run to MLflow (only write files)",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# statistics


def correlate(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson and Spearman correlation of paired values (NaN pairs dropped).

    Returns ``{"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "note"}``; the
    coefficients are NaN (with a note) when n < 3 or an input is constant.
    """
    import numpy as np
    from scipy import stats

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {
        "n": int(len(x)),
        "pearson_r": float("nan"),
        "pearson_p": float("nan"),
        "spearman_rho": float("nan"),
        "spearman_p": float("nan"),
        "note": "",
    }
    if len(x) < MIN_POINTS:
        out["note"] = f"only {len(x)} paired checkpoint(s), need {MIN_POINTS}"
        return out
    if np.ptp(y) == 0:
        out["note"] = f"{TARGET} is constant ({y[0]:g})"
        return out
    if np.ptp(x) == 0:
        out["note"] = "constant predictor"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    out.update(
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue),
    )
    return out


def correlation_table(frame: "pd.DataFrame", per_run: bool = False) -> "pd.DataFrame":
    """Rows (scope, predictor) with n, Pearson r/p and Spearman rho/p against :data:`TARGET`.

    ``scope`` is ``"pooled"`` for all checkpoints together, else the evaluate run's name/id.
    Predictors never logged by any selected run are left out.
    """
    import pandas as pd

    scopes: list[tuple[str, pd.DataFrame]] = [("pooled", frame)]
    if per_run:
        for run_id, sub in frame.groupby("eval_run_id", sort=False):
            name = sub["eval_run_name"].iloc[0]
            scopes.append((f"{name} ({run_id[:8]})" if name else run_id, sub))
    rows = []
    for scope, sub in scopes:
        for short, key in PREDICTORS:
            if key not in frame.columns:
                continue
            stats_ = correlate(sub[key], sub[TARGET])
            if scope != "pooled" and stats_["n"] < MIN_POINTS:
                continue
            rows.append({"scope": scope, "predictor": short, "metric": key, **stats_})
    return pd.DataFrame(
        rows, columns=TABLE_COLUMNS[:2] + ["metric"] + TABLE_COLUMNS[2:] + ["note"]
    )


def check_enough_points(frame: "pd.DataFrame", n_runs: int) -> None:
    n_target = int(frame[TARGET].notna().sum()) if TARGET in frame.columns else 0
    if n_target < MIN_POINTS:
        raise AtmError(
            f"found {n_target} checkpoint(s) with {TARGET} across {n_runs} evaluate run(s); "
            f"need at least {MIN_POINTS} for a correlation"
        )
    present = [key for _, key in PREDICTORS if key in frame.columns]
    if not present:
        raise AtmError(
            f"none of {', '.join(k for _, k in PREDICTORS)} was logged by the "
            f"{n_runs} selected evaluate run(s)"
        )


# ---------------------------------------------------------------------------------------------
# output


def render_table(table: "pd.DataFrame", header: str) -> str:
    shown = table[TABLE_COLUMNS]
    return f"{header}\n\n{mf.format_markdown_table(shown, TABLE_FORMATS)}\n"


def _run_labels(frame: "pd.DataFrame") -> dict[str, str]:
    labels = {}
    for run_id, sub in frame.groupby("eval_run_id", sort=False):
        first = sub.iloc[0]
        name = first["evaluated_run_name"] or first["eval_run_name"] or run_id[:8]
        stage = first["evaluated_stage"]
        labels[run_id] = f"{name} [{stage}]" if stage else name
    return labels


def plot_scatter(frame: "pd.DataFrame", table: "pd.DataFrame", path: Path) -> None:
    """One panel per predictor (x) vs XNLI average accuracy (y), coloured by evaluate run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = table[table["scope"] == "pooled"].reset_index(drop=True)
    n_panels = len(pooled)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 4.2), squeeze=False)
    labels = _run_labels(frame)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for ax, (_, row) in zip(axes[0], pooled.iterrows()):
        key = row["metric"]
        for i, (run_id, sub) in enumerate(frame.groupby("eval_run_id", sort=False)):
            sub = sub[[key, TARGET, "step"]].dropna()
            if sub.empty:
                continue
            ax.plot(sub[key], sub[TARGET], "-", color=cmap(i % cmap.N), alpha=0.3, lw=1)
            ax.scatter(sub[key], sub[TARGET], color=cmap(i % cmap.N), s=22,
                       label=labels[run_id], zorder=3)
        ax.set_xlabel(key)
        ax.set_ylabel(TARGET)
        ax.set_title(row["predictor"])
        ax.grid(True, alpha=0.3)
        text = (
            f"r = {row['pearson_r']:.3f} (p = {row['pearson_p']:.2g})\n"
            f"ρ = {row['spearman_rho']:.3f} (p = {row['spearman_p']:.2g})\n"
            f"n = {row['n']}"
        )
        # Put the box in a corner the trend leaves empty: upper left for a rising cloud,
        # lower left for a falling one.
        falling = row["pearson_r"] < 0
        ax.text(0.03, 0.03 if falling else 0.97, text, transform=ax.transAxes,
                va="bottom" if falling else "top", ha="left", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 3), fontsize=8,
                   frameon=False)
        rows_needed = (len(names) + 2) // 3
        fig.tight_layout(rect=(0, 0.06 * rows_needed, 1, 1))
    else:
        fig.tight_layout()
    mf.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def mlflow_metrics(table: "pd.DataFrame") -> dict[str, float]:
    out: dict[str, float] = {}
    for _, row in table[table["scope"] == "pooled"].iterrows():
        p = row["predictor"]
        out[f"corr/pearson/{p}"] = row["pearson_r"]
        out[f"corr/pearson_p/{p}"] = row["pearson_p"]
        out[f"corr/spearman/{p}"] = row["spearman_rho"]
        out[f"corr/spearman_p/{p}"] = row["spearman_p"]
        out[f"corr/n/{p}"] = float(row["n"])
    return out


# ---------------------------------------------------------------------------------------------
# main


def _run(args: argparse.Namespace) -> int:
    client, uri = mf.connect(args.tracking_uri)
    experiment = mf.get_experiment(client, mf.resolve_experiment_name(args.experiment), uri)
    if args.run_ids:
        runs = mf.get_evaluate_runs(client, args.run_ids, uri)
        if args.stages:
            wrong = [r for r in runs
                     if r.data.tags.get(mf.TAG_EVALUATED_STAGE) not in set(args.stages)]
            if wrong:
                r = wrong[0]
                raise AtmError(
                    f"run {mf.run_label(r)} evaluated stage "
                    f"{r.data.tags.get(mf.TAG_EVALUATED_STAGE)!r}, not one of --stage "
                    f"{', '.join(args.stages)}"
                )
    else:
        runs = mf.find_evaluate_runs(client, experiment, uri, stages=args.stages)

    frame = mf.metric_history_frame(client, runs, prefix="eval/")
    check_enough_points(frame, len(runs))
    table = correlation_table(frame, per_run=args.per_run)
    for _, row in table.iterrows():
        if row["note"]:
            print(f"warning: {row['scope']} {row['predictor']}: {row['note']}; "
                  "correlation left as nan", file=sys.stderr)
    if table[table["scope"] == "pooled"]["pearson_r"].isna().all():
        raise AtmError(
            "no predictor could be correlated with "
            f"{TARGET}: "
            + "; ".join(f"{r['predictor']}: {r['note']}"
                        for _, r in table[table["scope"] == "pooled"].iterrows())
        )

    n_points = int(frame[TARGET].notna().sum())
    header = (
        f"Correlation with {TARGET} over {n_points} checkpoints of {len(runs)} evaluate "
        f"run(s) in experiment '{experiment.name}' (pooled across runs)"
    )
    rendered = render_table(table, header)
    print(rendered, end="")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": mf.atomic_write_text(out / "correlations.md", rendered),
        "corr_csv": mf.atomic_write_csv(out / "correlations.csv", table),
        "frame_csv": mf.atomic_write_csv(out / "checkpoints.csv", frame),
        "png": out / "scatter.png",
    }
    plot_scatter(frame, table, paths["png"])
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)

    if not args.no_log:
        run_id = mf.log_analysis_run(
            client,
            experiment.experiment_id,
            ANALYSIS_NAME,
            consumed_run_ids=[r.info.run_id for r in runs],
            metrics=mlflow_metrics(table),
            params={
                "target": TARGET,
                "predictors": ",".join(k for _, k in PREDICTORS),
                "n_runs": len(runs),
                "n_checkpoints": n_points,
                "selection": "run_ids" if args.run_ids else "search",
                "stages": ",".join(args.stages) if args.stages else "pretrain*",
            },
            artifacts=list(paths.values()),
        )
        print(f"logged analysis run {run_id} to experiment '{experiment.name}' at {uri}",
              file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    return mf.run_main(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
