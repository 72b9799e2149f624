"""How well do cheap pretraining probes predict XNLI accuracy?  (ATM, FitzGerald et al. 2022, Table 3)

Reads the *evaluate* runs of pretraining stages from MLflow (one row per evaluated checkpoint of one
or more teachers) and correlates each probe with XNLI accuracy, pooled over all selected runs:

* overall, against ``eval/xnli/avg_accuracy``: ``eval/perplexity/written``,
  ``eval/perplexity/spoken`` (lower is better, so a useful probe correlates *negatively*),
  ``eval/mask_fill/noun_{accuracy,top10,mrr}`` and ``eval/mask_fill/spoken/slot_{accuracy,top10,mrr}``
  (top-1 accuracy, top-10 accuracy and mean reciprocal rank of the whole word; higher is better);
* per language, against the same language's ``eval/xnli/<lang>/accuracy``:
  ``eval/perplexity/written/<lang>``, ``eval/perplexity/spoken/<locale>``,
  ``eval/mask_fill/<lang>/noun_<score>``, ``eval/mask_fill/spoken/<locale>/slot_<score>``, where a
  MASSIVE locale maps to its language (``de-DE`` -> ``de``); pairs without both are left out.

**Degenerate probes are never correlated.** An XNLI classifier that never predicts one of the three classes
(``eval/xnli/<lang>/degenerate`` = 1) measures its collapse, not the encoder: that (checkpoint, language) is
left out of the language's rows, and a checkpoint with any degenerate language (or
``eval/xnli/degenerate_languages`` > 0) is left out of the rows against the average. Column ``n_degenerate``
says how many checkpoints each row left out; a row with fewer than 3 points left, or a constant predictor or
target, has no correlation and says why in ``note`` (printed in the table too).

For each (language, probe) it reports n (checkpoints with both values), Pearson r and Spearman rho
with two-sided p-values and 95% confidence intervals, both through Fisher's z = artanh(r):

* Pearson: ``tanh(z +- z_{0.975} / sqrt(n - 3))`` (Fisher 1921; ``scipy.stats.pearsonr(...)
  .confidence_interval``);
* Spearman: ``tanh(z +- z_{0.975} * sqrt((1 + rho^2 / 2) / (n - 3)))``, the variance of Bonett &
  Wright (2000, "Sample size requirements for estimating Pearson, Kendall and Spearman
  correlations", Psychometrika 65(1), eq. 2).

With n <= 3 the interval is the whole [-1, 1].  Outputs (written atomically to ``--out``):

* ``correlations.md``  -- the markdown tables also printed on stdout,
* ``correlations.csv`` -- every row at full precision (with the metric keys and interval ends),
* ``checkpoints.csv``  -- one row per (evaluate run, checkpoint step), every ``eval/`` metric,
* ``scatter.png``      -- one panel per overall probe vs XNLI accuracy, points coloured by run,
* ``per_language.png`` -- Pearson r per language and probe (when per-language metrics exist).

They are also logged as artifacts of a new MLflow run tagged ``atm.stage=analysis``,
``atm.analysis=correlate_xnli``, ``atm.consumed_run_ids=<evaluate run ids>``, with the overall
correlations as metrics ``corr/{pearson,pearson_lo,pearson_hi,pearson_p,spearman,spearman_lo,
spearman_hi,spearman_p,n}/<probe>`` and the per-language ones under ``.../<probe>/<lang>``.

Usage (from the repo root)::

    python analysis/correlate_xnli.py                      # all finished pretrain evaluate runs
    python analysis/correlate_xnli.py --stage pretrain_stage1 --per-run
    python analysis/correlate_xnli.py --run-id <evaluate run id> <evaluate run id> --no-log

Errors (no store/experiment, no evaluate runs, unknown run id, fewer than 3 checkpoints) print
one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis._output import format_markdown_table, publish, pyplot
from analysis._runs import metric_history_frame
from analysis._store import TAG_EVALUATED_STAGE, RunIndex, analysis_parser, cli, run_label
from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ANALYSIS_NAME = "correlate_xnli"
TARGET = "eval/xnli/avg_accuracy"
#: XNLI accuracy of one language, the target of the per-language correlations.
LANG_TARGET = "eval/xnli/{lang}/accuracy"
#: (short name used in the table and in MLflow metric keys, MLflow metric key) of the overall probes.
PREDICTORS: tuple[tuple[str, str], ...] = (
    ("perplexity_written", "eval/perplexity/written"),
    ("perplexity_spoken", "eval/perplexity/spoken"),
    ("mask_fill_noun_accuracy", "eval/mask_fill/noun_accuracy"),
    ("mask_fill_slot_accuracy", "eval/mask_fill/spoken/slot_accuracy"),
    ("mask_fill_noun_top10", "eval/mask_fill/noun_top10"),
    ("mask_fill_noun_mrr", "eval/mask_fill/noun_mrr"),
    ("mask_fill_slot_top10", "eval/mask_fill/spoken/slot_top10"),
    ("mask_fill_slot_mrr", "eval/mask_fill/spoken/slot_mrr"),
)
#: (short name, pattern of the per-language metric key; ``code`` is a language or MASSIVE locale).
LANG_PREDICTORS: tuple[tuple[str, re.Pattern], ...] = (
    ("perplexity_written", re.compile(r"^eval/perplexity/written/(?P<code>[^/]+)$")),
    ("perplexity_spoken", re.compile(r"^eval/perplexity/spoken/(?P<code>[^/]+)$")),
    ("mask_fill_noun_accuracy", re.compile(r"^eval/mask_fill/(?P<code>[^/]+)/noun_accuracy$")),
    ("mask_fill_slot_accuracy", re.compile(r"^eval/mask_fill/spoken/(?P<code>[^/]+)/slot_accuracy$")),
    ("mask_fill_noun_top10", re.compile(r"^eval/mask_fill/(?P<code>[^/]+)/noun_top10$")),
    ("mask_fill_noun_mrr", re.compile(r"^eval/mask_fill/(?P<code>[^/]+)/noun_mrr$")),
    ("mask_fill_slot_top10", re.compile(r"^eval/mask_fill/spoken/(?P<code>[^/]+)/slot_top10$")),
    ("mask_fill_slot_mrr", re.compile(r"^eval/mask_fill/spoken/(?P<code>[^/]+)/slot_mrr$")),
)
#: 1.0 when the XNLI classifier of a checkpoint never predicts some class in that language.
LANG_DEGENERATE = re.compile(r"^eval/xnli/(?P<lang>[^/]+)/degenerate$")
DEGENERATE_LANGUAGES = "eval/xnli/degenerate_languages"
OVERALL = "all"  # the `language` of the rows against the average XNLI accuracy
MIN_POINTS = 3
CONFIDENCE = 0.95
DEFAULT_OUT = Path("analysis/out/correlate_xnli")

TABLE_COLUMNS = [
    "scope", "language", "predictor", "n", "n_degenerate", "pearson_r", "pearson_95ci", "pearson_p",
    "spearman_rho", "spearman_95ci", "spearman_p", "note",
]
CSV_COLUMNS = [
    "scope", "language", "predictor", "metric", "target", "n",
    "pearson_r", "pearson_lo", "pearson_hi", "pearson_p",
    "spearman_rho", "spearman_lo", "spearman_hi", "spearman_p", "note", "n_degenerate",
]
TABLE_FORMATS = {
    "n": "d",
    "n_degenerate": "d",
    "pearson_r": ".6f",
    "spearman_rho": ".6f",
    "pearson_p": ".3g",
    "spearman_p": ".3g",
}


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(
        ANALYSIS_NAME,
        "Correlate perplexity and mask-filling accuracy with XNLI accuracy (overall and per "
        "language, with 95% confidence intervals) across evaluated pretraining checkpoints "
        "(pooled over runs).",
        "evaluate run id(s) to use (repeatable); default: every finished evaluate run of a "
        "pretraining stage in the experiment",
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
        "--per-run",
        action="store_true",
        help="also report correlations within each evaluate run (runs with >= 3 points)",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# statistics


def fisher_interval(r: float, n: int, se_scale: float = 1.0,
                    confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Confidence interval of a correlation through Fisher's z transformation.

    ``tanh(artanh(r) +- q * se_scale / sqrt(n - 3))`` with ``q`` the ``(1 + confidence) / 2``
    normal quantile (Fisher 1921).  ``se_scale = 1`` is Pearson's r; ``sqrt(1 + rho^2 / 2)`` is the
    Bonett & Wright (2000) standard error factor for Spearman's rho.  ``(-1, 1)`` when n <= 3.
    """
    from scipy import stats

    if n <= 3:
        return -1.0, 1.0
    q = float(stats.norm.ppf((1.0 + confidence) / 2.0))
    if abs(r) >= 1.0:  # artanh(+-1) is infinite: the interval collapses onto r
        return r, r
    z, half = math.atanh(r), q * se_scale / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def correlate(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE,
              y_name: str = TARGET) -> dict[str, Any]:
    """Pearson and Spearman correlation of paired values (NaN pairs dropped), with intervals.

    Returns ``{"n", "pearson_r", "pearson_lo", "pearson_hi", "pearson_p", "spearman_rho",
    "spearman_lo", "spearman_hi", "spearman_p", "note"}``: p-values are two-sided
    (``scipy.stats.pearsonr`` / ``spearmanr``); the intervals are Fisher-z intervals at
    ``confidence`` (Pearson: ``pearsonr(...).confidence_interval``; Spearman: Bonett & Wright
    2000 variance ``(1 + rho^2/2) / (n - 3)``, see :func:`fisher_interval`).  Everything but n is
    NaN (with a note) when n < 3 or an input is constant.
    """
    import numpy as np
    from scipy import stats

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    nan = float("nan")
    out: dict[str, Any] = {
        "n": len(x),
        "pearson_r": nan, "pearson_lo": nan, "pearson_hi": nan, "pearson_p": nan,
        "spearman_rho": nan, "spearman_lo": nan, "spearman_hi": nan, "spearman_p": nan,
        "note": "",
    }
    if len(x) < MIN_POINTS:
        out["note"] = f"only {len(x)} paired checkpoint(s), need {MIN_POINTS}"
        return out
    if np.ptp(y) == 0:
        out["note"] = f"{y_name} is constant ({y[0]:g}) over the {len(y)} checkpoints: no correlation"
        return out
    if np.ptp(x) == 0:
        out["note"] = f"constant predictor ({x[0]:g}) over the {len(x)} checkpoints: no correlation"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
        p_lo, p_hi = pr.confidence_interval(confidence) if len(x) > 3 else (-1.0, 1.0)
    rho = float(sr.statistic)
    s_lo, s_hi = fisher_interval(rho, len(x), math.sqrt(1.0 + rho * rho / 2.0), confidence)
    out.update(
        pearson_r=float(pr.statistic), pearson_lo=float(p_lo), pearson_hi=float(p_hi),
        pearson_p=float(pr.pvalue),
        spearman_rho=rho, spearman_lo=s_lo, spearman_hi=s_hi, spearman_p=float(sr.pvalue),
    )
    return out


