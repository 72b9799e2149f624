"""Uncertainty for small-scale results: intervals across seeds, paired bootstrap over test examples, power.

Every table that compares two systems (Stage 2 vs Stage 1, student vs teacher, student vs a same-size model
trained without distillation, ablation levels) reports the difference with a 95% interval from
:func:`paired_bootstrap`; a mean over seeds comes with a Student-t interval (:func:`seed_interval`); a
difference whose interval spans zero comes with the test-set size a decision would need
(:func:`required_n`).

Per-example scores are arrays of shape ``(n_seeds, n_examples, n_components)`` (a 1-D array is one seed and
one component; 2-D is ``(n_seeds, n_examples)``). Components let one statistic combine several counts per
example, e.g. slot F1 from ``(tp, fp, fn)`` (:func:`micro_f1`).

References: Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 13 (percentile interval);
Koehn (2004), "Statistical significance tests for machine translation evaluation" (paired bootstrap over
test examples); Bouthillier et al. (2021), "Accounting for variance in machine learning benchmarks"
(resampling seeds as well as examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from atm.errors import AtmError

#: The default confidence level of every interval atm reports.
CONFIDENCE = 0.95
#: Bootstrap resamples: the percentile interval's end points move by < 0.1 point of accuracy beyond this.
N_RESAMPLES = 2000

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval.

    Attributes:
        estimate: the statistic on the observed data.
        lo, hi: the interval's end points (NaN when it cannot be estimated, e.g. one seed).
        n: examples (or seeds) it rests on.
    """

    estimate: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (False when it is undefined)."""
        return bool(self.lo > 0 or self.hi < 0)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def as_dict(self, prefix: str) -> dict[str, float]:
        """``{prefix: estimate, prefix_lo: lo, prefix_hi: hi}``, for metrics and table rows."""
        return {prefix: self.estimate, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def _as_scores(scores: np.ndarray | Sequence, name: str) -> np.ndarray:
    """``scores`` as a float array of shape (seeds, examples, components). Raises AtmError when empty."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :, None]
    elif arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise AtmError(f"{name}: per-example scores must be a non-empty (seeds, examples[, components]) array, "
                       f"got shape {np.shape(scores)}")
    return arr


def mean_score(resampled: np.ndarray) -> np.ndarray:
    """Mean of component 0 over seeds and examples. ``resampled``: (B, seeds, examples, k) -> (B,)."""
    return resampled[..., 0].mean(axis=(1, 2))


def micro_f1(resampled: np.ndarray) -> np.ndarray:
    """Micro F1 from summed counts, averaged over seeds: components ``(tp, fp, fn)``;
    F1 = 2 tp / (2 tp + fp + fn) (0 when the denominator is 0). (B, seeds, examples, 3) -> (B,)."""
    tp, fp, fn = (resampled[..., i].sum(axis=2) for i in range(3))  # (B, seeds)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1.mean(axis=1)


def _resample(arr: np.ndarray, example_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, seeds, examples, k): examples picked by ``example_idx`` (B, n); seeds resampled when > 1."""
    n_seeds = arr.shape[0]
    b = example_idx.shape[0]
    seed_idx = (rng.integers(0, n_seeds, size=(b, n_seeds)) if n_seeds > 1
                else np.zeros((b, 1), dtype=np.int64))
    return arr[seed_idx[:, :, None], example_idx[:, None, :]]


def _percentile(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _resamples_in_chunks(n_examples: int, n_resamples: int, rng: np.random.Generator, work: Callable,
                         cells_per_resample: int | None = None, chunk_cells: int = 2_000_000) -> np.ndarray:
    """Run ``work(example_idx)`` over chunks of resamples so memory stays bounded (about ``chunk_cells``
    resampled scores at once; ``cells_per_resample``: seeds x examples x components of one resample, default
    ``n_examples``); concatenates the results."""
    per_chunk = max(1, chunk_cells // max(cells_per_resample or n_examples, 1))
    out = []
    for start in range(0, n_resamples, per_chunk):
        b = min(per_chunk, n_resamples - start)
        out.append(work(rng.integers(0, n_examples, size=(b, n_examples))))
    return np.concatenate(out)


def bootstrap_interval(scores, statistic: Statistic = mean_score, *, confidence: float = CONFIDENCE,
                       n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over test examples (and seeds, when there are several).

    Args:
        scores: per-example scores, (seeds, examples[, components]); e.g. 0/1 correctness.
        statistic: maps resampled scores (B, seeds, examples, k) to (B,) values (:func:`mean_score`,
            :func:`micro_f1`).
        seed: seed of the resampling generator (fixed, so a table is reproducible).

    Raises:
        AtmError: empty or malformed ``scores``.
    """
    arr = _as_scores(scores, "bootstrap_interval")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(arr[None])[0])
    values = _resamples_in_chunks(arr.shape[1], n_resamples, rng,
                                  lambda idx: statistic(_resample(arr, idx, rng)), arr.size)
    lo, hi = _percentile(values, confidence)
    return Interval(estimate, lo, hi, arr.shape[1])


