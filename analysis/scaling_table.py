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

Outputs under ``--out`` (default ``analysis/out/scaling_table/``): ``scaling.md`` (also printed),
``scaling.csv`` (full precision, with the run ids), ``scaling.png`` (each metric against size), all
logged to a new MLflow run tagged ``atm.stage=analysis``, ``atm.analysis=scaling_table``.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in {str(Path(p).resolve()) for p in sys.path if p}:
    sys.path.insert(0, str(_REPO_ROOT))  # `python analysis/scaling_table.py` without installing

from analysis import _mlflow_frames as mf
from atm.errors import AtmError

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
MASSIVE = tuple(f"massive_{s}" for s in mf.MASSIVE_SCORES)
TABLE_COLUMNS = ["run", "stage", "model", "non_embedding_params", *(c for c, _ in INTRINSIC), *MASSIVE]
FORMATS = {c: ".3f" for c, _ in INTRINSIC[:2]} | {c: ".4f" for c, _ in INTRINSIC[2:]} | {c: ".4f" for c in MASSIVE}


def build_parser() -> argparse.ArgumentParser:
    parser = mf.analysis_parser(
        ANALYSIS_NAME,
        "Model size against perplexity, mask-filling accuracy, XNLI and MASSIVE scores, one row per "
        "MLM encoder.",
        "MLM training run id(s) (stages " + ", ".join(mf.MLM_STAGES) + "); default: every finished "
        "one in the experiment that is not a sweep trial",
    )
    parser.add_argument("--stage", dest="stages", action="extend", nargs="+", metavar="STAGE",
                        choices=mf.MLM_STAGES, help="keep only encoders of these stages")
    parser.add_argument("--include-trials", action="store_true",
                        help="also list the encoders trained by sweep trials")
    parser.add_argument("--setting", default="full", help="finetune.setting of the MASSIVE columns "
                        "(full | zero_shot; default: full)")
    parser.add_argument("--frozen-encoder", action="store_true",
                        help="MASSIVE columns from fine-tuning over a frozen encoder (default: full fine-tuning)")
    return parser


def select_encoders(index: mf.RunIndex, args: argparse.Namespace) -> list[Run]:
    """The encoders to tabulate (see the module docstring). Raises AtmError when there are none."""
    if args.run_ids:
        runs = index.select(args.run_ids, mf.MLM_STAGES)
    else:
        runs = [r for r in index.of_stage(*mf.MLM_STAGES) if args.include_trials or not mf.is_sweep_trial(r)]
    if args.stages:
        runs = [r for r in runs if r.data.tags.get(mf.TAG_STAGE) in args.stages]
    if not runs:
        stages = ", ".join(args.stages or mf.MLM_STAGES)
        raise AtmError(f"no finished MLM training runs of stages {stages} {index.where}; train one with "
                       "`python -m atm.train stage=pretrain_stage1 ...` first")
    return runs


def encoder_row(index: mf.RunIndex, run: Run, variant: tuple[str, bool]) -> tuple[dict[str, Any], list[str]]:
    """The table row of one encoder and the ids of the runs it was read from."""
    tags, params = run.data.tags, run.data.params
    non_emb, total, size_source = mf.model_size(run)
    row: dict[str, Any] = {
        "run": run.info.run_name or run.info.run_id[:8],
        "stage": tags.get(mf.TAG_STAGE, ""),
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
    finetunes = mf.finetunes_of(index, run.info.run_id).get(variant, [])
    scores = mf.massive_scores(finetunes[0]) if finetunes else {}
    row["finetune_run_id"] = finetunes[0].info.run_id if finetunes else ""
    used += [finetunes[0].info.run_id] if finetunes else []
    row.update({f"massive_{s}": scores.get(("avg", s), math.nan) for s in mf.MASSIVE_SCORES})
    return row, used


def scaling_frame(index: mf.RunIndex, runs: Sequence[Run], variant: tuple[str, bool]) -> tuple[pd.DataFrame, list[str]]:
    """One row per encoder, sorted by non-embedding size (then stage order); the consumed run ids."""
    import pandas as pd

    rows, used = [], []
    for run in runs:
        row, ids = encoder_row(index, run, variant)
        rows.append(row)
        used += ids
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["stage"].map({s: i for i, s in enumerate(mf.MLM_STAGES)})
    frame = frame.sort_values(["non_embedding_params", "_order"], na_position="last", kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True), used


def plot(frame: pd.DataFrame) -> Any:
    """One panel per metric that has a value, against non-embedding parameters (log scale)."""
    plt = mf.pyplot()
    columns = [c for c in TABLE_COLUMNS[4:] if frame[c].notna().any()]
    n = max(len(columns), 1)
    ncols = min(n, 4)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    markers = dict(zip(mf.MLM_STAGES, "osD^"))
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
    index = mf.RunIndex.open(args)
    runs = select_encoders(index, args)
    variant = (args.setting, bool(args.frozen_encoder))
    frame, used = scaling_frame(index, runs, variant)
    shown = frame[TABLE_COLUMNS].copy()
    shown["non_embedding_params"] = [mf.human_count(v) for v in shown["non_embedding_params"]]
    header = (f"Scaling: {len(frame)} MLM encoder(s) {index.where}; MASSIVE = eval/massive/avg of the newest "
              f"finetune run with setting={variant[0]}, {mf.encoder_label(variant[1])} encoder")
    markdown = f"{header}\n\n{mf.format_markdown_table(shown, FORMATS)}\n"
    no_size = frame[frame["size_source"] == ""]["run"].tolist()
    if no_size:
        print(f"warning: no size for {len(no_size)} run(s) (no cost/non_embedding_parameters metric nor "
              f"model.* params): {', '.join(no_size)}", file=sys.stderr)
    mf.publish(args, index, ANALYSIS_NAME, markdown,
               {"scaling.md": markdown, "scaling.csv": frame, "scaling.png": plot(frame)},
               consumed_run_ids=used,
               params={"n_encoders": len(frame), "finetune_setting": variant[0],
                       "frozen_encoder": variant[1], "selection": "run_ids" if args.run_ids else "search"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return mf.cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
