"""Do atm's tracked runs reproduce the seed findings of AlexaTM and Distiller?  One row per finding, decided
with a 95% interval.

Decision rule, fixed before any result was looked at (:mod:`analysis._findings_spec`: :func:`verdict`):

* every finding names one statistic, the sign the paper claims for it and the unit its sample consists of;
* ``reproduced``: the 95% interval of the statistic excludes zero in the claimed direction;
* ``contradicted``: it excludes zero in the opposite direction;
* ``inconclusive``: otherwise (it contains zero, or cannot be computed); the row then gives the sample size at
  which an effect of the observed size would be detected with 80% power (:func:`atm.stats.required_n`, in the
  finding's unit: test utterances per locale, checkpoints, languages or ablation trials);
* ``missing``: the runs it rests on are not in the experiment (or logged no per-example records); the row names
  the job of ``conf/experiment/alexatm_mini_jobs`` (or the sweep) that produces them.

The findings (AlexaTM = FitzGerald et al., KDD 2022; Distiller = He et al. 2021):

* **F1** (AlexaTM Table 3) perplexity falls (F1a) and mask filling rises (F1b) as XNLI accuracy rises across
  pretraining checkpoints: Pearson r of ``eval/perplexity/written`` / ``eval/mask_fill/noun_accuracy`` with
  ``eval/xnli/avg_accuracy`` over every evaluated checkpoint of the Stage-1/Stage-2 teachers, checkpoints with a
  degenerate XNLI probe left out (:mod:`analysis.correlate_xnli`); Fisher-z interval; unit: checkpoints
  (required n by the Fisher z standard error 1/sqrt(n - 3)).
* **F2** Stage-2 in-domain pretraining lowers intent (F2a) and slot (F2b) error: relative error change
  (err_stage2 - err_stage1) / err_stage1 of the largest Stage-2 teacher against the Stage-1 teacher it
  continued, full fine-tuning with the same recipe, pooled over locales, paired bootstrap over test utterances
  and seeds (:mod:`analysis._examples`).
* **F3** a distilled student beats a same-size model trained without distillation: exact-match relative error
  change of the final student against the newest from-scratch model of its architecture (same recipe).
* **F4** a larger teacher gives lower perplexity (F4a: relative change of the geometric-mean perplexity over
  languages, written and spoken, Student-t over languages) and better downstream accuracy (F4b: MASSIVE intent
  accuracy difference, paired bootstrap), largest minus smallest Stage-1 teacher (:mod:`analysis.scaling_table`).
* **F5** in the distillation ablation the intermediate-representation objective matters more than the logit
  loss (F5a: eta^2 of ``distill.intermediate.loss`` minus eta^2 of ``distill.logit.loss``, the share of the
  objective's variance each explains) and MI-alpha is among the best objectives (F5b: MI-alpha's advantage over
  the mean of the other objectives' mean objectives, relative to that mean, signed so that positive = MI-alpha
  better: ``(m_other - m_mi) / |m_other|`` for a minimised objective); both by a bootstrap over the ablation
  trials.

The relative error changes of F2/F3 are decided on their own intervals; their required n scales the interval of
the score difference drawn from the same resamples (same sign in every resample, so the same decision).

Also printed: the TF-IDF + logistic-regression intent baseline (:mod:`analysis.baseline_tfidf`) next to the
largest teacher's en-US intent accuracy (``--no-baseline`` to skip).

Outputs under ``--out`` (default ``analysis/out/findings/``): ``findings.md`` (also printed), ``findings.csv``
(full precision, run ids), ``findings.png`` (forest plot of the effects with their intervals), logged to an
MLflow run ``atm.analysis=findings`` with metrics ``findings/<id>/{estimate,ci_low,ci_high,required_n}`` and
params ``verdict/<id>``. Exit status 0 whatever the verdicts; 2 only for a store or experiment that is not there.

Usage::

    python analysis/findings.py
    python analysis/findings.py --no-baseline --no-log
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from analysis import _examples as ex
from analysis._findings_spec import (  # the specs and the decision rule (re-exported)
    ABLATION_JOB, CONTRADICTED, CSV_COLUMNS, FULL, INCONCLUSIVE, INTERMEDIATE, JOB, LOGIT, MI_ALPHA, MISSING,
    REPRODUCED, SPECS, TABLE_COLUMNS, Measure, Spec, required_sample, verdict,
)
from analysis._output import format_markdown_table, human_count, publish, pyplot
from analysis._runs import finetune_variant, finetunes_of, massive_scores, metric_history_frame, model_size, param_value
from analysis._store import STAGE_EVALUATE, TAG_EVALUATED_STAGE, RunIndex, analysis_parser, cli, is_sweep_trial
from atm.errors import AtmError
from atm.tracking import TAG_STAGE, TAG_SWEEP_PARENT

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd
    from mlflow.entities import Run

ANALYSIS_NAME = "findings"


def _missing(note: str, run_ids: Sequence[str] = ()) -> Measure:
    return Measure(run_ids=list(run_ids), note=note, missing=True)


class Context:
    """The run index of the experiment and the per-example artifact reader, shared by the findings."""

    def __init__(self, index: RunIndex):
        self.index = index
        self.artifacts = ex.Artifacts(index.client)

    def runs(self, stage: str) -> list[Run]:
        """Finished runs of ``stage`` that are not sweep trials, oldest first."""
        return [r for r in self.index.of_stage(stage) if not is_sweep_trial(r)]


# --------------------------------------------------------------------------------------------------------- F1


def measure_f1(ctx: Context) -> dict[str, Measure]:
    """F1a/F1b: pooled correlations over the teachers' evaluated checkpoints (degenerate XNLI left out)."""
    from analysis import correlate_xnli as cx
    from atm.stats import Interval

    runs = [r for r in ctx.index.of_stage(STAGE_EVALUATE)
            if r.data.tags.get(TAG_EVALUATED_STAGE) in ("pretrain_stage1", "pretrain_stage2")]
    keys = {"F1a": "eval/perplexity/written", "F1b": "eval/mask_fill/noun_accuracy"}
    if not runs:
        return {k: _missing("no finished evaluate run of a pretrain_stage1/2 teacher") for k in keys}
    wanted = {cx.TARGET, cx.DEGENERATE_LANGUAGES, *keys.values()}
    wanted |= {k for r in runs for k in r.data.metrics if cx.LANG_DEGENERATE.match(k)}
    frame = metric_history_frame(ctx.index.client, runs, keys=sorted(wanted), resolve_evaluated_names=False)
    ids = [r.info.run_id for r in runs]
    out = {}
    for finding, key in keys.items():
        if cx.TARGET not in frame.columns or key not in frame.columns:
            out[finding] = _missing(f"the evaluate runs logged no {key if cx.TARGET in frame.columns else cx.TARGET}",
                                    ids)
            continue
        flagged = cx.degenerate(frame, cx.TARGET)
        result = cx.correlate(frame[key].where(~flagged), frame[cx.TARGET].where(~flagged))
        n, n_left_out = result["n"], int((flagged & frame[key].notna() & frame[cx.TARGET].notna()).sum())
        note = f"{n_left_out} checkpoint(s) with a degenerate XNLI probe left out" if n_left_out else ""
        if math.isnan(result["pearson_r"]):
            out[finding] = Measure(None, run_ids=ids, note="; ".join(x for x in (result["note"], note) if x))
            continue
        r, lo, hi = result["pearson_r"], result["pearson_lo"], result["pearson_hi"]
        interval = Interval(r, lo, hi, n)
        power = None
        if n > 3 and max(abs(lo), abs(hi)) < 1:  # Fisher z scale: standard error 1 / sqrt(n - 3)
            power = Interval(math.atanh(r), math.atanh(lo), math.atanh(hi), n - 3)
        out[finding] = Measure(interval, power or Interval(r, math.nan, math.nan, n), 3.0, ids, note)
    return out