def paired_bootstrap(scores_a, scores_b, statistic: Statistic = mean_score, *, confidence: float = CONFIDENCE,
                     n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """Interval of ``statistic(a) - statistic(b)`` by a paired bootstrap over test examples.

    Example ``i`` of ``a`` and of ``b`` is the same test item (e.g. the same MASSIVE id), so each resample
    draws the same example indices for both systems; each system's seeds are resampled independently
    (Bouthillier et al. 2021), so the interval carries seed variance as well as test-set variance.

    Args:
        scores_a, scores_b: (seeds, examples[, components]) with the same number of examples and components
            (the seed counts may differ).

    Raises:
        AtmError: empty arrays, or ``a`` and ``b`` not aligned (different example or component counts).
    """
    a, b = _as_scores(scores_a, "paired_bootstrap a"), _as_scores(scores_b, "paired_bootstrap b")
    if a.shape[1:] != b.shape[1:]:
        raise AtmError(f"paired_bootstrap: the two systems are not scored on the same examples "
                       f"({a.shape[1]} vs {b.shape[1]} examples, {a.shape[2]} vs {b.shape[2]} components)")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(a[None])[0] - statistic(b[None])[0])

    def work(idx: np.ndarray) -> np.ndarray:
        return statistic(_resample(a, idx, rng)) - statistic(_resample(b, idx, rng))

    values = _resamples_in_chunks(a.shape[1], n_resamples, rng, work, a.size + b.size)
    lo, hi = _percentile(values, confidence)
    return Interval(estimate, lo, hi, a.shape[1])


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds with a Student-t interval (NaN end points with one seed).

    Raises:
        AtmError: no values.
    """
    arr = np.asarray([v for v in values], dtype=np.float64)
    if arr.size == 0:
        raise AtmError("seed_interval: no values")
    mean = float(arr.mean())
    if arr.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(arr.std(ddof=1) / math.sqrt(arr.size))
    if sem == 0:
        return Interval(mean, mean, mean, int(arr.size))
    lo, hi = sps.t.interval(confidence, df=arr.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi), int(arr.size))


def required_n(interval: Interval, *, confidence: float = CONFIDENCE, power: float = 0.8) -> float:
    """Sample size at which an effect of the observed size would be detected with probability ``power``.

    Normal approximation: the interval's half-width shrinks as 1/sqrt(n), so with standard error
    ``se = half_width / z_{1-a/2}`` at ``n``, the size needed is ``n * ((z_{1-a/2} + z_power) * se / |d|)^2``
    (e.g. Cohen 1988, ch. 2). Returns ``inf`` for an estimate of exactly 0 and NaN for an undefined interval.
    """
    if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return math.nan
    if interval.estimate == 0:
        return math.inf
    z_a = sps.norm.ppf(1 - (1 - confidence) / 2)
    z_b = sps.norm.ppf(power)
    se = interval.half_width / z_a
    return float(interval.n * ((z_a + z_b) * se / abs(interval.estimate)) ** 2)
