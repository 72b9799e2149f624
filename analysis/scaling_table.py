"""Model size -> perplexity, mask filling, XNLI and MASSIVE scores (ATM, FitzGerald et al. 2022).

One row per MLM encoder (a finished ``pretrain_stage1``, ``pretrain_stage2``, ``distill_intermediate``
or ``distill_final`` run; sweep trials only with ``--include-trials``), sorted by size:

* size: non-embedding parameters (the paper's convention) and all parameters, from the run's
  metrics ``cost/non_embedding_parameters`` / ``cost/parameters``, else the non-embedding count
  computed from its ``model.*`` params (:func:`atm.models.encoder.count_parameters`);
* intrinsic, from the newest evaluate run of the encoder at its last checkpoint:
  ``eval/perplexity/{written,spoken}``, ``eval/mask_fill/noun_accuracy``,
  ``eval/mask_fill/spoken/slot_accuracy``, ``eval/xnli/avg_accuracy`` (without an evaluate run,
  the perplexities the training run logged itself);
* MASSIVE, from the newest finetune run over the encoder of the chosen variant (``--setting``,
  ``--frozen-encoder``): ``eval/massive/avg/{intent_accuracy,slot_f1,exact_match}``.

Then, per pretraining stage with teachers of at least two sizes, the **largest minus the smallest teacher**
(newest run of each size) with 95% intervals (:func:`extremes_rows`):

* perplexity (written, spoken): the relative change of the geometric mean over languages,
  ``exp(mean_l log(ppl_large,l / ppl_small,l)) - 1``, Student-t interval over the languages' log ratios
  (:func:`atm.stats.seed_interval`), mapped back by ``exp(x) - 1`` (negative = the larger teacher is better);
* mask filling (noun, slot) and XNLI accuracy at the last checkpoint: paired bootstrap over the probe items
  of the newest evaluate runs' ``evaluation/examples/step-<N>.csv`` (pooled over languages);
* MASSIVE intent accuracy, slot F1, exact match: paired bootstrap over the test utterances of same-recipe
  finetune runs of the chosen variant (``predictions/<locale>.jsonl``, pooled over locales; :mod:`analysis._examples`).

Outputs under ``--out`` (default ``analysis/out/scaling_table/``): ``scaling.md`` (also printed),
``scaling.csv`` (full precision, with the run ids), ``scaling_difference.csv`` (largest minus smallest teacher),
``scaling.png`` (each metric against size), all logged to a new MLflow run tagged ``atm.stage=analysis``,
``atm.analysis=scaling_table``.

Usage::

    python analysis/scaling_table.py
    python analysis/scaling_table.py --stage pretrain_stage1 pretrain_stage2 --frozen-encoder
    python analysis/scaling_table.py --run-id <training run id> <training run id> --no-log
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis import _examples as ex
from analysis._output import format_markdown_table, human_count, publish, pyplot
from analysis._runs import MASSIVE_SCORES, encoder_label, finetunes_of, massive_scores, matching_finetune, model_size
from analysis._store import RunIndex, analysis_parser, cli, is_sweep_trial
from atm.errors import AtmError
from atm.stages import stages_of_kind
from atm.tracking import TAG_STAGE

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow.entities import Run

ANALYSIS_NAME = "scaling_table"
#: (column, evaluate-run metric key) of the intrinsic probes.
INTRINSIC = (
    ("perplexity_written", "eval/perplexity/written"),
    ("perplexity_spoken", "eval/perplexity/spoken"),
    ("mask_fill_noun_accuracy", "eval/mask_fill/noun_accuracy"),
    ("mask_fill_slot_accuracy", "eval/mask_fill/spoken/slot_accuracy"),
    ("xnli_accuracy", "eval/xnli/avg_accuracy"),
)
#: Probes a training run logs itself at its end (used when it has no evaluate run).
OWN_METRICS = ("perplexity_written", "perplexity_spoken")
MASSIVE = tuple(f"massive_{s}" for s in MASSIVE_SCORES)
TABLE_COLUMNS = ["run", "stage", "model", "non_embedding_params", *(c for c, _ in INTRINSIC), *MASSIVE]
FORMATS = {c: ".3f" for c, _ in INTRINSIC[:2]} | {c: ".4f" for c, _ in INTRINSIC[2:]} | {c: ".4f" for c in MASSIVE}
#: Stages whose runs are teachers, compared largest vs smallest.
TEACHER_STAGES = ("pretrain_stage1", "pretrain_stage2")
#: (quantity, evaluate-run probe of evaluation/examples) of the per-item probes.
PROBES = (("mask_fill_noun_accuracy", "noun"), ("mask_fill_slot_accuracy", "slot"), ("xnli_accuracy", "xnli"))
PERPLEXITY_DOMAINS = ("written", "spoken")
DIFFERENCE_COLUMNS = ["stage", "small_run", "large_run", "quantity", "small", "large", "difference", "ci_low",
                      "ci_high", "n", "unit"]


def build_parser() -> argparse.ArgumentParser:
    mlm_stages = stages_of_kind("mlm")
    parser = analysis_parser(
        ANALYSIS_NAME,
        "Model size against perplexity, mask-filling accuracy, XNLI and MASSIVE scores, one row per "
        "MLM encoder.",
        "MLM training run id(s) (stages " + ", ".join(mlm_stages) + "); default: every finished "
        "one in the experiment that is not a sweep trial",
    )
    parser.add_argument("--stage", dest="stages", action="extend", nargs="+", metavar="STAGE",
                        choices=mlm_stages, help="keep only encoders of these stages")
    parser.add_argument("--include-trials", action="store_true",
                        help="also list the encoders trained by sweep trials")
    parser.add_argument("--setting", default="full", help="finetune.setting of the MASSIVE columns "
                        "(full | zero_shot; default: full)")
    parser.add_argument("--frozen-encoder", action="store_true",
                        help="MASSIVE columns from fine-tuning over a frozen encoder (default: full fine-tuning)")
    return parser


def select_encoders(index: RunIndex, args: argparse.Namespace) -> list[Run]:
    """The encoders to tabulate (see the module docstring). Raises AtmError when there are none."""
    mlm_stages = stages_of_kind("mlm")
    if args.run_ids:
        runs = index.select(args.run_ids, mlm_stages)
    else:
        runs = [r for r in index.of_stage(*mlm_stages) if args.include_trials or not is_sweep_trial(r)]
    if args.stages:
        runs = [r for r in runs if r.data.tags.get(TAG_STAGE) in args.stages]
    if not runs:
        stages = ", ".join(args.stages or mlm_stages)
        raise AtmError(f"no finished MLM training runs of stages {stages} {index.where}; train one with "
                       "`python -m atm.train stage=pretrain_stage1 ...` first")
    return runs


def encoder_row(index: RunIndex, run: Run, variant: tuple[str, bool]) -> tuple[dict[str, Any], list[str]]:
    """The table row of one encoder and the ids of the runs it was read from."""
    tags, params = run.data.tags, run.data.params
    non_emb, total, size_source = model_size(run)
    row: dict[str, Any] = {
        "run": run.info.run_name or run.info.run_id[:8],
        "stage": tags.get(TAG_STAGE, ""),
        "model": params.get("model.name", ""),
        "non_embedding_params": non_emb,
        "parameters": total,
        "size_source": size_source,
        "run_id": run.info.run_id,
    }
    used = [run.info.run_id]
    evaluations = index.evaluations(run.info.run_id)
    if evaluations:
        metrics = evaluations[-1].data.metrics  # MLflow's latest value = the last checkpoint's
        row["intrinsic_source"] = evaluations[-1].info.run_id
        used.append(evaluations[-1].info.run_id)
        row.update({col: float(metrics.get(key, math.nan)) for col, key in INTRINSIC})
    else:
        row["intrinsic_source"] = "training run" if any(k in run.data.metrics for _, k in INTRINSIC) else ""
        row.update({col: float(run.data.metrics.get(key, math.nan)) if col in OWN_METRICS else math.nan
                    for col, key in INTRINSIC})
    finetunes = finetunes_of(index, run.info.run_id).get(variant, [])
    scores = massive_scores(finetunes[0]) if finetunes else {}
    row["finetune_run_id"] = finetunes[0].info.run_id if finetunes else ""
    used += [finetunes[0].info.run_id] if finetunes else []
    row.update({f"massive_{s}": scores.get(("avg", s), math.nan) for s in MASSIVE_SCORES})
    return row, used


def scaling_frame(index: RunIndex, runs: Sequence[Run], variant: tuple[str, bool]) -> tuple[pd.DataFrame, list[str]]:
    """One row per encoder, sorted by non-embedding size (then stage order); the consumed run ids."""
    import pandas as pd

    rows, used = [], []
    for run in runs:
        row, ids = encoder_row(index, run, variant)
        rows.append(row)
        used += ids
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["stage"].map({s: i for i, s in enumerate(stages_of_kind("mlm"))})
    frame = frame.sort_values(["non_embedding_params", "_order"], na_position="last", kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True), used


# ---------------------------------------------------------------------------------------------
# largest minus smallest teacher


def teacher_extremes(runs: Sequence[Run], stage: str) -> tuple[Run, Run] | None:
    """``(smallest, largest)`` teacher of ``stage`` among ``runs`` by non-embedding size (the newest run of
    each size); None with fewer than two sizes."""
    by_size: dict[float, Run] = {}
    for run in runs:  # oldest first: the newest run of a size wins
        size = model_size(run)[0]
        if run.data.tags.get(TAG_STAGE) == stage and not math.isnan(size):
            by_size[size] = run
    if len(by_size) < 2:
        return None
    return by_size[min(by_size)], by_size[max(by_size)]


def matched_finetunes(index: RunIndex, small: Run, large: Run, variant: tuple[str, bool]) -> tuple[Run, Run] | None:
    """``(finetune over small, finetune over large)``: the newest finetune run of ``variant`` over ``large`` with a
    same-recipe one over ``small`` (:func:`analysis._runs.matching_finetune`), or None."""
    small_fts = finetunes_of(index, small.info.run_id).get(variant, [])
    for ft_large in finetunes_of(index, large.info.run_id).get(variant, []):  # newest first
        ft_small = matching_finetune(small_fts, ft_large)
        if ft_small is not None:
            return ft_small, ft_large
    return None


def perplexity_change(small_eval: Run, large_eval: Run, domains: Sequence[str]) -> tuple[Any, str]:
    """Relative change of the geometric-mean perplexity over languages, large vs small, and a note.

    Per language ``l`` of ``eval/perplexity/<domain>/<l>`` both evaluate runs logged (last checkpoint):
    ``d_l = log(ppl_large,l / ppl_small,l)``; the estimate is ``exp(mean d) - 1`` with the Student-t interval
    of ``mean d`` over languages (:func:`atm.stats.seed_interval`) mapped by ``exp(x) - 1``.

    Returns:
        ``(atm.stats.Interval or None, note)``: None with fewer than one common language.
    """
    import numpy as np

    from atm import stats

    logs = []
    for domain in domains:
        prefix = f"eval/perplexity/{domain}/"
        small, large = small_eval.data.metrics, large_eval.data.metrics
        for key in sorted(k for k in large if k.startswith(prefix) and "/" not in k[len(prefix):]):
            if key in small and small[key] > 0 and large[key] > 0:
                logs.append(math.log(large[key] / small[key]))
    if not logs:
        return None, f"no per-language perplexity ({', '.join(domains)}) logged by both evaluate runs"
    iv = stats.seed_interval(logs)
    change = stats.Interval(*(float(np.expm1(v)) for v in (iv.estimate, iv.lo, iv.hi)), iv.n)
    return change, "" if len(logs) > 1 else "one language: no interval"


def extremes_rows(index: RunIndex, artifacts: ex.Artifacts, small: Run, large: Run,
                  variant: tuple[str, bool]) -> tuple[list[dict[str, Any]], list[str]]:
    """Largest-minus-smallest rows (see the module docstring) and the run ids they read."""
    rows, used = [], []
    base = {"stage": large.data.tags.get(TAG_STAGE, ""),
            "small_run": small.info.run_name or small.info.run_id[:8],
            "large_run": large.info.run_name or large.info.run_id[:8],
            "small_params": model_size(small)[0], "large_params": model_size(large)[0],
            "small_run_id": small.info.run_id, "large_run_id": large.info.run_id}

    def add(quantity: str, small_value: float, large_value: float, interval: Any, unit: str, note: str,
            ids: Sequence[str]) -> None:
        rows.append({**base, "quantity": quantity, "small": small_value, "large": large_value,
                     "difference": interval.estimate if interval is not None else math.nan,
                     "ci_low": interval.lo if interval is not None else math.nan,
                     "ci_high": interval.hi if interval is not None else math.nan,
                     "n": interval.n if interval is not None else 0, "unit": unit, "note": note,
                     "run_ids": ",".join(ids)})
        used.extend(ids)

    evals = index.evaluations(small.info.run_id), index.evaluations(large.info.run_id)
    if evals[0] and evals[1]:
        e_small, e_large = evals[0][-1], evals[1][-1]
        ids = [e_small.info.run_id, e_large.info.run_id]
        for domain in PERPLEXITY_DOMAINS:
            key = f"eval/perplexity/{domain}"
            change, note = perplexity_change(e_small, e_large, [domain])
            add(f"perplexity_{domain}", e_small.data.metrics.get(key, math.nan),
                e_large.data.metrics.get(key, math.nan), change, "languages (relative change)", note, ids)
        steps = ex.example_steps(artifacts, e_small), ex.example_steps(artifacts, e_large)
        for quantity, probe in PROBES:
            key = dict(INTRINSIC)[quantity]
            frames = [ex.probe_examples(artifacts, run, s[-1], probe) if s else None
                      for run, s in zip((e_small, e_large), steps)]
            comparison = None if any(f is None for f in frames) else ex.compare(frames[1], frames[0], ["accuracy"])
            note = "" if comparison else "no evaluation/examples of this probe in both evaluate runs"
            add(quantity, e_small.data.metrics.get(key, math.nan), e_large.data.metrics.get(key, math.nan),
                comparison.difference["accuracy"] if comparison else None, "probe items", note, ids)
    pair = matched_finetunes(index, small, large, variant)
    if pair is not None:
        ft_small, ft_large = pair
        comparisons, note = ex.compare_finetunes(artifacts, ft_large, ft_small, MASSIVE_SCORES)
        s_small, s_large = massive_scores(ft_small), massive_scores(ft_large)
        for score in MASSIVE_SCORES:
            add(f"massive_{score}", s_small.get(("avg", score), math.nan), s_large.get(("avg", score), math.nan),
                comparisons["avg"].difference[score] if comparisons else None, "test utterances", note,
                [ft_small.info.run_id, ft_large.info.run_id])
    return rows, used


def difference_frame(index: RunIndex, runs: Sequence[Run], variant: tuple[str, bool]
                     ) -> tuple[pd.DataFrame, list[str]]:
    """:func:`extremes_rows` of every teacher stage with two sizes among ``runs``."""
    import pandas as pd

    rows, used = [], []
    artifacts = ex.Artifacts(index.client)
    for stage in TEACHER_STAGES:
        pair = teacher_extremes(runs, stage)
        if pair is not None:
            more, ids = extremes_rows(index, artifacts, *pair, variant)
            rows += more
            used += ids
    return pd.DataFrame(rows, columns=[*DIFFERENCE_COLUMNS, "note", "small_params", "large_params",
                                       "small_run_id", "large_run_id", "run_ids"]), used


def plot(frame: pd.DataFrame) -> Any:
    """One panel per metric that has a value, against non-embedding parameters (log scale)."""
    plt = pyplot()
    columns = [c for c in TABLE_COLUMNS[4:] if frame[c].notna().any()]
    n = max(len(columns), 1)
    ncols = min(n, 4)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    markers = dict(zip(stages_of_kind("mlm"), "osD^"))
    for ax, column in zip(axes.flat, columns):
        for stage, sub in frame.groupby("stage", sort=False):
            sub = sub[["non_embedding_params", column]].dropna()
            ax.scatter(sub["non_embedding_params"], sub[column], marker=markers.get(stage, "o"), label=stage)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(column, fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    if not columns:
        axes.flat[0].text(0.5, 0.5, "no metric logged yet", ha="center", va="center")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return fig


def _run(args: argparse.Namespace) -> int:
    index = RunIndex.open(args)
    runs = select_encoders(index, args)
    variant = (args.setting, bool(args.frozen_encoder))
    frame, used = scaling_frame(index, runs, variant)
    shown = frame[TABLE_COLUMNS].copy()
    shown["non_embedding_params"] = [human_count(v) for v in shown["non_embedding_params"]]
    header = (f"Scaling: {len(frame)} MLM encoder(s) {index.where}; MASSIVE = eval/massive/avg of the newest "
              f"finetune run with setting={variant[0]}, {encoder_label(variant[1])} encoder")
    markdown = f"{header}\n\n{format_markdown_table(shown, FORMATS)}\n"
    differences, more = difference_frame(index, runs, variant)
    used += more
    if len(differences):
        markdown += ("\nLargest minus smallest teacher, 95% intervals (perplexity: relative change of the geometric "
                     "mean over languages, t over languages; probes and MASSIVE: paired bootstrap over items):\n\n"
                     + format_markdown_table(differences[DIFFERENCE_COLUMNS],
                                                {c: ".4g" for c in DIFFERENCE_COLUMNS[4:9]}) + "\n")
    no_size = frame[frame["size_source"] == ""]["run"].tolist()
    if no_size:
        print(f"warning: no size for {len(no_size)} run(s) (no cost/non_embedding_parameters metric nor "
              f"model.* params): {', '.join(no_size)}", file=sys.stderr)
    metrics = {}
    for _, row in differences.iterrows():
        key = f"scaling/{row['stage']}/largest_minus_smallest/{row['quantity']}"
        metrics.update({key: row["difference"], f"{key}_lo": row["ci_low"], f"{key}_hi": row["ci_high"]})
    publish(args, index, ANALYSIS_NAME, markdown,
               {"scaling.md": markdown, "scaling.csv": frame, "scaling_difference.csv": differences,
                "scaling.png": plot(frame)},
               consumed_run_ids=used, metrics=metrics,
               params={"n_encoders": len(frame), "finetune_setting": variant[0],
                       "frozen_encoder": variant[1], "selection": "run_ids" if args.run_ids else "search"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
