"""On-disk memo for data derived from the fetched files (parsed tables, evaluation-text sets).

Derived data is pickled under ``<data_dir>/.derived/`` with a key built from the producer's name, a
format version and the path, size and mtime of every input file, so it is rebuilt whenever an input
changes. The pickles are written by this package into the user's own cache directory and carry the
same trust as the cached data files next to them.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from atm.data.fetch import data_dir
from atm.files import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")
DERIVED_DIR = ".derived"


def derived(name: str, version: int, inputs: Iterable[Path], build: Callable[[], T]) -> T:
    """Return ``build()``, memoised on disk for the given input files.

    Args:
        name: producer name (file-name safe), e.g. ``"massive-utterances"``.
        version: bump when the output format or content of ``build`` changes.
        inputs: the files ``build`` reads; their paths, sizes and mtimes are part of the key.
        build: computes the value (must be picklable).

    A corrupt or unreadable memo file is ignored and rebuilt; failing to write one only logs a warning.
    """
    key = hashlib.sha256(repr((name, version, sorted(_stamp(p) for p in inputs))).encode()).hexdigest()[:20]
    path = data_dir() / DERIVED_DIR / f"{name}-{key}.pickle"
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except FileNotFoundError:
        pass
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        log.warning("ignoring unreadable derived-data file %s (%s)", path, exc)
    value = build()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError as exc:
        log.warning("cannot write derived-data file %s (%s)", path, exc)
    return value


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns
