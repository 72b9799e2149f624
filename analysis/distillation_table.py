"""Distilled students versus their teachers and versus same-size models pretrained from scratch (ATM,
FitzGerald et al. 2022), on MASSIVE exact match.

A *student* is a finished ``distill_intermediate`` or ``distill_final`` run with at least one finetune
run over it.  For each of its finetune runs (newest per variant and recipe) two baselines are looked up,
each through a finetune run of the same variant (``finetune.setting``, full or frozen encoder) and the
same recipe (``finetune.*``, ``trainer.*``, ``seed`` params):

* ``teacher``: the model it was distilled from: its ``atm.input.teacher_next`` run when it has one
  (the AlexaTM intermediate student ends on the Stage-2 teacher), else its ``atm.input.teacher``;
* ``scratch``: the newest ``pretrain_stage2``, else ``pretrain_stage1`` run (not a sweep trial) with
  the student's architecture (``model.hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``intermediate_size``): the same model pretrained directly with MLM.

For every evaluated locale and their average it reports both exact-match accuracies and the relative
exact-match error change ``(err_student - err_base) / err_base`` with err = 1 - exact match
(:func:`atm.metrics.relative_error_change`; negative = the student makes fewer errors), with the 95% interval
of that change and of the exact-match difference by a paired bootstrap over the test utterances both
finetune runs predicted (``predictions/<locale>.jsonl``, seeds resampled too; :mod:`analysis._examples`); the
``avg`` row pools the locales (utterances resampled within each locale, per-locale scores averaged).

Outputs under ``--out`` (default ``analysis/out/distillation_table/``): ``distillation.md`` (also
printed: locale averages), ``distillation.csv`` (every locale, run ids, standard errors),
``distillation.png`` (bars), logged to a new MLflow run (``atm.analysis=distillation_table``).

Usage::

    python analysis/distillation_table.py
    python analysis/distillation_table.py --run-id <distill_final run id> --no-log
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis import _examples as ex
from analysis._output import change_bar_axes, format_markdown_table, human_count, interval_metrics, publish, pyplot
from analysis._runs import (encoder_label, error_change, finetune_recipe, finetune_variant, finetunes_of,
                            massive_scores, matching_finetune, model_size)
from analysis._store import RunIndex, analysis_parser, cli, is_sweep_trial
from atm.errors import AtmError
from atm.tracking import TAG_STAGE

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow.entities import Run

ANALYSIS_NAME = "distillation_table"
STUDENT_STAGES = ("distill_intermediate", "distill_final")
#: Stages of models pretrained from scratch, preferred first.
SCRATCH_STAGES = ("pretrain_stage2", "pretrain_stage1")
ARCHITECTURE = ("model.hidden_size", "model.num_hidden_layers", "model.num_attention_heads",
                "model.intermediate_size")
TABLE_COLUMNS = ["student", "stage", "non_embedding_params", "setting", "encoder", "baseline", "baseline_run",
                 "em_student", "em_baseline", "em_rel_error_change", "em_95ci"]
FORMATS = {"em_student": ".4f", "em_baseline": ".4f", "em_rel_error_change": "+.2%"}
HINT = ("fine-tune the student, its teacher and a same-size model pretrained from scratch with the same recipe, "
        "e.g. `python -m atm.train stage=finetune encoder=final`, `encoder=intermediate`, and "
        "`stage=pretrain_stage1 model=<student preset>` then `stage=finetune encoder=runs:/<its run id>`")


def build_parser() -> argparse.ArgumentParser:
    return analysis_parser(
        ANALYSIS_NAME,
        "Exact-match relative error change of distilled students against their teachers and against "
        "same-size models pretrained from scratch, on MASSIVE.",
        "student (distill_intermediate / distill_final) run id(s); default: every finished one in the "
        "experiment with a finetune run over it",
    )


def architecture(run: Run) -> tuple[str | None, ...]:
    return tuple(run.data.params.get(key) for key in ARCHITECTURE)


def teacher_of(index: RunIndex, student: Run) -> Run | None:
    return index.input(student, "teacher_next") or index.input(student, "teacher")


def scratch_models(index: RunIndex, student: Run) -> list[Run]:
    """Pretrained-from-scratch runs with the student's architecture, preferred first."""
    arch = architecture(student)
    if None in arch:
        return []
    runs = [r for r in index.of_stage(*SCRATCH_STAGES) if not is_sweep_trial(r) and architecture(r) == arch]
    order = {s: i for i, s in enumerate(SCRATCH_STAGES)}
    return sorted(runs, key=lambda r: (order[r.data.tags[TAG_STAGE]], -r.info.start_time))


def baseline_finetune(index: RunIndex, candidates: Sequence[Run], variant: tuple[str, bool],
                      ft: Run) -> tuple[Run | None, Run | None]:
    """``(baseline, its finetune run)``: the first of ``candidates`` with a finetune run of ``variant`` and the
    recipe of ``ft`` (:func:`analysis._runs.matching_finetune`), else ``(None, None)``."""
    for candidate in candidates:
        base_ft = matching_finetune(finetunes_of(index, candidate.info.run_id).get(variant, []), ft)
        if base_ft is not None:
            return candidate, base_ft
    return None, None


def comparison_rows(student: Run, ft: Run, kind: str, base: Run | None, base_ft: Run | None,
                    note: str, artifacts: ex.Artifacts | None = None) -> list[dict[str, Any]]:
    """Rows (one per locale of the student's finetune run, ``avg`` first) against one baseline, with
    paired-bootstrap intervals when ``artifacts`` is given and both finetune runs logged predictions."""
    scores = massive_scores(ft)
    comparisons, interval_note = ({}, "") if base_ft is None or artifacts is None else ex.compare_finetunes(
        artifacts, ft, base_ft, ["exact_match"], per_locale=True)
    base_scores = massive_scores(base_ft) if base_ft is not None else {}
    setting, frozen = finetune_variant(ft)
    locales = sorted({loc for loc, _ in scores}, key=lambda loc: (loc != "avg", loc))
    rows = []
    for locale in locales:
        em = scores.get((locale, "exact_match"), math.nan)
        em_base = base_scores.get((locale, "exact_match"), math.nan)
        rows.append({
            "student": student.info.run_name or student.info.run_id[:8],
            "stage": student.data.tags.get(TAG_STAGE, ""),
            "non_embedding_params": model_size(student)[0],
            "setting": setting, "encoder": encoder_label(frozen), "locale": locale,
            "baseline": kind,
            "baseline_run": (base.info.run_name or base.info.run_id[:8]) if base is not None else "",
            "baseline_stage": base.data.tags.get(TAG_STAGE, "") if base is not None else "",
            "em_student": em, "em_baseline": em_base,
            "em_rel_error_change": error_change(em, em_base),
            "em_se_student": scores.get((locale, "exact_match_se"), math.nan),
            "em_se_baseline": base_scores.get((locale, "exact_match_se"), math.nan),
            **ex.interval_columns(comparisons.get(locale), "exact_match", "em"),
            "n_examples": comparisons[locale].n if locale in comparisons else 0,
            "interval_note": "" if locale in comparisons or base_ft is None else (
                interval_note or f"no interval: no predictions of both runs in {locale}"),
            "student_run_id": student.info.run_id, "student_finetune_run_id": ft.info.run_id,
            "baseline_run_id": base.info.run_id if base is not None else "",
            "baseline_finetune_run_id": base_ft.info.run_id if base_ft is not None else "",
            "note": note,
        })
    return rows


