"""Token shards: a corpus tokenized once into memory-mapped files, reused by every run and every trial.

A shard is a directory (the layout of Megatron-LM's indexed datasets and nanoGPT's ``.bin`` files):

* ``tokens.bin``: the token stream, every line's sub-tokens followed by ``</s>``, back to back; ``uint16`` when
  the vocabulary has at most 65,536 entries, else ``int32``;
* ``starts.bin``: ``int64 [n_lines + 1]``, line ``i`` is ``tokens[starts[i]:starts[i + 1] - 1]`` (its ``</s>``
  is ``tokens[starts[i + 1] - 1]``);
* ``meta.json``: format, dtype, the tokenizer's digest, and per source (:class:`SourceCounts`): lines read,
  dropped as evaluation-split text, kept, tokens, and the content digest of the kept lines
  (:func:`atm.data.mlflow_datasets.digest`, the digest MLflow shows).

:func:`build_shard` writes a shard under a temporary name and renames it into place
(:func:`atm.files.atomic_dir`) while holding a lock, so concurrent trials build it once and a killed build leaves
only a hidden temporary directory that no run reads (the next build removes it). Shards are found again by a
key over the sources' fingerprints (their files' paths, sizes and mtimes, or the digest of in-memory lines), the
tokenizer and whether evaluation text is dropped. Tokenizing runs in worker processes (``spawn``) with a bounded
number of chunks in flight, so the memory of a build does not grow with the corpus.

:class:`TokenizedCorpus` reads a shard through ``numpy.memmap``: opening one costs no memory however large the
corpus; :class:`atm.data.collate.PackedBlocks` and :class:`~atm.data.collate.LineExamples` serve it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from atm.errors import AtmError
from atm.files import atomic_dir, file_lock

log = logging.getLogger(__name__)

FORMAT = "atm-token-shard-1"
TOKENS, STARTS, META = "tokens.bin", "starts.bin", "meta.json"
#: Lines per unit of tokenizing work (one chunk per worker task).
CHUNK_LINES = 2048
#: Input size from which ``workers=None`` tokenizes in worker processes (smaller corpora: in this process).
POOL_FROM_BYTES = 32 << 20


class LineSource(Protocol):
    """A named stream of text lines (one document per line) for :func:`build_shard`.

    Attributes:
        name: shown in logs, ``meta.json`` and MLflow (a built-in source name, or the glob as configured).
        files: the files read (mirror layout or absolute paths), for MLflow's dataset source.
    """

    name: str
    files: tuple[str, ...]

    def fingerprint(self) -> str:
        """A string that changes whenever the lines may change (part of the shard key)."""

    def lines(self) -> Iterator[str]:
        """The raw lines, in order (blank ones are skipped by the builder).

        Raises:
            AtmError: ``<file>:<line>: <what is wrong>`` for unreadable input.
        """


@dataclass(frozen=True)
class TextSource:
    """Lines already in memory (the built-in corpora of :mod:`atm.data.corpora`, or a test's lines)."""

    name: str
    texts: Sequence[str]
    files: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        from atm.data.mlflow_datasets import digest

        return f"lines:{len(self.texts)}:{digest(self.texts)}"

    def lines(self) -> Iterator[str]:
        return iter(self.texts)


@dataclass
class SourceCounts:
    """What the build did with one source: non-blank lines read, dropped as evaluation-split text, kept (written
    to the shard: they have at least one sub-token), their sub-tokens (``</s>`` excluded), and the
    :func:`~atm.data.mlflow_datasets.digest` of the kept lines (stripped, before tokenizing)."""

    name: str
    files: list[str]
    read: int = 0
    dropped_evaluation: int = 0
    kept: int = 0
    tokens: int = 0
    digest: str = ""


class TokenizedCorpus:
    """Lines tokenized once, read from a shard through memory maps (or from arrays, for a shard loaded in memory).

    Attributes:
        tokens: ``[n_tokens + n_lines]`` (uint16 or int32): every line's sub-tokens, each line followed by
            ``eos_id``.
        starts: int64 ``[n_lines + 1]``; line ``i`` is ``tokens[starts[i]:starts[i + 1] - 1]``.
        meta: the shard's ``meta.json`` (``{}`` for arrays).
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, meta: dict[str, Any] | None = None):
        self.tokens, self.starts, self.meta = tokens, starts, meta or {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, in_memory: bool = False) -> TokenizedCorpus:
        """Open the shard directory ``path`` (memory-mapped; ``in_memory``: read into arrays).

        Raises:
            AtmError: ``<path>: not a token shard`` (no readable ``meta.json`` of this format) or its files do not
                match their sizes in ``meta.json``.
        """
        path = Path(path)
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AtmError(f"{path}: not a token shard ({exc})") from None
        if meta.get("format") != FORMAT:
            raise AtmError(f"{path}: not a token shard of format {FORMAT} (got {meta.get('format')!r})")
        arrays = []
        for name, dtype, count in ((TOKENS, meta["dtype"], meta["stream_tokens"]),
                                   (STARTS, "int64", meta["lines"] + 1)):
            file = path / name
            if not file.is_file() or file.stat().st_size != count * np.dtype(dtype).itemsize:
                raise AtmError(f"{file}: missing or of the wrong size for {count} {dtype} values (damaged shard: "
                               f"delete {path} and it is built again)")
            if count == 0:
                arrays.append(np.zeros(0, dtype))
            elif in_memory:
                arrays.append(np.fromfile(file, dtype))
            else:
                arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        return cls(arrays[0], arrays[1], meta)

    @property
    def n_lines(self) -> int:
        return len(self.starts) - 1

    @property
    def n_tokens(self) -> int:
        """Sub-tokens, the ``</s>`` after each line excluded."""
        return len(self.tokens) - self.n_lines

    def line(self, i: int) -> np.ndarray:
        """Line ``i``'s sub-tokens (no ``</s>``)."""
        return self.tokens[self.starts[i]:self.starts[i + 1] - 1]

    @property
    def sources(self) -> list[SourceCounts]:
        """Per source, what the build read, dropped and kept (from ``meta.json``)."""
        return [SourceCounts(**counts) for counts in self.meta.get("sources", [])]


# ------------------------------------------------------------------------------------------ encoding work

_worker: dict[str, Any] = {}  # the tokenizer and the evaluation-text set of this (worker) process


def _init_worker(tokenizer, decontaminate: bool, eos_id: int, dtype: str, pool: bool = True) -> None:
    if pool:  # one thread per worker process; in the training process a fast tokenizer keeps its thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exclude = None
    if decontaminate:
        from atm.data.corpora import evaluation_texts

        exclude = evaluation_texts()
    _worker.update(tokenizer=tokenizer, exclude=exclude, eos=eos_id, dtype=dtype)


@dataclass
class _Encoded:
    """One chunk encoded: per input line its fate (0 blank, 1 evaluation text, 2 kept), the kept lines' stream
    (sub-tokens + ``</s>`` each; lines without a sub-token are left out) and their lengths with the ``</s>``."""

    fate: np.ndarray
    stream: np.ndarray
    lengths: np.ndarray


def _encode(texts: list[str]) -> _Encoded:
    from atm.data.corpora import normalize_text

    exclude, fate, kept = _worker["exclude"], np.zeros(len(texts), np.int8), []
    for i, text in enumerate(texts):
        if text := text.strip():
            if exclude is not None and normalize_text(text) in exclude:
                fate[i] = 1
            else:
                fate[i] = 2
                kept.append(text)
    encoded = _worker["tokenizer"](kept, add_special_tokens=False, verbose=False)["input_ids"] if kept else []
    encoded = [ids for ids in encoded if ids]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    stream = np.empty(int(lengths.sum()), dtype=_worker["dtype"])
    position = 0
    for ids, length in zip(encoded, lengths):
        stream[position:position + length - 1] = ids
        stream[position + length - 1] = _worker["eos"]
        position += length
    return _Encoded(fate, stream, lengths)


class _Encoder:
    """Encodes chunks in order: in this process, or in ``workers`` spawned processes with at most
    ``2 * workers`` chunks in flight."""

    def __init__(self, tokenizer, decontaminate: bool, workers: int, dtype: str):
        args = (tokenizer, decontaminate, tokenizer.eos_token_id, dtype)
        self.workers, self.pool = workers, None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                            initargs=args)
        else:
            self._saved = dict(_worker)
            _init_worker(*args, pool=False)

    def map(self, chunks: Iterable[list[str]]) -> Iterator[tuple[list[str], _Encoded]]:
        if self.pool is None:
            for chunk in chunks:
                yield chunk, _encode(chunk)
            return
        pending: deque[tuple[list[str], Future]] = deque()
        for chunk in chunks:
            pending.append((chunk, self.pool.submit(_encode, chunk)))
            if len(pending) >= 2 * self.workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            _worker.clear()
            _worker.update(self._saved)


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------ writing


