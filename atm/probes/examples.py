"""Per-example probe records: the contract read by ``analysis/findings.py`` (paired bootstraps over examples).

``stage=evaluate`` logs, for every checkpoint of step ``N``, the artifact ``evaluation/examples/step-<N:06d>.csv``
with exactly the columns :data:`COLUMNS`:

* ``probe``: ``xnli``, ``noun`` (UD PUD noun mask filling) or ``slot`` (MASSIVE slot-word mask filling);
* ``language``: the XNLI / PUD language or the MASSIVE locale;
* ``item``: index of the test pair (XNLI) or of the probed word (mask filling) within that language's set,
  identical across the checkpoints of a run (words a tokenizer truncates away have no row);
* ``seed``: the classifier's seed for ``xnli``; -1 for mask filling;
* ``correct``: 0/1, top-1;
* ``rank``: the whole-word rank of mask filling (:func:`atm.probes.mask_fill.word_ranks`), empty for ``xnli``;
* ``pred``: the predicted label id for ``xnli`` (0 entailment, 1 neutral, 2 contradiction), empty for mask
  filling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COLUMNS: tuple[str, ...] = ("probe", "language", "item", "seed", "correct", "rank", "pred")
#: ``seed`` of the deterministic probes (mask filling).
NO_SEED = -1


def example_frame(probe: str, language: str, items: Sequence[int] | np.ndarray, correct: Sequence | np.ndarray, *,
                  seed: int = NO_SEED, rank: Sequence | np.ndarray | None = None,
                  pred: Sequence | np.ndarray | None = None) -> pd.DataFrame:
    """The rows of one (probe, language, seed): ``items``, ``correct`` (bool or 0/1), ``rank`` or ``pred``
    (each ``[n]``); the missing one of ``rank``/``pred`` is an empty (NA) integer column."""
    n = len(items)
    empty = pd.array([pd.NA] * n, dtype="Int64")
    return pd.DataFrame({
        "probe": [probe] * n, "language": [language] * n, "item": np.asarray(items, dtype=np.int64),
        "seed": np.full(n, seed, dtype=np.int64), "correct": np.asarray(correct).astype(np.int64),
        "rank": empty if rank is None else pd.array(np.asarray(rank, dtype=np.int64), dtype="Int64"),
        "pred": empty if pred is None else pd.array(np.asarray(pred, dtype=np.int64), dtype="Int64"),
    }, columns=list(COLUMNS))


def concat(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """All rows of ``frames`` in order, with :data:`COLUMNS` even when there are none."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="Int64" if c in ("rank", "pred") else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)
