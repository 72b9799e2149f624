"""TF-IDF + logistic-regression intent classifier on MASSIVE: the floor a pretrained encoder has to clear.

Trains on a locale's ``train`` split (optionally the first ``--max-train`` utterances of a seeded shuffle, the
sample ``finetune.max_train_per_locale`` takes) and scores intent accuracy on the locale's full ``test`` split,
with a 95% percentile-bootstrap interval over test utterances (:func:`atm.stats.bootstrap_interval`).

Features (scikit-learn): TF-IDF of word 1-2-grams and of character 2-4-grams within word boundaries
(``char_wb``), sublinear term frequency, over MASSIVE's words joined by spaces (characters for ja-JP/zh-*,
:func:`atm.data.massive.read_massive`); the classifier is a multinomial logistic regression (L2, C = 10, SAGA).
Word and character n-gram TF-IDF with a linear model is the classic strong text-classification baseline
(Joachims 1998; Wang & Manning 2012, "Baselines and bigrams").

Usage::

    python analysis/baseline_tfidf.py                      # en-US: accuracy, interval, seconds
    python analysis/baseline_tfidf.py --locale de-DE --max-train 400

Reads MASSIVE from ``$ATM_DATA_MIRROR`` (README "Data"); an unknown locale or a missing archive is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from analysis._store import cli
from atm.errors import ArgumentParser, AtmError

#: Inverse L2 regularisation strength of the logistic regression (chosen on en-US: 5, 10 and 20 agree within
#: 0.2 points of accuracy).
C = 10.0
#: SAGA's stopping tolerance: 1e-2 stops after ~25 epochs, within 0.1 point of accuracy of 1e-3 at a third of the time.
TOL = 1e-2
MAX_ITER = 200


@dataclass(frozen=True)
class BaselineResult:
    """Intent accuracy of the TF-IDF baseline on one locale's test split.

    Attributes:
        locale: MASSIVE locale; ``n_train``, ``n_test``: utterances trained on and scored.
        accuracy: :class:`atm.stats.Interval` of test intent accuracy (95% bootstrap over test utterances).
        seconds: wall-clock seconds of feature extraction, training and prediction (reading MASSIVE excluded);
        read_seconds: seconds spent reading MASSIVE.
    """

    locale: str
    n_train: int
    n_test: int
    accuracy: object
    seconds: float
    read_seconds: float


def build_model(seed: int = 0):
    """The unfitted scikit-learn pipeline: word 1-2-gram + char_wb 2-4-gram TF-IDF -> logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"\S+",
                            lowercase=True)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, lowercase=True)
    classifier = LogisticRegression(C=C, solver="saga", tol=TOL, max_iter=MAX_ITER, random_state=seed)
    return make_pipeline(make_union(words, chars), classifier)


def tfidf_intent_baseline(locale: str = "en-US", max_train: int | None = None, seed: int = 0) -> BaselineResult:
    """Train on ``locale``'s train split, score intent accuracy on its full test split.

    Args:
        max_train: keep this many training utterances (a ``random.Random(seed)`` shuffle, then the first ones,
            as ``finetune.max_train_per_locale`` does); None = all.
        seed: seed of that shuffle and of SAGA's sampling.

    Raises:
        AtmError: unknown locale, unreadable MASSIVE archive, or ``max_train`` < 1.
    """
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from atm import stats
    from atm.data.massive import read_massive

    if max_train is not None and max_train < 1:
        raise AtmError(f"max_train={max_train}: must be at least 1 (or None for the whole train split)")
    start = time.perf_counter()
    examples = read_massive([locale], ["train", "test"])
    train = [ex for ex in examples if ex.partition == "train"]
    test = [ex for ex in examples if ex.partition == "test"]
    if not train or not test:
        raise AtmError(f"MASSIVE locale {locale} has {len(train)} train and {len(test)} test utterances; need both")
    if max_train is not None:
        random.Random(seed).shuffle(train)
        train = train[:max_train]
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model = build_model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit([" ".join(ex.words) for ex in train], [ex.intent for ex in train])
    predicted = model.predict([" ".join(ex.words) for ex in test])
    seconds = time.perf_counter() - start
    correct = (np.asarray(predicted) == np.asarray([ex.intent for ex in test])).astype(np.float64)
    return BaselineResult(locale, len(train), len(test), stats.bootstrap_interval(correct), seconds, read_seconds)


def describe(result: BaselineResult) -> str:
    """One markdown line: accuracy with its interval, sizes and seconds."""
    acc = result.accuracy
    return (f"TF-IDF + logistic regression, MASSIVE {result.locale}: intent accuracy {acc.estimate:.4f} "
            f"[{acc.lo:.4f}, {acc.hi:.4f}] on {result.n_test} test utterances, trained on {result.n_train}; "
            f"{result.seconds:.1f} s to fit and predict ({result.read_seconds:.1f} s to read MASSIVE)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python analysis/baseline_tfidf.py", description=(
        "TF-IDF + logistic-regression intent baseline on MASSIVE: train on a locale's train split, report "
        "intent accuracy (95% bootstrap interval) on its full test split and the seconds it took."))
    parser.add_argument("--locale", default="en-US", help="MASSIVE locale (default: en-US)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="train on this many utterances of a seeded shuffle (default: the whole train split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of SAGA (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    def run(args: argparse.Namespace) -> int:
        print(describe(tfidf_intent_baseline(args.locale, args.max_train, args.seed)))
        return 0

    return cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