def language_of(code: str) -> str:
    """The language of a metric's language code or MASSIVE locale: ``de-DE`` -> ``de``."""
    return code.replace("_", "-").split("-")[0].lower()


def pairs(columns: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """``(language, predictor, metric key, target key)`` for every probe the frame has: the overall
    probes against :data:`TARGET` (language :data:`OVERALL`), then each per-language probe whose
    language has an XNLI accuracy column, sorted by language."""
    present = set(columns)
    out = [(OVERALL, short, key, TARGET) for short, key in PREDICTORS if key in present]
    per_lang = []
    for short, pattern in LANG_PREDICTORS:
        for key in columns:
            match = pattern.match(key)
            if not match or match["code"] == "spoken":
                continue
            target = LANG_TARGET.format(lang=language_of(match["code"]))
            if target in present:
                per_lang.append((match["code"], short, key, target))
    return out + sorted(per_lang)


def degenerate(frame: pd.DataFrame, target: str) -> pd.Series:
    """Per checkpoint (row of ``frame``), True where the XNLI probe behind ``target`` is degenerate.

    ``target`` :data:`TARGET` (the average): any language's ``eval/xnli/<lang>/degenerate`` is 1 or
    ``eval/xnli/degenerate_languages`` > 0; a language's ``eval/xnli/<lang>/accuracy``: that language's flag.
    Checkpoints without a flag are not degenerate.
    """
    import pandas as pd

    flags = {m["lang"]: frame[key].fillna(0) > 0 for key in frame.columns if (m := LANG_DEGENERATE.match(key))}
    none = pd.Series(False, index=frame.index)
    if target != TARGET:
        lang = target.split("/")[2]
        return flags.get(lang, none)
    out = none.copy()
    for flag in flags.values():
        out |= flag
    if DEGENERATE_LANGUAGES in frame.columns:
        out |= frame[DEGENERATE_LANGUAGES].fillna(0) > 0
    return out


def correlation_table(frame: pd.DataFrame, per_run: bool = False) -> pd.DataFrame:
    """Rows (scope, language, predictor) with n, Pearson r and Spearman rho, their p-values and
    95% intervals (:func:`correlate`), in :data:`CSV_COLUMNS` order.

    ``scope`` is ``"pooled"`` for all checkpoints together, else the evaluate run's name/id;
    ``language`` is ``"all"`` for the probes against the average XNLI accuracy.  Checkpoints whose
    XNLI probe is :func:`degenerate` are left out (counted in ``n_degenerate``).  Probes never
    logged by any selected run are left out; per-run rows need at least 3 points.
    """
    import pandas as pd

    scopes: list[tuple[str, pd.DataFrame]] = [("pooled", frame)]
    if per_run:
        for run_id, sub in frame.groupby("eval_run_id", sort=False):
            name = sub["eval_run_name"].iloc[0]
            scopes.append((f"{name} ({run_id[:8]})" if name else run_id, sub))
    found = pairs(list(frame.columns))
    rows = []
    for scope, sub in scopes:
        for language, short, key, target in found:
            flagged = degenerate(sub, target)
            both = sub[key].notna() & sub[target].notna()
            n_degenerate = int((both & flagged).sum())
            stats_ = correlate(sub[key].where(~flagged), sub[target].where(~flagged), y_name=target)
            if scope != "pooled" and stats_["n"] < MIN_POINTS:
                continue
            if n_degenerate and stats_["n"] < MIN_POINTS:
                stats_["note"] = (f"{n_degenerate} of {n_degenerate + stats_['n']} checkpoint(s) have a degenerate "
                                  f"XNLI probe (a class never predicted), {stats_['n']} left, need {MIN_POINTS}")
            rows.append({"scope": scope, "language": language, "predictor": short, "metric": key,
                         "target": target, **stats_, "n_degenerate": n_degenerate})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def check_enough_points(frame: pd.DataFrame, n_runs: int) -> None:
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


def _interval(lo: float, hi: float) -> str:
    return "nan" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def render_table(table: pd.DataFrame, header: str) -> str:
    shown = table.copy()
    shown["pearson_95ci"] = [_interval(lo, hi) for lo, hi in zip(shown["pearson_lo"], shown["pearson_hi"])]
    shown["spearman_95ci"] = [_interval(lo, hi) for lo, hi in zip(shown["spearman_lo"], shown["spearman_hi"])]
    overall = shown["language"] == OVERALL
    parts = [f"{header}\n\n{format_markdown_table(shown[overall][TABLE_COLUMNS], TABLE_FORMATS)}\n"]
    if (~overall).any():
        parts.append(
            "\nPer language (each probe against the same language's eval/xnli/<lang>/accuracy):\n\n"
            f"{format_markdown_table(shown[~overall][TABLE_COLUMNS], TABLE_FORMATS)}\n"
        )
    return "".join(parts)


def _run_labels(frame: pd.DataFrame) -> dict[str, str]:
    labels = {}
    for run_id, sub in frame.groupby("eval_run_id", sort=False):
        first = sub.iloc[0]
        name = first["evaluated_run_name"] or first["eval_run_name"] or run_id[:8]
        stage = first["evaluated_stage"]
        labels[run_id] = f"{name} [{stage}]" if stage else name
    return labels


def plot_scatter(frame: pd.DataFrame, table: pd.DataFrame) -> Any:
    """One panel per overall probe (x) vs XNLI average accuracy (y), coloured by evaluate run."""
    plt = pyplot()
    pooled = table[(table["scope"] == "pooled") & (table["language"] == OVERALL)].reset_index(drop=True)
    n_panels = len(pooled)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 4.2), squeeze=False)
    labels = _run_labels(frame)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    flagged = degenerate(frame, TARGET)
    for ax, (_, row) in zip(axes[0], pooled.iterrows()):
        key = row["metric"]
        left_out = frame[flagged][[key, TARGET]].dropna()
        if len(left_out):
            ax.scatter(left_out[key], left_out[TARGET], marker="x", color="grey", s=22, zorder=2,
                       label="degenerate XNLI probe (left out)")
        for i, (run_id, sub) in enumerate(frame[~flagged].groupby("eval_run_id", sort=False)):
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
            f"r = {row['pearson_r']:.3f} {_interval(row['pearson_lo'], row['pearson_hi'])}\n"
            f"ρ = {row['spearman_rho']:.3f} {_interval(row['spearman_lo'], row['spearman_hi'])}\n"
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
    return fig