def token_dtype(tokenizer) -> str:
    """``uint16`` when every id of ``tokenizer`` fits in 16 bits, else ``int32``."""
    return "uint16" if len(tokenizer) <= 1 << 16 else "int32"


def write_shard(sources: Sequence[LineSource], tokenizer, out: str | os.PathLike, *, decontaminate: bool = False,
                workers: int = 1, chunk_lines: int = CHUNK_LINES, desc: str | None = None) -> dict[str, Any]:
    """Tokenize ``sources`` into the shard files in directory ``out`` (which must exist) and return its meta.

    Args:
        sources: read in order, each line stripped; blank lines skipped.
        tokenizer: a transformers tokenizer (``eos_token_id`` separates lines; no ``<s>``/``</s>`` added per line).
        decontaminate: drop lines whose normalised form is evaluation-split text
            (:func:`atm.data.corpora.evaluation_texts`), counted per source.
        workers: tokenizing processes (1: in this process).
        chunk_lines: lines per unit of work.
        desc: a progress bar (lines, tokens) with this label; None: no bar.

    Raises:
        AtmError: from a source (a bad file or line), or writing fails (``<file>: cannot write``).
    """
    from atm.data.mlflow_datasets import DIGEST_CHARS

    out, dtype = Path(out), token_dtype(tokenizer)
    counts: list[SourceCounts] = []
    n_lines = n_stream = 0
    encoder = _Encoder(tokenizer, decontaminate, workers, dtype)
    try:
        with open(out / TOKENS, "wb") as tokens, open(out / STARTS, "wb") as starts, \
                tqdm(desc=desc, unit=" lines", disable=desc is None, mininterval=2.0) as bar:
            starts.write(np.zeros(1, np.int64).tobytes())
            for source in sources:
                count = SourceCounts(source.name, list(source.files))
                content = hashlib.sha256()
                for chunk, encoded in encoder.map(_chunks(source.lines(), chunk_lines)):
                    for text, fate in zip(chunk, encoded.fate.tolist()):
                        if fate == 2:
                            data = text.strip().encode("utf-8")
                            content.update(len(data).to_bytes(8, "little"))
                            content.update(data)
                    count.read += int((encoded.fate > 0).sum())
                    count.dropped_evaluation += int((encoded.fate == 1).sum())
                    count.kept += len(encoded.lengths)
                    count.tokens += int(encoded.lengths.sum()) - len(encoded.lengths)
                    tokens.write(encoded.stream.tobytes())
                    starts.write((n_stream + np.cumsum(encoded.lengths)).tobytes())
                    n_lines, n_stream = n_lines + len(encoded.lengths), n_stream + len(encoded.stream)
                    bar.update(len(chunk))
                    bar.set_postfix(tokens=f"{n_stream - n_lines:,}", refresh=False)
                count.digest = content.hexdigest()[:DIGEST_CHARS]
                counts.append(count)
                log.info("token shard, source %s: %d lines read, %d dropped as evaluation-split text, %d kept, "
                         "%d tokens", count.name, count.read, count.dropped_evaluation, count.kept, count.tokens)
    except OSError as exc:
        raise AtmError(f"{exc.filename or out}: cannot write token shard ({exc.strerror})") from None
    finally:
        encoder.close()
    meta = {"format": FORMAT, "dtype": dtype, "eos_id": tokenizer.eos_token_id, "lines": n_lines,
            "tokens": n_stream - n_lines, "stream_tokens": n_stream, "tokenizer": tokenizer_digest(tokenizer),
            "decontaminated": decontaminate, "sources": [asdict(c) for c in counts], "built": time.time()}
    (out / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def tokenizer_digest(tokenizer) -> str:
    """A digest of what ``tokenizer`` maps text to: its serialised fast tokenizer (``tokenizer.json``), else its
    class and vocabulary; with its special-token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = (type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))
    return hashlib.sha256(f"{specials}{text}".encode()).hexdigest()[:16]


def shard_key(sources: Sequence[LineSource], tokenizer, decontaminate: bool) -> str:
    """The name of the shard of ``sources`` tokenized by ``tokenizer`` (20 hex digits)."""
    key = [FORMAT, tokenizer_digest(tokenizer), decontaminate, [(s.name, s.fingerprint()) for s in sources]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def build_shard(sources: Sequence[LineSource], tokenizer, root: str | os.PathLike, *, decontaminate: bool = False,
                workers: int | None = None, input_bytes: int | None = None,
                desc: str | None = None) -> TokenizedCorpus:
    """Return the shard of ``sources`` under ``root``, building it first when no run has (see the module doc).

    Args:
        sources, tokenizer, decontaminate, desc: as :func:`write_shard`.
        root: the shard directory (``data.shards.dir``; created).
        workers: tokenizing processes; None: one per core when ``input_bytes`` >= :data:`POOL_FROM_BYTES` (or is
            unknown), else 1.
        input_bytes: the size of the input files, when known.

    Raises:
        AtmError: as :func:`write_shard`; ``root`` cannot be created.
    """
    root = Path(root)
    path = root / shard_key(sources, tokenizer, decontaminate)
    if (path / META).is_file():
        return TokenizedCorpus.open(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtmError(f"data.shards.dir={root}: cannot be created ({exc.strerror})") from None
    if workers is None:
        big = input_bytes is None or input_bytes >= POOL_FROM_BYTES
        workers = (os.cpu_count() or 1) if big else 1
    with file_lock(root / f".{path.name}.lock"):
        if not (path / META).is_file():
            for stale in root.glob(f".{path.name}.tmp-*"):  # a killed build's; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            started = time.perf_counter()
            with atomic_dir(path, replace=False) as tmp:
                meta = write_shard(sources, tokenizer, tmp, decontaminate=decontaminate, workers=workers, desc=desc)
            seconds = time.perf_counter() - started
            log.info("token shard %s: %d lines, %d tokens in %.1f s (%.0f tokens/s, %d worker(s))", path,
                     meta["lines"], meta["tokens"], seconds, meta["tokens"] / max(seconds, 1e-9), workers)
    return TokenizedCorpus.open(path)


def tokenize_corpus(tokenizer, lines: Iterable[str], *, chunk_size: int = CHUNK_LINES,
                    desc: str | None = None) -> TokenizedCorpus:
    """Tokenize ``lines`` once into a shard held in memory (the shard format of :func:`write_shard`, written to a
    temporary directory and read back): for small corpora, tests and benchmarks.

    Lines are stripped; blank lines and lines without any sub-token are dropped; nothing is truncated.
    """
    texts = lines if isinstance(lines, Sequence) else list(lines)
    with tempfile.TemporaryDirectory(prefix="atm-shard-") as tmp:
        write_shard([TextSource("lines", texts)], tokenizer, tmp, chunk_lines=chunk_size, desc=desc)
        return TokenizedCorpus.open(tmp, in_memory=True)
