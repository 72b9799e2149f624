"""Per-example artifacts of finetune and evaluate runs, aligned by example, and paired-bootstrap intervals.

The analysis tables compare two systems on the same test examples (Stage 2 vs Stage 1, a student vs its teacher
or a same-size model trained without distillation, the largest vs the smallest teacher). Their point estimates
come from the runs' metrics; their 95% intervals come from the per-example records the runs log:

* a finetune run (``atm.stage=finetune``): ``predictions/<locale>.jsonl``, one row per (seed, test utterance)
  with ``seed, id, utt, intent, pred_intent, slots, pred_slots`` (gold and predicted BIO tags per word), scored
  per utterance by :func:`atm.metrics.massive_example_scores` (intent correct, exact match, slot tp/fp/fn);
* an evaluate run (``atm.stage=evaluate``): per checkpoint step ``N`` ``evaluation/examples/step-<N:06d>.csv``
  with ``probe, language, item, seed, correct, rank, pred`` (:mod:`atm.probes.examples`).

Both are read into one *long* frame (columns ``stratum`` = locale or language, ``id``, ``seed`` and the score
columns). :func:`align` keeps the examples both systems scored in every one of their seeds and stacks them into
arrays ``(seeds, examples, strata, components)``: example ``i`` is the same utterance id in every stratum
(MASSIVE's and XNLI's test sets are parallel across languages), so a resample of example indices resamples the
examples *within* each locale, and the statistic averages the per-locale scores (pooled over locales, the
``avg`` of the finetune runs' metrics). Where a stratum lacks some id, a validity component masks it out.

:func:`paired_intervals` then gives, through :func:`atm.stats.paired_bootstrap` (same example indices for both
systems, each system's seeds resampled independently), the interval of the difference ``score_a - score_b`` and
of the relative error change ``(err_a - err_b) / err_b`` (err = 1 - score; AlexaTM's measure). The relative
change is computed inside the statistic: the bootstrap runs on ``log err_a - log err_b`` and the percentile
interval is mapped back by ``exp(x) - 1``; percentile intervals respect monotone transformations (Efron &
Tibshirani 1993, sec. 13.6), so this *is* the percentile interval of the per-resample relative change. Both
calls draw the same resamples (same generator seed), so the two intervals exclude zero together.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atm import stats
from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

PREDICTIONS_DIR = "predictions"
EXAMPLES_DIR = "evaluation/examples"
#: Per-utterance columns of :func:`atm.metrics.massive_example_scores`, in its order.
MASSIVE_COLUMNS = ("intent_correct", "exact_match", "slot_tp", "slot_fp", "slot_fn")
#: MASSIVE score -> (statistic kind, the per-example columns it reads).
SCORE_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "intent_accuracy": ("mean", ("intent_correct",)),
    "slot_f1": ("f1", ("slot_tp", "slot_fp", "slot_fn")),
    "exact_match": ("mean", ("exact_match",)),
    "accuracy": ("mean", ("correct",)),  # a probe's top-1 accuracy (evaluation/examples)
}
KEYS = ("stratum", "id", "seed")


class Artifacts:
    """Reads (and memoises) the per-example artifacts of runs through one MLflow client.

    A missing artifact reads as ``None``, never an error: a run logged before the per-example contract simply
    has no interval.
    """

    def __init__(self, client: MlflowClient):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small file otherwise
        self.client = client
        self._frames: dict[tuple[str, str], pd.DataFrame | None] = {}

    def list(self, run_id: str, path: str) -> list[str]:
        """Artifact paths directly under ``path`` of run ``run_id`` (empty when there are none)."""
        from mlflow.exceptions import MlflowException

        try:
            return [f.path for f in self.client.list_artifacts(run_id, path) if not f.is_dir]
        except (MlflowException, OSError):  # an artifact location that is gone: no per-example records
            return []

    def text(self, run_id: str, path: str) -> str | None:
        """The text of artifact ``path`` of run ``run_id``, or None when it is not there."""
        if path not in self.list(run_id, str(Path(path).parent)):
            return None
        with tempfile.TemporaryDirectory(prefix="atm-artifact-") as tmp:
            local = self.client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8")

    def memo(self, run_id: str, path: str, parse: Callable[[str], pd.DataFrame]) -> pd.DataFrame | None:
        """``parse(text)`` of artifact ``path``, computed once per (run, path); None when it is absent."""
        key = (run_id, path)
        if key not in self._frames:
            text = self.text(run_id, path)
            self._frames[key] = None if text is None else parse(text)
        return self._frames[key]


# --------------------------------------------------------------------------------------------- readers


def prediction_locales(artifacts: Artifacts, run: Run) -> list[str]:
    """Locales whose ``predictions/<locale>.jsonl`` the finetune run logged, sorted."""
    names = [Path(p).name for p in artifacts.list(run.info.run_id, PREDICTIONS_DIR)]
    return sorted(n[: -len(".jsonl")] for n in names if n.endswith(".jsonl"))


def _run_seed(run: Run) -> int:
    text = run.data.params.get("seed", "0")
    try:
        return int(float(text))
    except ValueError:
        return 0


def massive_examples(artifacts: Artifacts, run: Run, locale: str) -> pd.DataFrame | None:
    """Per-utterance MASSIVE scores of a finetune run on one locale, or None without its predictions artifact.

    Returns:
        Long frame with columns ``stratum`` (= ``locale``), ``id``, ``seed`` and :data:`MASSIVE_COLUMNS`, one row
        per (seed, utterance); a row without ``seed`` (or ``null``: an older run) has the run's ``seed`` param.

    Raises:
        AtmError: a malformed line or a row without ``id``/``intent``/``pred_intent``/``slots``/``pred_slots``
            (naming the run and artifact).
    """
    path = f"{PREDICTIONS_DIR}/{locale}.jsonl"

    def parse(text: str) -> pd.DataFrame:
        import pandas as pd

        from atm import metrics

        where = f"run {run.info.run_id} artifact {path}"
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                seed = row.get("seed")
                rows.append((_run_seed(run) if seed is None else int(seed), str(row["id"]), row["intent"],
                             row["pred_intent"], list(row["slots"]), list(row["pred_slots"])))
            except (ValueError, KeyError, TypeError) as err:
                raise AtmError(f"{where} line {number}: not a prediction row ({type(err).__name__}: {err})") from None
        if not rows:
            return pd.DataFrame(columns=[*KEYS, *MASSIVE_COLUMNS])
        seeds, ids, gold, pred, gold_tags, pred_tags = zip(*rows)
        scores = metrics.massive_example_scores(list(pred), list(gold), list(pred_tags), list(gold_tags))
        frame = pd.DataFrame(np.asarray(scores), columns=list(MASSIVE_COLUMNS))
        frame.insert(0, "seed", np.asarray(seeds, dtype=np.int64))
        frame.insert(0, "id", list(ids))
        frame.insert(0, "stratum", locale)
        return frame

    return artifacts.memo(run.info.run_id, path, parse)


def massive_frame(artifacts: Artifacts, run: Run, locales: Sequence[str]) -> pd.DataFrame | None:
    """:func:`massive_examples` of several locales concatenated; None when one of them is missing."""
    import pandas as pd

    frames = [massive_examples(artifacts, run, loc) for loc in locales]
    if not frames or any(f is None for f in frames):
        return None
    return pd.concat(frames, ignore_index=True)


def example_steps(artifacts: Artifacts, run: Run) -> list[int]:
    """Checkpoint steps with an ``evaluation/examples/step-<N>.csv`` artifact, ascending."""
    steps = []
    for path in artifacts.list(run.info.run_id, EXAMPLES_DIR):
        name = Path(path).name
        if name.startswith("step-") and name.endswith(".csv") and name[5:-4].isdigit():
            steps.append(int(name[5:-4]))
    return sorted(steps)


def probe_examples(artifacts: Artifacts, run: Run, step: int, probe: str) -> pd.DataFrame | None:
    """Per-item top-1 correctness of one probe (``xnli``, ``noun``, ``slot``) at checkpoint ``step`` of an
    evaluate run: long frame ``stratum`` (= language), ``id`` (= item), ``seed``, ``correct``; None when the
    run has no examples artifact for that step.

    Raises:
        AtmError: the CSV lacks one of ``probe, language, item, seed, correct``.
    """
    path = f"{EXAMPLES_DIR}/step-{step:06d}.csv"

    def parse(text: str) -> pd.DataFrame:
        import io

        import pandas as pd

        frame = pd.read_csv(io.StringIO(text))
        missing = [c for c in ("probe", "language", "item", "seed", "correct") if c not in frame.columns]
        if missing:
            raise AtmError(f"run {run.info.run_id} artifact {path}: no column {missing[0]!r}")
        return frame

    frame = artifacts.memo(run.info.run_id, path, parse)
    if frame is None:
        return None
    sub = frame[frame["probe"] == probe]
    return sub.rename(columns={"language": "stratum", "item": "id"})[[*KEYS, "correct"]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Aligned:
    """Two systems' per-example scores on the examples both scored.

    Attributes:
        a, b: ``(seeds, examples, strata * components)`` float arrays (the layout :mod:`atm.stats` resamples),
            components per stratum: ``[valid]`` (only when ``masked``) then ``columns``.
        strata: locale/language of each stratum; ``columns``: the score columns.
        n_examples: examples per stratum; ``seeds_a``, ``seeds_b``: each system's seeds.
        masked: True when some stratum lacks some example id (component 0 of a stratum is then its validity).
    """

    a: np.ndarray
    b: np.ndarray
    strata: tuple[str, ...]
    columns: tuple[str, ...]
    n_examples: dict[str, int]
    seeds_a: tuple[int, ...]
    seeds_b: tuple[int, ...]
    masked: bool

    @property
    def n(self) -> int:
        """Examples (ids) on the resampled axis."""
        return int(self.a.shape[1])


def _complete(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of the (stratum, id) pairs scored in every seed of the frame (a duplicate row: the last wins)."""
    frame = frame.drop_duplicates(list(KEYS), keep="last")
    counts = frame.groupby(["stratum", "id"], sort=False)["seed"].transform("size")
    return frame[counts == frame["seed"].nunique()]