def plot_per_language(table: pd.DataFrame) -> Any:
    """Heat map of pooled Pearson r, one row per language (or locale), one column per probe."""
    import numpy as np

    plt = pyplot()
    sub = table[(table["scope"] == "pooled") & (table["language"] != OVERALL)]
    grid = sub.pivot_table(index="language", columns="predictor", values="pearson_r", aggfunc="first",
                           dropna=False)
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * grid.shape[1], 1.2 + 0.38 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [c.replace("_", "\n", 1) for c in grid.columns], fontsize=8)
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=8)
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        ax.text(j, i, "nan" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="Pearson r with the language's XNLI accuracy")
    ax.set_title("per-language correlation with XNLI accuracy")
    fig.tight_layout()
    return fig


def mlflow_metrics(table: pd.DataFrame) -> dict[str, float]:
    names = {"pearson": "pearson_r", "pearson_lo": "pearson_lo", "pearson_hi": "pearson_hi",
             "pearson_p": "pearson_p", "spearman": "spearman_rho", "spearman_lo": "spearman_lo",
             "spearman_hi": "spearman_hi", "spearman_p": "spearman_p", "n": "n", "n_degenerate": "n_degenerate"}
    out: dict[str, float] = {}
    for _, row in table[table["scope"] == "pooled"].iterrows():
        suffix = row["predictor"] if row["language"] == OVERALL else f"{row['predictor']}/{row['language']}"
        for name, column in names.items():
            out[f"corr/{name}/{suffix}"] = float(row[column])
    return out


