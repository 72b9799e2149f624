"""The data a run reads, logged as MLflow dataset inputs (``mlflow.log_inputs``): the MLflow UI's Dataset column
shows what each run read, and two runs can be compared on their data.

One dataset per thing read -- a source of a pretraining corpus (``written/ud``), a split of a task in one
language (``massive/train/en-US``, ``xnli/test/de``) -- as an :class:`mlflow.data.meta_dataset.MetaDataset`
(metadata only, never the rows) with:

* ``digest``: the first :data:`DIGEST_CHARS` hex digits of the sha256 of the rows read, in order (each row a
  UTF-8 string, length-prefixed; :func:`digest`). Two runs that read the same rows show the same digest, on
  any machine and from any cache; a row more, less or changed gives another one;
* ``profile``: sizes, ``{"num_rows": N}`` (rows read), for text with languages also
  ``"num_rows_per_language"``, and ``"files"``: the files read, in the mirror layout (:mod:`atm.data.fetch`);
* ``source``: the official URL of the one file read when it has one (:data:`atm.data.fetch.RESOURCES`; an
  ``HTTPDatasetSource``), else the local path of the file, or of the directory holding the files, in the data
  directory (a ``LocalArtifactDatasetSource``);
* the input tag ``mlflow.data.context`` (:data:`CONTEXTS`): ``training`` (trained on: a corpus, a training
  split, the XNLI probe's training pairs), ``evaluation`` (held-out and dev text scored during or after
  training: perplexity, early stopping, a teacher switch) or ``test`` (the test splits that reported scores
  are computed on).

Names logged by the readers (``<lang>``: ISO code or MASSIVE locale):

* ``written/{ud,udpos_xtreme,xnli}``, ``spoken/{massive,slurp_lm}`` (training): the pretraining corpora by
  source, :mod:`atm.data.corpora` (pretraining and distillation stages, the tokenizer);
* ``written/ud_dev``, ``spoken/massive_dev`` (evaluation): held-out perplexity text (every MLM stage);
  ``cost/massive_dev`` (evaluation): the utterances latency is measured on (:mod:`atm.models.cost`);
* ``massive/{train,dev,test}/<lang>`` (training, evaluation, test): :mod:`atm.tasks.massive` (``finetune``,
  ``distill_task``) and the ``evaluate`` stage;
* ``xnli/train/en`` (training), ``xnli/test/<lang>`` (test): :mod:`atm.probes.xnli` (``finetune_xnli``,
  ``distill_task``, the ``evaluate`` probe);
* ``ud_pud/test/<lang>`` (test): the ``evaluate`` stage (perplexity, mask filling).

Nothing is logged outside an active MLflow run (library use, config checks): every function here returns at
once then, without computing a digest. A dataset read several times in one run (held-out text scored at every
pruning report, test sets of student and teacher) is logged once: this process remembers the ``(run, name,
digest)`` it logged, and MLflow itself keeps one input per name and digest and run. MLflow is imported only
when a run is active.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

#: The ``mlflow.data.context`` of a dataset input: what the run did with the data.
CONTEXTS: tuple[str, ...] = ("training", "evaluation", "test")
#: Hex digits of the sha256 kept as the digest (MLflow recommends at most 10).
DIGEST_CHARS = 10
#: Most datasets in one ``log_inputs`` call (MLflow's batch limit).
_BATCH = 1000

_logged: set[tuple[str, str, str]] = set()  # (run id, name, digest) logged by this process

T = TypeVar("T")


@dataclass(frozen=True)
class DataRead:
    """What one read produced, ready to log (:func:`text_read`, :func:`examples_read`).

    Attributes:
        name: the dataset's name, e.g. ``written/ud`` or ``massive/test/de-DE``.
        context: one of :data:`CONTEXTS`.
        digest: :func:`digest` of the rows read.
        profile: JSON-serialisable sizes: ``num_rows`` (and more, see the module doc).
        files: the files read, in the mirror layout.
    """

    name: str
    context: str
    digest: str
    profile: dict[str, Any]
    files: tuple[str, ...]


def active_run_id() -> str | None:
    """The id of this process's active MLflow run, or None (also when MLflow was never imported: then no run
    can be active, and MLflow is not imported here)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def digest(rows: Iterable[str]) -> str:
    """The content digest of ``rows``, in order: the first :data:`DIGEST_CHARS` hex digits of the sha256 over
    every row's UTF-8 bytes, each preceded by its length (8 bytes, little-endian), so that no two different
    row sequences hash the same bytes. One pass, no copy of the rows."""
    h = hashlib.sha256()
    for row in rows:
        data = row.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:DIGEST_CHARS]


def _check(name: str, context: str) -> None:
    if not name or len(name) > 500:
        raise ValueError(f"dataset name {name!r} must have 1 to 500 characters")
    if context not in CONTEXTS:
        raise ValueError(f"dataset context {context!r} must be one of {', '.join(CONTEXTS)}")


def text_read(name: str, lines: Sequence[str], files: Iterable[str], context: str, *,
              langs: Sequence[str] | None = None) -> DataRead:
    """A dataset of text lines: ``num_rows`` = ``len(lines)``, the digest of the lines in their order.

    Args:
        name: dataset name, e.g. ``written/ud``.
        lines: the lines read (after filtering and capping: what the run uses).
        files: the files they were read from, in the mirror layout.
        context: one of :data:`CONTEXTS`.
        langs: the language of each line (parallel to ``lines``): adds ``num_rows_per_language``.

    Raises:
        ValueError: an empty or over-long name, an unknown context, ``langs`` not parallel to ``lines``.
    """
    _check(name, context)
    files = tuple(dict.fromkeys(files))
    profile: dict[str, Any] = {"num_rows": len(lines)}
    if langs is not None:
        if len(langs) != len(lines):
            raise ValueError(f"dataset {name}: {len(langs)} languages for {len(lines)} lines")
        profile["num_rows_per_language"] = dict(sorted(Counter(langs).items()))
    profile["files"] = list(files)
    return DataRead(name, context, digest(lines), profile, files)


