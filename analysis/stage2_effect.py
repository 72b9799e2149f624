"""What does Stage-2 pretraining buy?  Stage-2 vs Stage-1 teacher on MASSIVE (ATM, FitzGerald et al. 2022).

For every finished ``pretrain_stage2`` run (or those given with ``--run-id``) the Stage-1 teacher it
continued is its ``atm.input.init`` run.  Each finetune run over the Stage-2 teacher is paired with
the newest finetune run over the Stage-1 teacher of the same variant (``finetune.setting``, full or
frozen encoder) and the same fine-tuning recipe (``finetune.*``, ``trainer.*``, ``seed`` params), and
for every evaluated locale and their average it reports the relative error-rate change

    (err_stage2 - err_stage1) / err_stage1        (negative = Stage 2 makes fewer errors)

of intent classification (err = 1 - intent accuracy) and slot filling (err = 1 - slot F1), the
AlexaTM papers' measure (:func:`atm.metrics.relative_error_change`), with its 95% interval and that of the
difference of the scores (intent accuracy, slot F1) by a paired bootstrap over the test utterances both runs
predicted (``predictions/<locale>.jsonl``; each run's seeds resampled too; :mod:`analysis._examples`,
:func:`atm.stats.paired_bootstrap`). The ``avg`` row pools the locales: utterances are resampled within each
locale and the per-locale scores averaged. A pair whose runs logged no predictions has no interval (a note says so).

Outputs under ``--out`` (default ``analysis/out/stage2_effect/``): ``stage2_effect.md`` (also
printed: the locale average per pair, then every locale), ``stage2_effect.csv`` (every row, full
precision, with run ids and standard errors), ``stage2_effect.png`` (bars per locale), logged to a
new MLflow run (``atm.analysis=stage2_effect``) with metrics
``stage2/<setting>/<full|frozen>/<locale>/{intent,slot}_rel_error_change`` (and ``_lo``/``_hi``) of the newest
Stage-2 run.

Usage::

    python analysis/stage2_effect.py
    python analysis/stage2_effect.py --run-id <pretrain_stage2 run id> --no-log

To produce the runs: ``python -m atm.train stage=finetune encoder=stage1`` and ``encoder=stage2``
(and again with ``finetune.freeze_encoder=true`` for the frozen-encoder rows).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis import _examples as ex
from analysis._output import change_bar_axes, format_markdown_table, interval_metrics, publish, pyplot
from analysis._runs import (encoder_label, error_change, finetune_recipe, finetune_variant, finetunes_of,
                            massive_scores, matching_finetune)
from analysis._store import RunIndex, analysis_parser, cli, run_label
from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow.entities import Run

ANALYSIS_NAME = "stage2_effect"
STAGE1, STAGE2 = "pretrain_stage1", "pretrain_stage2"
#: (short name, MASSIVE score) of the two tasks compared.
TASKS = (("intent", "intent_accuracy"), ("slot", "slot_f1"))
TABLE_COLUMNS = ["stage2_run", "setting", "encoder", "locale",
                 "intent_err_stage1", "intent_err_stage2", "intent_rel_error_change", "intent_95ci",
                 "slot_err_stage1", "slot_err_stage2", "slot_rel_error_change", "slot_95ci"]
FORMATS = {c: ".4f" for c in TABLE_COLUMNS[4:] if "95ci" not in c} | {"intent_rel_error_change": "+.2%",
                                                                       "slot_rel_error_change": "+.2%"}
HINT = ("fine-tune both teachers with the same recipe: `python -m atm.train stage=finetune encoder=stage1` and "
        "`... encoder=stage2` (add finetune.freeze_encoder=true for the frozen-encoder rows)")


def build_parser() -> argparse.ArgumentParser:
    return analysis_parser(
        ANALYSIS_NAME,
        "Relative error-rate change of intent classification and slot filling on MASSIVE when the "
        "encoder is the Stage-2 teacher instead of the Stage-1 teacher it continued (full and frozen encoder).",
        "pretrain_stage2 run id(s); default: every finished pretrain_stage2 run in the experiment",
    )


def pair_rows(stage2: Run, stage1: Run, ft2: Run, ft1: Run,
              artifacts: ex.Artifacts | None = None) -> list[dict[str, Any]]:
    """One row per locale both finetune runs were evaluated on (``avg`` first), with paired-bootstrap intervals
    from their predictions when ``artifacts`` is given and they logged them."""
    s2, s1 = massive_scores(ft2), massive_scores(ft1)
    comparisons, note = ({}, "no interval: not computed") if artifacts is None else ex.compare_finetunes(
        artifacts, ft2, ft1, [score for _, score in TASKS], per_locale=True)
    setting, frozen = finetune_variant(ft2)
    locales = sorted({loc for loc, score in s2 if (loc, score) in s1}, key=lambda loc: (loc != "avg", loc))
    rows = []
    for locale in locales:
        row: dict[str, Any] = {
            "stage2_run": stage2.info.run_name or stage2.info.run_id[:8], "setting": setting,
            "encoder": encoder_label(frozen), "locale": locale,
        }
        for task, score in TASKS:
            a1, a2 = s1.get((locale, score), math.nan), s2.get((locale, score), math.nan)
            row.update({f"{task}_err_stage1": 1.0 - a1, f"{task}_err_stage2": 1.0 - a2,
                        f"{task}_rel_error_change": error_change(a2, a1),
                        f"{task}_err_se_stage1": s1.get((locale, f"{score}_se"), math.nan),
                        f"{task}_err_se_stage2": s2.get((locale, f"{score}_se"), math.nan),
                        **ex.interval_columns(comparisons.get(locale), score, task)})
        comparison = comparisons.get(locale)
        row.update({"n_examples": comparison.n if comparison else 0,
                    "seeds_stage1": len(comparison.seeds_b) if comparison else 0,
                    "seeds_stage2": len(comparison.seeds_a) if comparison else 0,
                    "interval_note": "" if comparison else (note or f"no interval: no predictions of both runs in {locale}")})
        row.update({"stage2_run_id": stage2.info.run_id, "stage1_run_id": stage1.info.run_id,
                    "finetune_stage2_run_id": ft2.info.run_id, "finetune_stage1_run_id": ft1.info.run_id})
        rows.append(row)
    return rows


def finetune_pairs(index: RunIndex, stage2: Run) -> tuple[Run | None, list[tuple[Run, Run]], str]:
    """``(stage1, [(finetune over stage2, finetune over stage1), ...], note)``: the Stage-1 teacher ``stage2``
    continued (its ``atm.input.init``) and, per variant and recipe (newest first), the finetune run over the
    Stage-2 teacher with the newest same-variant, same-recipe finetune run over the Stage-1 teacher; the note
    says why the list is empty."""
    label = run_label(stage2)
    stage1 = index.input(stage2, "init")
    if stage1 is None:
        return None, [], f"{label}: its atm.input.init (the Stage-1 teacher) is not an MLflow run"
    ft2_all, ft1_all = finetunes_of(index, stage2.info.run_id), finetunes_of(index, stage1.info.run_id)
    pairs = []
    for variant, ft2_runs in ft2_all.items():
        seen = set()
        for ft2 in ft2_runs:  # newest first; one pair per recipe
            recipe = finetune_recipe(ft2)
            if recipe in seen:
                continue
            seen.add(recipe)
            ft1 = matching_finetune(ft1_all.get(variant, []), ft2)
            if ft1 is not None:
                pairs.append((ft2, ft1))
    note = "" if pairs else (f"{label}: {sum(map(len, ft2_all.values()))} finetune run(s) over it, "
                             f"{sum(map(len, ft1_all.values()))} over its Stage-1 teacher "
                             f"{stage1.info.run_id}, none with the same variant and recipe")
    return stage1, pairs, note


def effect_frame(index: RunIndex, stage2_runs: Sequence[Run]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """All pair rows, the consumed run ids, and one note per Stage-2 run that gave no pair.

    Raises:
        AtmError: no Stage-2 run has a finetune run paired with one of its Stage-1 teacher.
    """
    import pandas as pd

    rows, used, notes = [], [], []
    artifacts = ex.Artifacts(index.client)
    for stage2 in stage2_runs:
        stage1, pairs, note = finetune_pairs(index, stage2)
        if note:
            notes.append(note)
        for ft2, ft1 in pairs:
            rows += pair_rows(stage2, stage1, ft2, ft1, artifacts)
            used += [stage2.info.run_id, stage1.info.run_id, ft2.info.run_id, ft1.info.run_id]
    if not rows:
        raise AtmError(f"no Stage-2/Stage-1 pair of finetune runs {index.where} ({'; '.join(notes)}); {HINT}")
    return pd.DataFrame(rows), used, notes


def plot(frame: pd.DataFrame) -> Any:
    """Grouped bars of the relative error change per locale: one panel per Stage-2 run, one bar per
    (task, encoder, setting)."""
    import numpy as np

    plt = pyplot()
    groups = list(frame.groupby("stage2_run_id", sort=False))
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 1.1 * frame["locale"].nunique() + 3), 3.8 * len(groups)),
                             squeeze=False)
    for ax, (_, sub) in zip(axes[:, 0], groups):
        locales = list(dict.fromkeys(sub["locale"]))
        series = [(task, key) for task, _ in TASKS for key in dict.fromkeys(zip(sub["encoder"], sub["setting"]))]
        width = 0.8 / len(series)
        for i, (task, (encoder, setting)) in enumerate(series):
            part = sub[(sub["encoder"] == encoder) & (sub["setting"] == setting)].set_index("locale")
            values = [100 * part[f"{task}_rel_error_change"].get(loc, np.nan) for loc in locales]
            ax.bar(np.arange(len(locales)) + (i - (len(series) - 1) / 2) * width, values, width,
                   label=f"{task} error, {encoder} encoder, {setting}")
        change_bar_axes(ax, locales, "relative error change (%)\n(Stage 2 vs Stage 1)", f"{sub['stage2_run'].iloc[0]} ({sub['stage2_run_id'].iloc[0][:8]})")
    fig.tight_layout()
    return fig


def _run(args: argparse.Namespace) -> int:
    index = RunIndex.open(args)
    stage2_runs = index.select(args.run_ids, [STAGE2]) if args.run_ids else index.of_stage(STAGE2)
    if not stage2_runs:
        raise AtmError(f"no finished {STAGE2} runs {index.where}; train one with "
                       "`python -m atm.train stage=pretrain_stage2 ...`, then " + HINT)
    frame, used, notes = effect_frame(index, stage2_runs)
    for note in notes:
        print(f"warning: skipped {note}", file=sys.stderr)
    for note in sorted(set(frame.loc[frame["locale"] == "avg", "interval_note"]) - {""}):
        print(f"warning: {note}", file=sys.stderr)
    shown = frame.copy()
    for task, _ in TASKS:
        shown[f"{task}_95ci"] = [ex.format_interval(lo, hi) for lo, hi in
                                 zip(shown[f"{task}_rel_error_change_lo"], shown[f"{task}_rel_error_change_hi"])]
    avg = shown[shown["locale"] == "avg"]
    header = ("Stage-2 vs Stage-1 teacher on MASSIVE: relative error-rate change (err_stage2 - err_stage1) / "
              "err_stage1, negative = Stage 2 better, with 95% paired-bootstrap intervals over test utterances "
              f"(and seeds); {index.where}")
    markdown = f"{header}\n\nAverage over the evaluated locales:\n\n{format_markdown_table(avg[TABLE_COLUMNS], FORMATS)}\n"
    if frame["locale"].nunique() > 2:  # more than avg and one locale
        per_locale = shown[shown["locale"] != "avg"]
        markdown += f"\nPer locale:\n\n{format_markdown_table(per_locale[TABLE_COLUMNS], FORMATS)}\n"
    metrics = {}
    for _, row in frame.iterrows():  # runs are oldest first: the newest Stage-2 run's values win
        for task, _ in TASKS:
            column = f"{task}_rel_error_change"
            metrics.update(interval_metrics(f"stage2/{row['setting']}/{row['encoder']}/{row['locale']}/{column}",
                                            row, column))
    publish(args, index, ANALYSIS_NAME, markdown,
               {"stage2_effect.md": markdown, "stage2_effect.csv": frame, "stage2_effect.png": plot(frame)},
               consumed_run_ids=used, metrics=metrics,
               params={"n_stage2_runs": frame["stage2_run_id"].nunique(), "n_pairs": len(avg)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