# ---------------------------------------------------------------------------------------------
# main


def _run(args: argparse.Namespace) -> int:
    index = RunIndex.open(args)
    if args.run_ids:
        runs = index.select_evaluate(args.run_ids)
        if args.stages:
            wrong = [r for r in runs
                     if r.data.tags.get(TAG_EVALUATED_STAGE) not in set(args.stages)]
            if wrong:
                r = wrong[0]
                raise AtmError(
                    f"run {run_label(r)} evaluated stage "
                    f"{r.data.tags.get(TAG_EVALUATED_STAGE)!r}, not one of --stage "
                    f"{', '.join(args.stages)}"
                )
    else:
        runs = index.evaluate_runs(stages=args.stages)

    frame = metric_history_frame(index.client, runs, prefix="eval/")
    check_enough_points(frame, len(runs))
    table = correlation_table(frame, per_run=args.per_run)
    overall = table["language"] == OVERALL
    for _, row in table[overall].iterrows():
        if row["note"]:
            print(f"warning: {row['scope']} {row['predictor']}: {row['note']}; "
                  "correlation left as nan", file=sys.stderr)
    undefined = table[~overall & (table["note"] != "")]
    if len(undefined):
        print(f"warning: {len(undefined)} of {int((~overall).sum())} per-language correlations left as "
              f"nan (e.g. {undefined.iloc[0]['language']} {undefined.iloc[0]['predictor']}: "
              f"{undefined.iloc[0]['note']})", file=sys.stderr)
    pooled = table[(table["scope"] == "pooled") & overall]
    if pooled["pearson_r"].isna().all():
        print(f"warning: no predictor could be correlated with {TARGET} (the table says why per row)",
              file=sys.stderr)

    n_points = int(frame[TARGET].notna().sum())
    n_degenerate = int((frame[TARGET].notna() & degenerate(frame, TARGET)).sum())
    if n_degenerate:
        print(f"warning: {n_degenerate} of {n_points} checkpoint(s) have a degenerate XNLI probe (some class never "
              f"predicted): left out of every correlation against {TARGET}", file=sys.stderr)
    header = (
        f"Correlation with {TARGET} over {n_points - n_degenerate} checkpoints of {len(runs)} evaluate "
        f"run(s) in experiment '{index.experiment.name}' ({n_degenerate} more left out: degenerate XNLI probe; "
        "pooled across runs; 95% intervals by Fisher's z, Spearman with the Bonett-Wright variance)"
    )
    rendered = render_table(table, header)
    files: dict[str, Any] = {
        "correlations.md": rendered,
        "correlations.csv": table,
        "checkpoints.csv": frame,
        "scatter.png": plot_scatter(frame, table),
    }
    if (~overall).any():
        files["per_language.png"] = plot_per_language(table)
    publish(
        args, index, ANALYSIS_NAME, rendered, files,
        consumed_run_ids=[r.info.run_id for r in runs],
        metrics=mlflow_metrics(table),
        params={
            "target": TARGET,
            "predictors": ",".join(k for _, k in PREDICTORS),
            "n_runs": len(runs),
            "n_checkpoints": n_points,
            "n_degenerate_checkpoints": n_degenerate,
            "confidence": CONFIDENCE,
            "selection": "run_ids" if args.run_ids else "search",
            "stages": ",".join(args.stages) if args.stages else "pretrain*",
        },
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