def align(frame_a: pd.DataFrame, frame_b: pd.DataFrame, columns: Sequence[str],
          strata: Sequence[str] | None = None) -> Aligned | None:
    """Align two long frames (:func:`massive_frame`, :func:`probe_examples`) by (stratum, id).

    Args:
        columns: score columns to stack (e.g. ``("slot_tp", "slot_fp", "slot_fn")``).
        strata: strata to keep (default: every stratum both frames have), in this order.

    Returns:
        :class:`Aligned`, or None when the two share no example.
    """
    a, b = _complete(frame_a), _complete(frame_b)
    keys_a = set(zip(a["stratum"], a["id"]))
    keys_b = set(zip(b["stratum"], b["id"]))
    common = keys_a & keys_b
    wanted = list(strata) if strata is not None else sorted({s for s, _ in common})
    common = {k for k in common if k[0] in set(wanted)}
    if not common:
        return None
    strata_t = tuple(s for s in wanted if any(k[0] == s for k in common))
    ids = sorted({i for _, i in common}, key=str)
    masked = len(common) < len(ids) * len(strata_t)
    id_pos = {i: n for n, i in enumerate(ids)}
    stratum_pos = {s: n for n, s in enumerate(strata_t)}
    width = len(columns) + int(masked)

    def dense(frame: pd.DataFrame) -> tuple[np.ndarray, tuple[int, ...]]:
        frame = frame[[k in common for k in zip(frame["stratum"], frame["id"])]]
        seeds = tuple(sorted(int(s) for s in frame["seed"].unique()))
        seed_pos = {s: n for n, s in enumerate(seeds)}
        arr = np.zeros((len(seeds), len(ids), len(strata_t), width))
        si = frame["seed"].map(seed_pos).to_numpy()
        ii = frame["id"].map(id_pos).to_numpy()
        li = frame["stratum"].map(stratum_pos).to_numpy()
        values = frame[list(columns)].to_numpy(dtype=np.float64)
        if masked:
            arr[si, ii, li, 0] = 1.0
        arr[si, ii, li, int(masked):] = values
        return arr.reshape(len(seeds), len(ids), -1), seeds

    arr_a, seeds_a = dense(a)
    arr_b, seeds_b = dense(b)
    n_examples = {s: sum(1 for k in common if k[0] == s) for s in strata_t}
    return Aligned(arr_a, arr_b, strata_t, tuple(columns), n_examples, seeds_a, seeds_b, masked)