def examples_read(name: str, examples: Sequence[T], files: Iterable[str], context: str, *,
                  key: Callable[[T], str]) -> DataRead:
    """A dataset of records (task examples): ``num_rows`` = ``len(examples)``, the digest of ``key(example)``
    of each, in their order.

    Args:
        name: dataset name, e.g. ``massive/train/en-US``.
        examples: the records read (after sampling: what the run uses), in file order.
        files: the files they were read from, in the mirror layout.
        context: one of :data:`CONTEXTS`.
        key: the text of a record that the digest covers (every field that matters, no local path).

    Raises:
        ValueError: an empty or over-long name, an unknown context.
    """
    _check(name, context)
    files = tuple(dict.fromkeys(files))
    return DataRead(name, context, digest(map(key, examples)), {"num_rows": len(examples), "files": list(files)},
                    files)


def log_reads(reads: Iterable[DataRead]) -> int:
    """Log each read as a dataset input of the active MLflow run (batched), skipping those this process already
    logged to the run.

    ``reads`` is consumed only when a run is active, so a generator of :func:`text_read`/:func:`examples_read`
    computes no digest outside a run.

    Returns:
        The number of datasets logged (0 outside a run).

    Raises:
        ValueError: from building a read (see :func:`text_read`); MlflowException: the tracking store
            refused the inputs.
    """
    run_id = active_run_id()
    if run_id is None:
        return 0
    import mlflow

    new: dict[tuple[str, str, str], DataRead] = {}
    for read in reads:
        key = (run_id, read.name, read.digest)
        if key not in _logged and key not in new:
            new[key] = read
    items = list(new.values())
    from atm.sweeps.locks import store_lock

    # MLflow's SQL store inserts a dataset new to the experiment after looking for it: two runs logging the same
    # (name, digest) at once both insert, and one fails on the unique key. Held under the store's lock, as
    # atm.tracking.configure holds its creations (no lock for a tracking server).
    with store_lock(mlflow.get_tracking_uri(), "datasets"):
        for start in range(0, len(items), _BATCH):
            batch = items[start:start + _BATCH]
            mlflow.log_inputs(datasets=[_dataset(read) for read in batch],
                              contexts=[read.context for read in batch], tags_list=[None] * len(batch))
    _logged.update(new)
    return len(items)


def log_text_dataset(name: str, lines: Sequence[str], files: Iterable[str], context: str, *,
                     langs: Sequence[str] | None = None) -> bool:
    """Log ``lines`` as the dataset ``name`` of the active run (:func:`text_read`, :func:`log_reads`).

    Returns:
        True when it was logged now; False outside a run or when this run already has it.

    Raises:
        ValueError: see :func:`text_read`; MlflowException: the tracking store refused it.
    """
    return log_reads(_lazy(text_read, name, lines, files, context, langs=langs)) > 0


def log_examples_dataset(name: str, examples: Sequence[T], files: Iterable[str], context: str, *,
                         key: Callable[[T], str]) -> bool:
    """Log ``examples`` as the dataset ``name`` of the active run (:func:`examples_read`, :func:`log_reads`).

    Returns:
        True when it was logged now; False outside a run or when this run already has it.

    Raises:
        ValueError: see :func:`examples_read`; MlflowException: the tracking store refused it.
    """
    return log_reads(_lazy(examples_read, name, examples, files, context, key=key)) > 0


def _lazy(fn: Callable[..., DataRead], *args, **kwargs) -> Iterable[DataRead]:
    yield fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ MLflow objects


def _dataset(read: DataRead):
    return _dataset_class()(_source(read.files), read.name, read.digest, read.profile)


@functools.cache
def _dataset_class() -> type:
    """:class:`mlflow.data.meta_dataset.MetaDataset` with a profile (defined on first use: MLflow is imported
    only inside a run)."""
    from mlflow.data.meta_dataset import MetaDataset

    class ReadDataset(MetaDataset):
        """A :class:`~mlflow.data.meta_dataset.MetaDataset` with the given digest and a JSON ``profile``."""

        def __init__(self, source, name: str, digest: str, profile: dict[str, Any]):
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return ReadDataset


def _source(files: Sequence[str]):
    """Where ``files`` (mirror layout) came from: the official URL of a single file that has one, else the
    local path of the file or of the deepest directory holding them all in the data directory."""
    from atm.data.fetch import RESOURCES, data_dir

    resource = RESOURCES.get(files[0]) if len(files) == 1 else None
    if resource is not None and resource.url:
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        return HTTPDatasetSource(resource.url)
    root = data_dir()
    paths = [str(root / rel) for rel in files] or [str(root)]
    return _local_source_class()(paths[0] if len(paths) == 1 else os.path.commonpath(paths))


@functools.cache
def _local_source_class() -> type:
    """MLflow's dataset source of a local path (``LocalArtifactDatasetSource``, source type ``local``), taken from
    its registry: the class is generated there, not importable by name."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    return next(cls for cls in get_registered_sources() if cls._get_source_type() == "local")