def distillation_frame(index: RunIndex, students: Sequence[Run]) -> tuple[pd.DataFrame, list[str]]:
    """Every comparison row and the consumed run ids.

    Raises:
        AtmError: none of ``students`` has a finetune run.
    """
    import pandas as pd

    rows, used = [], []
    artifacts = ex.Artifacts(index.client)
    for student in students:
        finetunes = finetunes_of(index, student.info.run_id)
        teacher = teacher_of(index, student)
        scratch = scratch_models(index, student)
        for variant, runs in finetunes.items():
            seen = set()
            for ft in runs:  # newest first, one per recipe
                if finetune_recipe(ft) in seen:
                    continue
                seen.add(finetune_recipe(ft))
                used += [student.info.run_id, ft.info.run_id]
                candidates = [("teacher", [teacher] if teacher is not None else [], "no teacher run"),
                              ("scratch", scratch, "no from-scratch run of this architecture")]
                for kind, bases, missing in candidates:
                    base, base_ft = baseline_finetune(index, bases, variant, ft)
                    note = "" if base_ft is not None else (
                        f"{missing}" if not bases else "no finetune run of the same variant and recipe")
                    if base_ft is not None:
                        used += [base.info.run_id, base_ft.info.run_id]
                    rows += comparison_rows(student, ft, kind, base, base_ft, note, artifacts)
    if not rows:
        raise AtmError(f"no finished finetune run over any of {len(students)} student run(s) {index.where}; {HINT}")
    return pd.DataFrame(rows), used


def plot(frame: pd.DataFrame) -> Any:
    """Bars of the locale-average exact-match error change per student, against each baseline."""
    import numpy as np

    plt = pyplot()
    avg = frame[frame["locale"] == "avg"]
    labels = list(dict.fromkeys(zip(avg["student"], avg["setting"], avg["encoder"])))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 4.2))
    for i, kind in enumerate(("teacher", "scratch")):
        part = avg[avg["baseline"] == kind].set_index(["student", "setting", "encoder"])["em_rel_error_change"]
        values = [100 * part.get(label, np.nan) for label in labels]
        ax.bar(np.arange(len(labels)) + (i - 0.5) * 0.4, values, 0.4, label=f"vs {kind}")
    change_bar_axes(ax, [f"{s}\n{st}, {e}" for s, st, e in labels], "exact-match error change (%)",
                       "students: relative exact-match error change (negative = student better)", fontsize=7)
    fig.tight_layout()
    return fig


def _run(args: argparse.Namespace) -> int:
    index = RunIndex.open(args)
    if args.run_ids:
        students = index.select(args.run_ids, STUDENT_STAGES)
    else:
        students = [r for r in index.of_stage(*STUDENT_STAGES) if finetunes_of(index, r.info.run_id)]
        if not students:
            raise AtmError(f"no finished distill_intermediate / distill_final run with a finetune run over it "
                           f"{index.where}; {HINT}")
    frame, used = distillation_frame(index, students)
    for _, row in frame[(frame["locale"] == "avg") & (frame["note"] != "")].iterrows():
        print(f"warning: {row['student']} ({row['setting']}, {row['encoder']} encoder) vs {row['baseline']}: "
              f"{row['note']}; left as nan", file=sys.stderr)
    avg = frame[frame["locale"] == "avg"].copy()
    for note in sorted(set(avg["interval_note"]) - {""}):
        print(f"warning: {note}", file=sys.stderr)
    avg["non_embedding_params"] = [human_count(v) for v in avg["non_embedding_params"]]
    avg["em_95ci"] = [ex.format_interval(lo, hi) for lo, hi in
                      zip(avg["em_rel_error_change_lo"], avg["em_rel_error_change_hi"])]
    header = ("Distilled students vs teachers and vs same-size models pretrained from scratch: MASSIVE exact "
              "match (average over the evaluated locales) and the relative exact-match error change "
              "(err_student - err_baseline) / err_baseline, negative = student better, with 95% paired-bootstrap "
              f"intervals over test utterances (and seeds); {index.where}")
    markdown = f"{header}\n\n{format_markdown_table(avg[TABLE_COLUMNS], FORMATS)}\n"
    metrics = {}
    for _, row in frame[frame["locale"] == "avg"].iterrows():  # oldest first: newer students overwrite
        metrics.update(interval_metrics(
            f"distill/{row['stage']}/{row['setting']}/{row['encoder']}/vs_{row['baseline']}/em_rel_error_change",
            row, "em_rel_error_change"))
    publish(args, index, ANALYSIS_NAME, markdown,
               {"distillation.md": markdown, "distillation.csv": frame, "distillation.png": plot(frame)},
               consumed_run_ids=used, metrics=metrics,
               params={"n_students": frame["student_run_id"].nunique()})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