# --------------------------------------------------------------------------------------------- statistics


def stratified_statistic(kind: str, n_strata: int, n_columns: int, masked: bool) -> stats.Statistic:
    """The mean over strata of a per-stratum score, for :func:`atm.stats.paired_bootstrap`.

    ``kind`` ``"mean"``: the stratum's mean of its one column over seeds and (valid) examples (accuracy, exact
    match; :func:`atm.stats.mean_score` per stratum); ``"f1"``: :func:`atm.stats.micro_f1` of its
    ``(tp, fp, fn)`` columns (masked-out examples carry zero counts). Maps ``(B, seeds, examples, strata * k)``
    to ``(B,)``; a resample in which a stratum has no valid example is NaN (left out of the percentiles).
    """
    width = n_columns + int(masked)

    def statistic(resampled: np.ndarray) -> np.ndarray:
        r = resampled.reshape(*resampled.shape[:3], n_strata, width)
        if kind == "f1":
            per = np.stack([stats.micro_f1(r[..., s, int(masked):]) for s in range(n_strata)], axis=-1)
        elif masked:
            with np.errstate(invalid="ignore", divide="ignore"):
                per = r[..., 1].sum(axis=(1, 2)) / r[..., 0].sum(axis=(1, 2))
        else:
            per = r[..., 0].mean(axis=(1, 2))
        return per.mean(axis=-1)

    return statistic


