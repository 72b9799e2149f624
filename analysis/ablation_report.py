"""Ablation report of a distillation sweep: the effect of each design dimension (Distiller, He et al. 2021).

A sweep is an MLflow parent run tagged ``atm.sweep_parent=<study>``; its trials are nested runs tagged
``atm.sweep=<study>``.  A trial counts when it FINISHED, was not pruned (``atm.trial_state`` other than
``PRUNED``) and logged its objective, the metric named by its param ``stage.objective``.

* **Dimensions** are the params whose value differs between the counted trials (the sampled recipe:
  ``distill.*``, ``augment.*``, ...; ``optuna.*`` bookkeeping left out).  A conditional param a trial
  did not sample is the level ``(unset)``.  A param that only some choices of another have and that
  splits the trials exactly as that one (``augment.probability`` under ``augment.name``) is reported
  as the same dimension (column ``same_as``; Optuna importances summed).  A numeric dimension with more than ``--bins`` distinct
  values is cut into ``--bins`` quantile bins (``pandas.qcut``).
* **Marginal means**: per level of each dimension, the mean objective over the trials at that
  level, its standard deviation, and the 95% t-interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)``
  (Student 1908; :func:`atm.stats.seed_interval`); no interval for a level with one trial.
* **Best vs worst level**: per dimension, the difference of the marginal means of its best and its worst level
  (by the sweep's ``optuna.direction``; highest = best when it is unknown) with Welch's 95% t-interval
  (``scipy.stats.ttest_ind(..., equal_var=False).confidence_interval``; NaN unless both levels have two trials).
  The two levels are picked after looking at the means, so the interval is optimistic about the gap.
* **Importances**, two kinds:

  - ``eta2``, model-free: the correlation ratio eta^2 = SS_between / SS_total of a one-way analysis
    of variance of the objective over the dimension's levels (Pearson 1905; Cohen 1973), i.e. the
    share of the objective's variance that the marginal means explain, with the ANOVA F-test
    p-value (``scipy.stats.f_oneway``).  Each dimension is judged alone, so correlated dimensions
    (TPE samples them jointly) share credit;
  - ``optuna``: ``optuna.importance.get_param_importances`` on the Optuna study (Optuna's default
    evaluator, PED-ANOVA, Watanabe et al. IJCAI 2023), normalised to sum to 1, when the study can be
    loaded from ``--storage`` or the parent run's tag ``optuna.storage``; otherwise left empty.

Outputs under ``--out`` (default ``analysis/out/ablation_report/``): ``ablation.md`` (also printed),
``marginal_means.csv``, ``importances.csv``, ``trials.csv`` (one row per counted trial: objective and
dimensions), ``marginal_means.png`` (one panel per dimension, means with 95% intervals), logged to a
new MLflow run (``atm.analysis=ablation_report``) with metrics ``importance/{eta2,optuna}/<sweep>/<dimension>``
and ``ablation/{best_minus_worst,bw_ci_low,bw_ci_high}/<sweep>/<dimension>``.

Usage::

    python analysis/ablation_report.py                     # every sweep of the experiment
    python analysis/ablation_report.py --sweep distill_losses --bins 4 --no-log
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis._output import format_markdown_table, publish, pyplot
from analysis._store import TAG_PARENT_RUN, RunIndex, analysis_parser, cli, run_label
from atm.errors import AtmError
from atm.sweeps import TAG_TRIAL_STATE
from atm.tracking import TAG_SWEEP, TAG_SWEEP_PARENT, TAG_TRIAL

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow.entities import Run

ANALYSIS_NAME = "ablation_report"
CONFIDENCE = 0.95
UNSET = "(unset)"
#: Params that are bookkeeping, never a design dimension.
IGNORED_PREFIXES = ("optuna.", "run_name", "hydra.")
MIN_TRIALS = 2
MEANS_COLUMNS = ["sweep", "dimension", "level", "n", "mean", "ci_low", "ci_high", "sd"]
IMPORTANCE_COLUMNS = ["sweep", "dimension", "n_levels", "eta2", "anova_p", "optuna", "best_level", "worst_level",
                      "best_minus_worst", "bw_ci_low", "bw_ci_high", "same_as"]
FORMATS = {"mean": ".6g", "ci_low": ".6g", "ci_high": ".6g", "sd": ".3g", "eta2": ".3f", "anova_p": ".3g",
           "optuna": ".3f", "best_minus_worst": ".4g", "bw_ci_low": ".4g", "bw_ci_high": ".4g"}
SWEEP_HINT = "run `python -m atm.train +sweep=<name> -m` first"


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(
        ANALYSIS_NAME,
        "Marginal means (with 95% t-intervals) of the sweep objective per level of every swept design "
        "dimension, and the dimensions' importances (eta^2; Optuna's when the study is reachable).",
        "sweep parent run id(s); default: every sweep of the experiment (see --sweep)",
    )
    parser.add_argument("--sweep", dest="sweeps", action="extend", nargs="+", metavar="STUDY",
                        help="study name(s) of the sweep(s) to report (default: all)")
    parser.add_argument("--bins", type=int, default=3,
                        help="quantile bins for a numeric dimension with more distinct values (default: 3)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL of the studies (default: the parent run's optuna.storage tag)")
    return parser


# ---------------------------------------------------------------------------------------------
# runs -> trial frame


def select_sweeps(index: RunIndex, args: argparse.Namespace) -> list[Run]:
    """The sweep parent runs asked for. Raises AtmError for an unknown study name / no sweep."""
    if args.run_ids:
        parents = index.select(args.run_ids, ["sweep"])
        missing = [run_label(r) for r in parents if TAG_SWEEP_PARENT not in r.data.tags]
        if missing:
            raise AtmError(f"run {missing[0]} is not a sweep parent run (no {TAG_SWEEP_PARENT} tag)")
    else:
        parents = [r for r in index.runs if TAG_SWEEP_PARENT in r.data.tags]
    if args.sweeps:
        known = {r.data.tags[TAG_SWEEP_PARENT] for r in parents}
        unknown = [s for s in args.sweeps if s not in known]
        if unknown:
            raise AtmError(f"no sweep {unknown[0]!r} {index.where} (sweeps there: "
                           f"{', '.join(sorted(known)) or 'none'}); {SWEEP_HINT}")
        parents = [r for r in parents if r.data.tags[TAG_SWEEP_PARENT] in args.sweeps]
    if not parents:
        raise AtmError(f"no sweeps {index.where}; {SWEEP_HINT}")
    return parents


def trial_frame(index: RunIndex, parent: Run) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per trial of ``parent``: ``run_id``, ``trial``, ``state``, ``objective`` and every param
    (column ``param:<key>``); and the counts per state (``counted``, ``pruned``, ``failed``,
    ``no_objective``)."""
    import pandas as pd

    study = parent.data.tags[TAG_SWEEP_PARENT]
    trials = [r for r in index.runs if r.data.tags.get(TAG_SWEEP) == study
              and r.data.tags.get(TAG_PARENT_RUN, parent.info.run_id) == parent.info.run_id
              and TAG_SWEEP_PARENT not in r.data.tags]
    counts = {"counted": 0, "pruned": 0, "failed": 0, "no_objective": 0}
    rows = []
    for run in trials:
        tags = run.data.tags
        objective_key = run.data.params.get("stage.objective", "")
        value = run.data.metrics.get(objective_key, math.nan)
        if tags.get(TAG_TRIAL_STATE, "").upper() == "PRUNED":
            state = "pruned"
        elif run.info.status != "FINISHED":
            state = "failed"
        elif math.isnan(value):
            state = "no_objective"
        else:
            state = "counted"
        counts[state] += 1
        trial = tags.get(TAG_TRIAL, "")
        rows.append({"run_id": run.info.run_id, "trial": int(trial) if str(trial).isdigit() else -1,
                     "state": state, "objective_key": objective_key, "objective": value,
                     **{f"param:{k}": v for k, v in run.data.params.items()}})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("trial", kind="stable").reset_index(drop=True)
    return frame, counts


