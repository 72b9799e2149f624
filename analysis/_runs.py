"""What the runs of atm mean to the ``analysis/*.py`` scripts: metric histories as frames, params as values,
fine-tuning variants and recipes, MASSIVE scores, error-rate changes and model sizes.

Runs come from :class:`analysis._store.RunIndex`; tables and files go out through :mod:`analysis._output`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from analysis._store import TAG_EVALUATED_RUN_ID, TAG_EVALUATED_STAGE
from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from analysis._store import RunIndex

#: Tags of a finetune run (atm.stages.finetune.TAG_SETTING / TAG_FROZEN; that module imports torch).
TAG_FINETUNE_SETTING = "atm.finetune.setting"
TAG_FINETUNE_FROZEN = "atm.finetune.freeze_encoder"
STAGE_FINETUNE = "finetune"
MASSIVE_SCORES = ("intent_accuracy", "slot_f1", "exact_match")
#: Params of a finetune run that say how it was trained, compared when two runs are matched; the
#: ``model.*`` params of a finetune run are the config default, not its encoder, so they are left out.
_RECIPE_PREFIXES = ("finetune.", "trainer.", "data.max_seq_len", "seed")
_RECIPE_IGNORED = ("trainer.device", "trainer.log_every")

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


# ---------------------------------------------------------------------------------------------
# run-level values


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
    """``"frozen"`` or ``"fine-tuned"`` (the encoder column of the tables)."""
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