def _finite(value: float) -> float:
    """``value`` as a float, NaN when infinite (exp(log err_a - log err_b) - 1 with err_b = 0)."""
    return float(value) if math.isfinite(value) else math.nan


def paired_intervals(aligned: Aligned, kind: str) -> tuple[stats.Interval, stats.Interval]:
    """``(difference, relative error change)`` of system a against system b, 95% paired-bootstrap intervals.

    difference = score_a - score_b; relative error change = (err_a - err_b) / err_b with err = 1 - score
    (:func:`atm.metrics.relative_error_change`; AlexaTM, FitzGerald et al. KDD 2022; negative = a makes fewer
    errors), computed in every resample through ``log err_a - log err_b`` (see the module docstring). The
    relative change is NaN when b makes no error.
    """
    statistic = stratified_statistic(kind, len(aligned.strata), len(aligned.columns), aligned.masked)
    difference = stats.paired_bootstrap(aligned.a, aligned.b, statistic)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = stats.paired_bootstrap(aligned.a, aligned.b, lambda r: np.log1p(-statistic(r)))
        relative = stats.Interval(*(_finite(np.expm1(v)) for v in (log_ratio.estimate, log_ratio.lo, log_ratio.hi)),
                                  log_ratio.n)
    return difference, relative


@dataclass
class Comparison:
    """Paired comparison of two runs on their common examples, pooled over ``strata``.

    Attributes:
        difference, relative: score -> :class:`atm.stats.Interval` of ``a - b`` and of the relative error change.
        strata, n_examples, seeds_a, seeds_b: what it rests on (see :class:`Aligned`).
    """

    difference: dict[str, stats.Interval] = field(default_factory=dict)
    relative: dict[str, stats.Interval] = field(default_factory=dict)
    strata: tuple[str, ...] = ()
    n_examples: dict[str, int] = field(default_factory=dict)
    seeds_a: tuple[int, ...] = ()
    seeds_b: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        """Test examples per stratum (the largest count when strata differ)."""
        return max(self.n_examples.values(), default=0)