def dimensions(trials: pd.DataFrame) -> list[str]:
    """The params (without the ``param:`` prefix) whose value differs between the trials, in name order."""
    dims = []
    for column in sorted(c for c in trials.columns if c.startswith("param:")):
        key = column[len("param:"):]
        if key.startswith(IGNORED_PREFIXES):
            continue
        if trials[column].fillna(UNSET).nunique() > 1:
            dims.append(key)
    return dims


def levels(values: pd.Series, bins: int) -> pd.Series:
    """The level of each trial in one dimension: the param text (``(unset)`` where absent), or for a
    numeric dimension with more than ``bins`` distinct values its quantile bin ``[lo, hi]``."""
    import pandas as pd

    numeric = pd.to_numeric(values, errors="coerce")
    if not (values.notna().all() and numeric.notna().all()):
        return pd.Series(pd.Categorical(values.fillna(UNSET).astype(str)), index=values.index)
    if numeric.nunique() > bins:
        cut = pd.qcut(numeric, q=bins, duplicates="drop")
        names = [f"[{iv.left:.4g}, {iv.right:.4g}]" for iv in cut.cat.categories]
        return cut.cat.rename_categories(names)
    order = sorted(numeric.unique())  # numeric levels in numeric order, printed with 6 significant digits
    names = {v: format(v, ".6g") for v in order}
    return pd.Series(pd.Categorical(numeric.map(names), categories=list(dict.fromkeys(names.values())),
                                    ordered=True), index=values.index)