# ----------------------------------------------------------------------------------------------- F2, F3, F4b


def _by_size(runs: Sequence[Run]) -> list[Run]:
    """Largest first (non-embedding parameters), newest first within a size."""
    return sorted(runs, key=lambda r: (-_size(r), -r.info.start_time))


def _size(run: Run) -> float:
    size = model_size(run)[0]
    return -1.0 if math.isnan(size) else size


def _label(run: Run) -> str:
    """``name (size)`` of an encoder run, for the notes."""
    return f"{run.info.run_name or run.info.run_id[:8]} ({human_count(model_size(run)[0])})"


def massive_measure(ctx: Context, ft_a: Run, ft_b: Run, score: str, relative: bool, ids: Sequence[str],
                    jobs: str, what: str) -> Measure:
    """Pooled paired comparison of finetune run ``ft_a`` against ``ft_b`` on ``score``: the relative error change
    (``relative``) or the difference, with the difference's interval for the required n; ``what`` names the two
    encoders in the note."""
    comparisons, note = ex.compare_finetunes(ctx.artifacts, ft_a, ft_b, [score])
    ids = [*ids, ft_a.info.run_id, ft_b.info.run_id]
    if not comparisons:
        return _missing(f"{note.removeprefix('no interval: ')}; re-run {jobs} (per-example predictions)", ids)
    pooled = comparisons["avg"]
    interval = pooled.relative[score] if relative else pooled.difference[score]
    note = (f"{what}: {len(pooled.strata)} locale(s), {pooled.n} utterances each, seeds {len(pooled.seeds_a)} vs "
            f"{len(pooled.seeds_b)}")
    return Measure(interval, pooled.difference[score], 0.0, ids, note)