def compare(frame_a: pd.DataFrame, frame_b: pd.DataFrame, scores: Sequence[str],
            strata: Sequence[str] | None = None) -> Comparison | None:
    """Paired intervals of every score in ``scores`` (keys of :data:`SCORE_COLUMNS`) between two long frames,
    pooled over ``strata`` (default: all they share); None when they share no example."""
    out = Comparison()
    for score in scores:
        kind, columns = SCORE_COLUMNS[score]
        aligned = align(frame_a, frame_b, columns, strata)
        if aligned is None:
            return None
        out.difference[score], out.relative[score] = paired_intervals(aligned, kind)
        out.strata, out.n_examples = aligned.strata, aligned.n_examples
        out.seeds_a, out.seeds_b = aligned.seeds_a, aligned.seeds_b
    return out


def compare_finetunes(artifacts: Artifacts, ft_a: Run, ft_b: Run, scores: Sequence[str],
                      per_locale: bool = False) -> tuple[dict[str, Comparison], str]:
    """Paired MASSIVE comparison of two finetune runs on the locales both logged predictions for.

    Returns:
        ``({"avg": pooled over locales, <locale>: that locale (with ``per_locale``)}, note)``; empty with a note
        saying why when a run has no predictions artifact or the two share no utterance.
    """
    loc_a, loc_b = prediction_locales(artifacts, ft_a), prediction_locales(artifacts, ft_b)
    locales = [loc for loc in loc_a if loc in loc_b]
    if not locales:
        missing = ft_a if not loc_a else ft_b
        why = (f"finetune run {missing.info.run_id} logged no {PREDICTIONS_DIR}/<locale>.jsonl" if not (loc_a and loc_b)
               else "the two finetune runs logged predictions for no common locale")
        return {}, f"no interval: {why}"
    frame_a, frame_b = massive_frame(artifacts, ft_a, locales), massive_frame(artifacts, ft_b, locales)
    out: dict[str, Comparison] = {}
    pooled = compare(frame_a, frame_b, scores, locales)
    if pooled is None:
        return {}, "no interval: the two finetune runs' predictions share no utterance id"
    out["avg"] = pooled
    if per_locale:
        for loc in locales:
            one = compare(frame_a, frame_b, scores, [loc])
            if one is not None:
                out[loc] = one
    return out, ""


def interval_columns(comparison: Comparison | None, score: str, prefix: str) -> dict[str, Any]:
    """Table columns of one score of a comparison: ``<prefix>_diff``, ``..._diff_lo/_hi`` and
    ``<prefix>_rel_error_change_lo/_hi`` (NaN without a comparison)."""
    nan = math.nan
    if comparison is None or score not in comparison.difference:
        return {f"{prefix}_diff": nan, f"{prefix}_diff_lo": nan, f"{prefix}_diff_hi": nan,
                f"{prefix}_rel_error_change_lo": nan, f"{prefix}_rel_error_change_hi": nan}
    diff, rel = comparison.difference[score], comparison.relative[score]
    return {f"{prefix}_diff": diff.estimate, f"{prefix}_diff_lo": diff.lo, f"{prefix}_diff_hi": diff.hi,
            f"{prefix}_rel_error_change_lo": rel.lo, f"{prefix}_rel_error_change_hi": rel.hi}


def format_interval(lo: float, hi: float, spec: str = "+.2%") -> str:
    """``[lo, hi]`` formatted with ``spec``; ``"n/a"`` when the interval is undefined."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{format(lo, spec)}, {format(hi, spec)}]"