# ---------------------------------------------------------------------------------------------
# statistics


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """``(mean, low, high, sd)``: the mean and its ``confidence`` Student-t interval
    ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)`` (:func:`atm.stats.seed_interval`; sd with n - 1 degrees of
    freedom); NaN interval and sd for n = 1."""
    import numpy as np

    from atm import stats

    x = np.asarray(values, dtype=float)
    interval = stats.seed_interval(x, confidence)
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return interval.estimate, interval.lo, interval.hi, sd


def best_minus_worst(y: Sequence[float], groups: Sequence[str], maximize: bool,
                     confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The best and the worst level of one dimension by marginal mean (highest = best when ``maximize``) and
    the difference of their means ``best - worst`` with Welch's t-interval over their trials
    (``scipy.stats.ttest_ind(equal_var=False)``; Welch 1947); NaN interval unless both have two trials."""
    import numpy as np
    from scipy import stats

    y, groups = np.asarray(y, dtype=float), np.asarray(groups)
    means = {g: float(y[groups == g].mean()) for g in dict.fromkeys(groups)}
    ranked = sorted(means, key=means.get, reverse=maximize)
    best, worst = ranked[0], ranked[-1]
    a, b = y[groups == best], y[groups == worst]
    lo = hi = math.nan
    if len(a) > 1 and len(b) > 1 and best != worst:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
        lo, hi = float(ci.low), float(ci.high)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # both levels without spread
            lo = hi = means[best] - means[worst]
    return {"best_level": best, "worst_level": worst, "best_minus_worst": means[best] - means[worst],
            "bw_ci_low": lo, "bw_ci_high": hi}


def eta_squared(y: Sequence[float], groups: Sequence[str]) -> tuple[float, float]:
    """``(eta^2, p)``: SS_between / SS_total of ``y`` over ``groups`` (the correlation ratio; Cohen
    1973) and the one-way ANOVA F-test p-value (``scipy.stats.f_oneway``; NaN when undefined, e.g.
    one trial per level)."""
    import numpy as np
    from scipy import stats

    y = np.asarray(y, dtype=float)
    groups = np.asarray(groups)
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0:
        return math.nan, math.nan
    between = sum(len(y[groups == g]) * (y[groups == g].mean() - y.mean()) ** 2 for g in np.unique(groups))
    samples = [y[groups == g] for g in np.unique(groups)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.f_oneway(*samples).pvalue) if len(y) > len(samples) else math.nan
    return float(between) / total, p


def optuna_importances(parent: Run, storage: str | None, dims: Sequence[str]) -> tuple[dict[str, float], str]:
    """Optuna's importances (default evaluator) of the parent's study, keyed by dimension; and a note
    when they are not available.  A study param ``x`` is the dimension ``x`` or, for a config group
    choice such as ``augment``, ``x.name``."""
    url = storage or parent.data.tags.get("optuna.storage") or ""
    study_name = parent.data.tags[TAG_SWEEP_PARENT]
    if not url:
        return {}, "no Optuna storage (pass --storage)"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(study)
    except Exception as err:  # noqa: BLE001 -- any failure (no study, bad URL, too few trials) only drops a column
        return {}, f"Optuna importances unavailable: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
    out = {}
    for name, value in raw.items():
        key = name if name in dims or f"{name}.name" not in dims else f"{name}.name"
        out[key] = float(value)
    return out, ""


def analyse_sweep(parent: Run, trials: pd.DataFrame, bins: int, storage: str | None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """Marginal means, importances (with the best-minus-worst level difference), the counted trials with their
    levels, and a note."""
    import pandas as pd

    sweep = parent.data.tags[TAG_SWEEP_PARENT]
    maximize = parent.data.tags.get("optuna.direction", "").lower() != "minimize"
    counted = trials[trials["state"] == "counted"].reset_index(drop=True)
    dims = dimensions(counted)
    means, importances = [], []
    level_frame = counted[["run_id", "trial", "objective_key", "objective"]].copy()
    level_frame.insert(0, "sweep", sweep)
    optuna_imp, note = optuna_importances(parent, storage, dims)
    # A param that only some choices of another have (augment.probability under augment.name) splits the
    # trials exactly as that one does: it is reported as the same dimension (column same_as).
    found = [(dim, levels(counted[f"param:{dim}"], bins)) for dim in dims]
    partition = {dim: tuple(pd.factorize(level.astype(str))[0]) for dim, level in found}
    aliases_of: dict[str, list[str]] = {}
    for dim, level in found:
        if UNSET in set(level.astype(str)):
            owner = next((d for d, lv in found if d != dim and UNSET not in set(lv.astype(str))
                          and partition[d] == partition[dim]), None)
            if owner is not None:
                aliases_of.setdefault(owner, []).append(dim)
    hidden = {a for group in aliases_of.values() for a in group}
    for dim, level in found:
        if dim in hidden:
            continue
        aliases = aliases_of.get(dim, [])
        level_frame[dim] = level.astype(str)
        for name, sub in counted.groupby(level, sort=True, observed=True):
            mean, lo, hi, sd = t_interval(sub["objective"])
            means.append({"sweep": sweep, "dimension": dim, "level": name, "n": len(sub), "mean": mean,
                          "ci_low": lo, "ci_high": hi, "sd": sd})
        eta2, p = eta_squared(counted["objective"], level.astype(str))
        optuna_sum = sum(optuna_imp[d] for d in [dim, *aliases] if d in optuna_imp)
        importances.append({"sweep": sweep, "dimension": dim, "n_levels": int(level.nunique()), "eta2": eta2,
                            "anova_p": p, "optuna": optuna_sum if optuna_imp else math.nan,
                            **best_minus_worst(counted["objective"], level.astype(str), maximize),
                            "same_as": ", ".join(aliases)})
    imp = pd.DataFrame(importances, columns=IMPORTANCE_COLUMNS)
    imp = imp.sort_values("eta2", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    return pd.DataFrame(means, columns=MEANS_COLUMNS), imp, level_frame, note


# ---------------------------------------------------------------------------------------------
# output


def plot(means: pd.DataFrame, directions: dict[str, str]) -> Any:
    """One row of panels per sweep, one panel per dimension: marginal means with 95% intervals."""
    import numpy as np

    plt = pyplot()
    sweeps = list(dict.fromkeys(means["sweep"]))
    ncols = max([means[means["sweep"] == s]["dimension"].nunique() for s in sweeps] + [1])
    fig, axes = plt.subplots(max(len(sweeps), 1), ncols, figsize=(3.8 * ncols, 3.4 * max(len(sweeps), 1)),
                             squeeze=False)
    for r, sweep in enumerate(sweeps):
        sub = means[means["sweep"] == sweep]
        dims = list(dict.fromkeys(sub["dimension"]))
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(dims):
                ax.axis("off")
                continue
            part = sub[sub["dimension"] == dims[c]]
            x = np.arange(len(part))
            lower = (part["mean"] - part["ci_low"]).fillna(0).to_numpy()
            upper = (part["ci_high"] - part["mean"]).fillna(0).to_numpy()
            ax.errorbar(x, part["mean"], yerr=[lower, upper], fmt="o", capsize=4)
            for xi, n in zip(x, part["n"]):
                ax.annotate(f"n={n}", (xi, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=7)
            ax.set_xticks(x, list(part["level"]), rotation=30, ha="right", fontsize=7)
            ax.set_title(dims[c], fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            if c == 0:
                ax.set_ylabel(f"{sweep}\nobjective ({directions.get(sweep) or 'direction unknown'})", fontsize=8)
    if means.empty:
        axes[0][0].text(0.5, 0.5, "no swept dimension", ha="center", va="center")
    fig.tight_layout()
    return fig


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    if args.bins < 2:
        raise AtmError(f"--bins {args.bins}: need at least 2 bins")
    index = RunIndex.open(args)
    parents = select_sweeps(index, args)
    all_means, all_imp, all_trials, sections, used, directions = [], [], [], [], [], {}
    for parent in parents:
        sweep = parent.data.tags[TAG_SWEEP_PARENT]
        trials, counts = trial_frame(index, parent)
        summary = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)
        if counts["counted"] < MIN_TRIALS:
            print(f"warning: sweep {sweep}: {counts['counted']} usable trial(s) ({summary or 'no trials'}), "
                  f"need {MIN_TRIALS}; skipped", file=sys.stderr)
            continue
        means, imp, levels_, note = analyse_sweep(parent, trials, args.bins, args.storage)
        if note:
            print(f"warning: sweep {sweep}: {note}", file=sys.stderr)
        directions[sweep] = parent.data.tags.get("optuna.direction", "")
        objective = ", ".join(sorted(set(levels_["objective_key"])))
        used += [parent.info.run_id, *levels_["run_id"]]
        sections.append(
            f"## Sweep {sweep}: objective {objective} ({directions[sweep] or 'direction unknown'}), trials: "
            f"{summary}\n\nImportance of each dimension (eta2 = SS_between/SS_total of a one-way ANOVA; optuna = "
            f"optuna.importance.get_param_importances, PED-ANOVA; best_minus_worst = difference of the best and "
            f"the worst level's mean objective, Welch 95% t-interval bw_ci_low..bw_ci_high):\n\n"
            f"{format_markdown_table(imp.drop(columns='sweep'), FORMATS) if len(imp) else '(no dimension varies)'}"
            f"\n\nMarginal means of the objective per level, 95% t-intervals:\n\n"
            f"{format_markdown_table(means.drop(columns='sweep'), FORMATS) if len(means) else '(none)'}\n")
        all_means.append(means)
        all_imp.append(imp)
        all_trials.append(levels_)
    if not sections:
        raise AtmError(f"no sweep with at least {MIN_TRIALS} finished, unpruned trials that logged their "
                       f"objective {index.where} (sweeps: "
                       + ", ".join(p.data.tags[TAG_SWEEP_PARENT] for p in parents) + f"); {SWEEP_HINT}")
    means = pd.concat(all_means, ignore_index=True)
    importances = pd.concat(all_imp, ignore_index=True)
    markdown = f"# Ablation report {index.where}\n\n" + "\n".join(sections)
    metrics = {}
    for _, row in importances.iterrows():
        metrics[f"importance/eta2/{row['sweep']}/{row['dimension']}"] = row["eta2"]
        metrics[f"importance/optuna/{row['sweep']}/{row['dimension']}"] = row["optuna"]
        for column in ("best_minus_worst", "bw_ci_low", "bw_ci_high"):
            metrics[f"ablation/{column}/{row['sweep']}/{row['dimension']}"] = row[column]
    publish(args, index, ANALYSIS_NAME, markdown,
               {"ablation.md": markdown, "marginal_means.csv": means, "importances.csv": importances,
                "trials.csv": pd.concat(all_trials, ignore_index=True), "marginal_means.png": plot(means, directions)},
               consumed_run_ids=used, metrics=metrics,
               params={"sweeps": ",".join(directions), "bins": args.bins, "confidence": CONFIDENCE})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