def measure_f2(ctx: Context) -> dict[str, Measure]:
    """F2a/F2b: the largest Stage-2 teacher with a full fine-tuning paired to its Stage-1 teacher's."""
    from analysis import stage2_effect

    for stage2 in _by_size(ctx.runs("pretrain_stage2")):
        stage1, pairs, _ = stage2_effect.finetune_pairs(ctx.index, stage2)
        pair = next(((ft2, ft1) for ft2, ft1 in pairs if finetune_variant(ft2) == FULL), None)
        if pair is not None:
            ids = [stage2.info.run_id, stage1.info.run_id]
            jobs, what = "jobs ft_stage1_l and ft_stage2_l", f"{_label(stage2)} vs {_label(stage1)}"
            return {"F2a": massive_measure(ctx, *pair, "intent_accuracy", True, ids, jobs, what),
                    "F2b": massive_measure(ctx, *pair, "slot_f1", True, ids, jobs, what)}
    note = "no Stage-2 teacher with a full fine-tuning paired (same recipe) with one of its Stage-1 teacher"
    return {"F2a": _missing(note), "F2b": _missing(note)}


def measure_f3(ctx: Context) -> Measure:
    """F3: the newest final student with a full fine-tuning and a same-size from-scratch model of the same recipe."""
    from analysis import distillation_table as dt

    for student in reversed(ctx.runs("distill_final")):
        for ft in finetunes_of(ctx.index, student.info.run_id).get(FULL, []):
            scratch, scratch_ft = dt.baseline_finetune(ctx.index, dt.scratch_models(ctx.index, student), FULL, ft)
            if scratch_ft is not None:
                return massive_measure(ctx, ft, scratch_ft, "exact_match", True,
                                       [student.info.run_id, scratch.info.run_id], "jobs ft_final and ft_stage2_s",
                                       f"{_label(student)} vs {_label(scratch)}")
    return _missing("no final student with a full fine-tuning and a same-size from-scratch model fine-tuned with "
                    "the same recipe")


def measure_f4(ctx: Context) -> dict[str, Measure]:
    """F4a/F4b: largest vs smallest Stage-1 teacher (:func:`analysis.scaling_table.teacher_extremes`)."""
    from analysis import scaling_table

    pair = scaling_table.teacher_extremes(ctx.runs("pretrain_stage1"), "pretrain_stage1")
    if pair is None:
        note = "fewer than two sizes of Stage-1 teacher"
        return {"F4a": _missing(note), "F4b": _missing(note)}
    small, large = pair
    ids = [small.info.run_id, large.info.run_id]
    evals = ctx.index.evaluations(small.info.run_id), ctx.index.evaluations(large.info.run_id)
    if evals[0] and evals[1]:
        change, note = scaling_table.perplexity_change(evals[0][-1], evals[1][-1], scaling_table.PERPLEXITY_DOMAINS)
        eval_ids = [*ids, evals[0][-1].info.run_id, evals[1][-1].info.run_id]
        f4a = (_missing(f"{note}; re-run jobs eval_stage1_s and eval_stage1_l", eval_ids) if change is None
               else Measure(change, run_ids=eval_ids, note=note))
    else:
        f4a = _missing("the smallest or the largest Stage-1 teacher has no evaluate run", ids)
    fts = scaling_table.matched_finetunes(ctx.index, small, large, FULL)
    f4b = _missing("the smallest and the largest Stage-1 teacher have no full fine-tuning with the same recipe", ids)
    if fts is not None:
        f4b = massive_measure(ctx, fts[1], fts[0], "intent_accuracy", False, ids, "jobs ft_stage1_s and ft_stage1_l",
                              f"{_label(large)} vs {_label(small)}")
    if not f4a.missing:
        f4a.note = "; ".join(x for x in (f"{_label(large)} vs {_label(small)}", f4a.note) if x)
    return {"F4a": f4a, "F4b": f4b}


