"""atm.stats: seed intervals, bootstrap and paired bootstrap intervals, power."""

import math

import numpy as np
import pytest

from atm import stats
from atm.errors import AtmError


def test_seed_interval_is_the_student_t_interval():
    iv = stats.seed_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, sem = 1/sqrt(3), t_{0.975, 2} = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert iv.estimate == pytest.approx(2.0)
    assert iv.lo == pytest.approx(2.0 - half, abs=1e-5) and iv.hi == pytest.approx(2.0 + half, abs=1e-5)
    one = stats.seed_interval([0.7])
    assert one.estimate == 0.7 and math.isnan(one.lo) and not one.excludes_zero


def test_bootstrap_interval_of_an_accuracy_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    correct = (rng.random(3000) < 0.8).astype(float)
    iv = stats.bootstrap_interval(correct, n_resamples=3000)
    p = correct.mean()
    se = math.sqrt(p * (1 - p) / correct.size)
    assert iv.estimate == pytest.approx(p)
    assert iv.lo == pytest.approx(p - 1.96 * se, abs=0.004)
    assert iv.hi == pytest.approx(p + 1.96 * se, abs=0.004)


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    base = (rng.random(2000) < 0.7).astype(float)
    better = base.copy()
    flip = np.flatnonzero(base == 0)[:100]  # 100 of 2000 wrong answers fixed: +5 points
    better[flip] = 1
    diff = stats.paired_bootstrap(better, base)
    assert diff.estimate == pytest.approx(0.05)
    assert diff.excludes_zero and diff.lo > 0.03
    same = stats.paired_bootstrap(base, base)
    assert same.estimate == 0 and same.lo == 0 and same.hi == 0
    # 20 answers fixed and 20 broken: no net effect, and the interval says so
    noisy = base.copy()
    noisy[np.flatnonzero(base == 0)[:20]] = 1
    noisy[np.flatnonzero(base == 1)[:20]] = 0
    null = stats.paired_bootstrap(noisy, base)
    assert null.estimate == 0 and null.lo < 0 < null.hi


def test_paired_bootstrap_resamples_seeds_so_seed_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    base = (rng.random((1, 1000)) < 0.6).astype(float)
    stable = np.repeat(base, 3, axis=0)
    unstable = stable.copy()
    unstable[0] = (rng.random(1000) < 0.9).astype(float)  # one seed very different
    narrow = stats.paired_bootstrap(stable, base)
    wide = stats.paired_bootstrap(unstable, base)
    assert narrow.hi - narrow.lo == 0
    assert wide.hi - wide.lo > 0.05


def test_micro_f1_statistic_sums_counts_before_dividing():
    # two examples: (tp, fp, fn) = (1, 0, 1) and (0, 1, 0) -> tp 1, fp 1, fn 1 -> F1 = 2 / 4
    scores = np.array([[[1, 0, 1], [0, 1, 0]]], dtype=float)
    assert stats.bootstrap_interval(scores, stats.micro_f1, n_resamples=10).estimate == pytest.approx(0.5)
    assert stats.micro_f1(np.zeros((1, 1, 2, 3)))[0] == 0.0


def test_misaligned_or_empty_scores_are_one_line_errors():
    with pytest.raises(AtmError, match="same examples"):
        stats.paired_bootstrap(np.ones(10), np.ones(11))
    with pytest.raises(AtmError, match="non-empty"):
        stats.bootstrap_interval([])
    with pytest.raises(AtmError, match="no values"):
        stats.seed_interval([])


def test_required_n_scales_with_the_inverse_square_of_the_effect():
    iv = stats.Interval(estimate=0.01, lo=-0.01, hi=0.03, n=1000)
    n = stats.required_n(iv)
    # se = 0.02 / 1.96; n * ((1.96 + 0.8416) * se / 0.01)^2
    assert n == pytest.approx(1000 * ((1.959964 + 0.841621) * (0.02 / 1.959964) / 0.01) ** 2, rel=1e-4)
    half = stats.required_n(stats.Interval(0.02, 0.0, 0.04, 1000))
    assert half == pytest.approx(n / 4, rel=1e-6)
    assert stats.required_n(stats.Interval(0.0, -0.01, 0.01, 10)) == math.inf