# --------------------------------------------------------------------------------------------------------- F5


def _group_means(y: np.ndarray, codes: np.ndarray, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per level ``k``: ``(counts (B, K), means (B, K))`` of ``y`` over the trials with ``codes == k`` (NaN mean
    for an empty level); ``y``, ``codes``: (B, n)."""
    import numpy as np

    masks = codes[..., None] == np.arange(n_levels)  # (B, n, K)
    counts = masks.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (y[..., None] * masks).sum(axis=1) / counts
    return counts, means


def eta_squared_statistic(n_a: int, n_b: int) -> Callable[[np.ndarray], np.ndarray]:
    """Bootstrap statistic over trials ``(B, 1, trials, 3)`` with components ``(objective, level code of
    dimension a, level code of b)``: eta^2_a - eta^2_b, eta^2 = SS_between / SS_total (Pearson 1905; the
    ``eta2`` of :func:`analysis.ablation_report.eta_squared`). NaN where the objective is constant."""
    import numpy as np

    def statistic(resampled: np.ndarray) -> np.ndarray:
        y = resampled[:, 0, :, 0]
        grand = y.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = ((y - grand) ** 2).sum(axis=1)
            out = []
            for column, n_levels in ((1, n_a), (2, n_b)):
                counts, means = _group_means(y, resampled[:, 0, :, column].astype(int), n_levels)
                between = np.nansum(counts * (means - grand) ** 2, axis=1)
                out.append(between / np.where(total > 0, total, np.nan))
        return out[0] - out[1]

    return statistic


def level_advantage_statistic(n_levels: int, level: int, maximize: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Bootstrap statistic over trials ``(B, 1, trials, 2)`` with components ``(objective, level code)``: the
    relative advantage of ``level``'s mean objective ``m`` over the mean ``o`` of the other levels' means,
    ``(m - o) / |o|`` when the objective is maximised, ``(o - m) / |o|`` when minimised (positive = ``level``
    better); NaN when a level is absent from a resample."""
    import numpy as np

    def statistic(resampled: np.ndarray) -> np.ndarray:
        _, means = _group_means(resampled[:, 0, :, 0], resampled[:, 0, :, 1].astype(int), n_levels)
        others = np.delete(means, level, axis=1).mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            advantage = (means[:, level] - others) / np.abs(others)
        return advantage if maximize else -advantage

    return statistic


def _ablation_trials(ctx: Context) -> tuple[Run, pd.DataFrame] | None:
    """The newest sweep whose counted trials vary both the logit loss and the intermediate objective."""
    from analysis import ablation_report

    parents = [r for r in ctx.index.runs if TAG_SWEEP_PARENT in r.data.tags]
    parents.sort(key=lambda r: (r.data.tags[TAG_SWEEP_PARENT] != "alexatm_mini_ablation", -r.info.start_time))
    for parent in parents:
        trials, _ = ablation_report.trial_frame(ctx.index, parent)
        if not len(trials):
            continue
        counted = trials[trials["state"] == "counted"]
        columns = [f"param:{LOGIT}", f"param:{INTERMEDIATE}"]
        if all(c in counted.columns and counted[c].nunique() > 1 for c in columns):
            return parent, counted.dropna(subset=columns).reset_index(drop=True)
    return None


def measure_f5(ctx: Context) -> dict[str, Measure]:
    """F5a/F5b: bootstraps over the ablation trials (:func:`atm.stats.bootstrap_interval`)."""
    import numpy as np
    import pandas as pd

    from atm import stats

    found = _ablation_trials(ctx)
    if found is None:
        note = f"no sweep whose finished trials vary both {LOGIT} and {INTERMEDIATE}"
        return {"F5a": _missing(note), "F5b": _missing(note)}
    parent, trials = found
    ids = [parent.info.run_id, *trials["run_id"]]
    y = trials["objective"].to_numpy(dtype=float)
    inter, inter_levels = pd.factorize(trials[f"param:{INTERMEDIATE}"], sort=True)
    logit, logit_levels = pd.factorize(trials[f"param:{LOGIT}"], sort=True)
    direction = parent.data.tags.get("optuna.direction", "").lower()
    note = f"{len(trials)} trials of sweep {parent.data.tags[TAG_SWEEP_PARENT]}, objective " \
           f"{', '.join(sorted(set(trials['objective_key'])))} ({direction or 'direction unknown: higher = better'})"
    scores = np.stack([y, inter, logit], axis=-1)[None]  # (1 "seed", trials, 3)
    f5a = stats.bootstrap_interval(scores, eta_squared_statistic(len(inter_levels), len(logit_levels)))
    out = {"F5a": Measure(f5a, run_ids=ids, note=note)}
    if MI_ALPHA not in set(inter_levels):
        out["F5b"] = _missing(f"no trial with {INTERMEDIATE}={MI_ALPHA}", ids)
        return out
    advantage = level_advantage_statistic(len(inter_levels), list(inter_levels).index(MI_ALPHA),
                                          maximize=direction != "minimize")
    f5b = stats.bootstrap_interval(np.stack([y, inter], axis=-1)[None], advantage)
    out["F5b"] = Measure(f5b, run_ids=ids, note=note)
    return out


# ----------------------------------------------------------------------------------------------------- table


def _format(value: float, fmt: str) -> str:
    if not math.isfinite(value):
        return "nan"
    return {"r": f"{value:+.3f}", "rel": f"{value:+.2%}", "pp": f"{100 * value:+.2f} pp", "eta2": f"{value:+.3f}"}[fmt]


def finding_row(spec: Spec, measure: Measure) -> dict[str, Any]:
    """The table row of one finding (:data:`CSV_COLUMNS`)."""
    iv = measure.interval
    decided = MISSING if measure.missing else verdict(iv, spec.direction)
    estimate, lo, hi = (iv.estimate, iv.lo, iv.hi) if iv is not None else (math.nan,) * 3
    figure = "" if measure.missing else (
        f"{_format(estimate, spec.fmt)} [{_format(lo, spec.fmt)}, {_format(hi, spec.fmt)}]" if iv is not None else "n/a")
    needed = required_sample(measure) if decided == INCONCLUSIVE else math.nan
    jobs = ABLATION_JOB if spec.jobs == ("ablation",) else "; ".join(JOB.format(j) for j in spec.jobs)
    return {"finding": spec.id, "claim": spec.claim, "source_figure": spec.source, "statistic": spec.statistic,
            "atm_figure": figure, "estimate": estimate, "ci_low": lo, "ci_high": hi, "verdict": decided,
            "required_n": needed, "unit": spec.unit, "n": iv.n if iv is not None else 0,
            "run_ids": ",".join(dict.fromkeys(measure.run_ids)), "note": measure.note,
            "job": jobs if decided == MISSING else ""}


def measure_all(ctx: Context) -> dict[str, Measure]:
    """Every finding's measure; a finding whose reading fails with an AtmError (a malformed artifact) is
    ``missing`` with the error as its note."""
    out: dict[str, Measure] = {}
    for ids, measure in ((("F1a", "F1b"), measure_f1), (("F2a", "F2b"), measure_f2), (("F3",), measure_f3),
                         (("F4a", "F4b"), measure_f4), (("F5a", "F5b"), measure_f5)):
        try:
            result = measure(ctx)
        except AtmError as err:
            result = {i: _missing(str(err)) for i in ids}
        out.update(result if isinstance(result, dict) else {ids[0]: result})
    return out


def findings_frame(ctx: Context) -> pd.DataFrame:
    """One row per finding of :data:`SPECS`, in order."""
    import pandas as pd

    measures = measure_all(ctx)
    return pd.DataFrame([finding_row(SPECS[i], measures[i]) for i in SPECS], columns=CSV_COLUMNS)


def _short_ids(ids: str, keep: int = 4) -> str:
    """The first ``keep`` run ids (8 characters each) and how many more (the CSV has them all)."""
    parts = [i[:8] for i in ids.split(",") if i]
    return " ".join(parts[:keep]) + (f" (+{len(parts) - keep} more)" if len(parts) > keep else "")


def render(frame: pd.DataFrame) -> str:
    """Markdown: the findings table, then each row's statistic and note."""
    shown = frame.copy()
    shown["required_n"] = [f"{n:.0f} {unit}" if math.isfinite(n) else ("undefined" if v == INCONCLUSIVE else "")
                           for n, unit, v in zip(frame["required_n"], frame["unit"], frame["verdict"])]
    shown["runs"] = [_short_ids(ids) for ids in frame["run_ids"]]
    shown["atm_figure"] = [f or "-" for f in frame["atm_figure"]]
    lines = ["Seed findings (AlexaTM, FitzGerald et al. KDD 2022; Distiller, He et al. 2021) on atm's runs. "
             "Verdict: reproduced = the 95% interval excludes zero in the claimed direction, contradicted = in the "
             "opposite one, else inconclusive (with the sample size a decision would need at 80% power).", "",
             format_markdown_table(shown[TABLE_COLUMNS]), ""]
    for _, row in frame.iterrows():
        detail = f"- {row['finding']}: {row['statistic']}"
        if row["note"]:
            detail += f"; {row['note']}"
        if row["job"]:
            detail += f"; run: `{row['job']}`"
        lines.append(detail)
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame) -> Any:
    """Forest plot: one line per finding, its estimate and 95% interval, coloured by verdict; the claimed
    direction is marked on the right."""
    plt = pyplot()
    colours = {REPRODUCED: "tab:green", CONTRADICTED: "tab:red", INCONCLUSIVE: "tab:grey", MISSING: "lightgrey"}
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(frame) + 1.8))
    for y, (_, row) in enumerate(frame.iloc[::-1].iterrows()):
        spec = SPECS[row["finding"]]
        if math.isfinite(row["estimate"]):
            lo = row["ci_low"] if math.isfinite(row["ci_low"]) else row["estimate"]
            hi = row["ci_high"] if math.isfinite(row["ci_high"]) else row["estimate"]
            ax.errorbar(row["estimate"], y, xerr=[[row["estimate"] - lo], [hi - row["estimate"]]], fmt="o",
                        color=colours[row["verdict"]], capsize=3)
        ax.annotate(f"{row['verdict']}  (claimed {'> 0' if spec.direction > 0 else '< 0'})", (1.01, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize=8, color=colours[row["verdict"]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(frame)), [f"{f} ({SPECS[f].fmt})" for f in frame["finding"].iloc[::-1]], fontsize=8)
    ax.set_ylim(-0.6, len(frame) - 0.4)
    ax.set_xlabel("effect with 95% interval\nr: correlation, rel: relative change, pp: accuracy difference "
                  "(fraction), eta2: difference of eta^2", fontsize=8)
    ax.set_title("Seed findings: atm's effects (AlexaTM, Distiller)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    return fig


# -------------------------------------------------------------------------------------------------- baseline


def largest_teacher_finetune(ctx: Context, locale: str) -> tuple[Run, Run] | None:
    """``(teacher, finetune run)``: the largest pretrain_stage1/2 teacher (Stage 2 first within a size, then the
    newest) with a full fine-tuning that scored ``locale``."""
    teachers = _by_size([*ctx.runs("pretrain_stage2"), *ctx.runs("pretrain_stage1")])
    for teacher in teachers:
        for ft in finetunes_of(ctx.index, teacher.info.run_id).get(FULL, []):
            if (locale, "intent_accuracy") in massive_scores(ft):
                return teacher, ft
    return None


def baseline_section(ctx: Context, locale: str, max_train: int | None) -> tuple[str, dict[str, float], list[str]]:
    """Markdown of the TF-IDF baseline next to the largest teacher's intent accuracy, its metrics and run ids.

    When the teacher's fine-tuning capped its training data (``finetune.max_train_per_locale``), the baseline
    is also trained on a sample of that size (same seeded shuffle) for a like-for-like row.
    """
    from analysis import baseline_tfidf

    rows, metrics, ids = [], {}, []
    found = largest_teacher_finetune(ctx, locale)
    caps = [(max_train, "")]
    if found is not None:
        teacher, ft = found
        ids = [teacher.info.run_id, ft.info.run_id]
        m = ft.data.metrics
        key = f"eval/massive/{locale}/intent_accuracy"
        cap = param_value(ft.data.params.get("finetune.max_train_per_locale"))
        n_test = m.get(f"eval/massive/{locale}/n", math.nan)
        rows.append(f"| {teacher.info.run_name or teacher.info.run_id[:8]} ({teacher.data.tags.get(TAG_STAGE)}, "
                    f"{human_count(model_size(teacher)[0])} params), fine-tuned {ft.info.run_id[:8]} | "
                    f"{m[key]:.4f} | {ex.format_interval(m.get(key + '_lo', math.nan), m.get(key + '_hi', math.nan), '.4f')}"
                    f" | {cap if cap is not None else 'all'} per locale | {n_test:.0f} | |")
        if isinstance(cap, int) and max_train is None:
            caps.append((cap, "_matched_train"))
    else:
        rows.append(f"| largest teacher: no full fine-tuning scored on {locale} (`{JOB.format('ft_stage2_l')}`) "
                    "| | | | | |")
    for cap, suffix in caps:
        try:
            result = baseline_tfidf.tfidf_intent_baseline(locale, cap)
        except AtmError as err:
            rows.append(f"| TF-IDF + logistic regression: unavailable ({err}) | | | | | |")
            break
        acc = result.accuracy
        label = "whole train split" if cap is None else (
            "the teacher's training budget" if suffix else f"{cap} training utterances")
        rows.append(f"| TF-IDF + logistic regression ({label}) | {acc.estimate:.4f} | [{acc.lo:.4f}, {acc.hi:.4f}] | "
                    f"{result.n_train} | {result.n_test} | {result.seconds:.1f} |")
        metrics.update({f"baseline/tfidf_logreg/{locale}/intent_accuracy{suffix}": acc.estimate,
                        f"baseline/tfidf_logreg/{locale}/intent_accuracy{suffix}_lo": acc.lo,
                        f"baseline/tfidf_logreg/{locale}/intent_accuracy{suffix}_hi": acc.hi,
                        f"baseline/tfidf_logreg/{locale}/seconds{suffix}": result.seconds})
    header = (f"\nIntent accuracy on MASSIVE {locale} test: the largest teacher vs a TF-IDF (word 1-2-grams + char "
              "2-4-grams) + logistic-regression baseline (analysis/baseline_tfidf.py; 95% intervals)\n\n"
              "| system | intent accuracy | 95% interval | train utterances | test utterances | seconds |\n"
              "|---|---:|---|---:|---:|---:|\n")
    return header + "\n".join(rows) + "\n", metrics, ids


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(
        ANALYSIS_NAME,
        "One row per seed finding of AlexaTM / Distiller: atm's statistic with its 95% interval and the verdict "
        "reproduced / contradicted / inconclusive (with the sample size a decision would need) / missing.",
        "unused (the findings pick their runs themselves)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF intent baseline")
    parser.add_argument("--baseline-locale", default="en-US", help="MASSIVE locale of the baseline (default: en-US)")
    parser.add_argument("--baseline-max-train", type=int, default=None,
                        help="train the baseline on this many utterances (default: the whole train split)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.run_ids:
        raise AtmError("findings.py picks its runs itself; --run-id is not supported")
    ctx = Context(RunIndex.open(args))
    frame = findings_frame(ctx)
    markdown = f"# Findings {ctx.index.where}\n\n{render(frame)}"
    metrics: dict[str, float] = {}
    used = [i for ids in frame["run_ids"] for i in ids.split(",") if i]
    if not args.no_baseline:
        section, metrics, ids = baseline_section(ctx, args.baseline_locale, args.baseline_max_train)
        markdown += section
        used += ids
    for _, row in frame.iterrows():
        for column in ("estimate", "ci_low", "ci_high", "required_n"):
            metrics[f"findings/{row['finding']}/{column}"] = row[column]
    counts = frame["verdict"].value_counts()
    print("verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in (REPRODUCED, CONTRADICTED, INCONCLUSIVE, MISSING)),
          file=sys.stderr)
    publish(args, ctx.index, ANALYSIS_NAME, markdown,
               {"findings.md": markdown, "findings.csv": frame, "findings.png": plot(frame)},
               consumed_run_ids=used, metrics=metrics,
               params={f"verdict/{row['finding']}": row["verdict"] for _, row in frame.iterrows()}
               | {"decision_rule": "95% interval excludes 0 in the claimed direction = reproduced; in the other = "
                                   "contradicted; else inconclusive"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 whatever the verdicts, 2 for a missing store/experiment)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
