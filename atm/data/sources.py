"""Your own pretraining text: files by glob, or Hugging Face datasets, configured as ``data.<kind>.paths`` and
``data.<kind>.hf`` (``<kind>``: ``written`` for Stage 1, ``spoken`` for Stage 2).

When either is set for a kind it replaces that kind's built-in sources (:mod:`atm.data.corpora`); the
tokenizer stage reads a sample of the same sources. Each entry is one source:

* ``paths``: globs (``~`` and ``**`` expanded, relative to the working directory), sorted matches; a file is
  plain UTF-8 text or gzip (detected from the content), one document per line, or, when its name ends in
  ``.jsonl``/``.jsonl.gz``/``.json``/``.json.gz``, JSON lines whose ``data.<kind>.text_field`` (default ``text``) is
  the document;
* ``hf``: mappings ``{name, config, split, streaming, text_field, revision}`` for ``datasets.load_dataset`` (online
  use; ``name`` may be a builder such as ``json`` with ``data_files``).

These sources are taken as given (no repeats dropped, no cap: ``max_lines_per_source`` caps the built-in
sources only); lines that are evaluation-split text are dropped (:func:`atm.data.corpora.evaluation_texts`) and
counted per source when the corpus is tokenized into a shard (:mod:`atm.data.shards`).
"""

from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from atm.data.text import get_field, iter_jsonl, numbered_lines, parse_json_line
from atm.errors import AtmError

KINDS = ("written", "spoken")
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_HF_KEYS = {"name", "config", "split", "streaming", "text_field", "revision", "data_files"}


def is_json_lines(path: str | Path) -> bool:
    """True when ``path``'s name says JSON lines (``.jsonl``, ``.json``, optionally ``.gz``)."""
    return str(path).endswith(_JSON_SUFFIXES)


@dataclass(frozen=True)
class FileSource:
    """The files matched by one glob of ``data.<kind>.paths``.

    Attributes:
        name: the glob as configured.
        files: the matching files, sorted, as absolute paths.
        text_field: the JSON field holding the text, for JSON-lines files.
    """

    name: str
    files: tuple[str, ...]
    text_field: str = "text"

    def fingerprint(self) -> str:
        stamps = []
        for file in self.files:
            stat = os.stat(file)
            stamps.append((file, stat.st_size, stat.st_mtime_ns))
        return repr((self.text_field, stamps))

    def size(self) -> int:
        """Bytes on disk, all files together."""
        return sum(os.stat(file).st_size for file in self.files)

    def lines(self) -> Iterator[str]:
        """The documents, file by file.

        Raises:
            AtmError: ``<file>:<line>: ...`` for invalid UTF-8, malformed JSON, a record without the text field
                (or with a non-string one), a truncated gzip stream; ``<file>: cannot read (...)``.
        """
        for file in self.files:
            try:
                if is_json_lines(file):
                    for loc, record in iter_jsonl(numbered_lines(file), file):
                        yield get_field(record, self.text_field, loc)
                else:
                    for _, line in numbered_lines(file):
                        yield line
            except OSError as exc:
                raise AtmError(f"{file}: cannot read ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class HFSource:
    """One Hugging Face dataset split (``datasets.load_dataset``), entry of ``data.<kind>.hf``."""

    name: str
    spec: str  # the options as sorted JSON
    files: tuple[str, ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.spec)

    def fingerprint(self) -> str:
        return self.spec

    def lines(self) -> Iterator[str]:
        """The ``text_field`` of every record.

        Raises:
            AtmError: ``datasets`` is not installed, the dataset cannot be loaded, a record lacks the field.
        """
        options, datasets = self.options, _datasets(self.name)
        field = options.get("text_field", "text")
        try:
            data = datasets.load_dataset(options["name"], options.get("config"), split=options.get("split", "train"),
                                         streaming=bool(options.get("streaming", False)),
                                         revision=options.get("revision"), data_files=options.get("data_files"))
        except Exception as exc:  # datasets raises many kinds (FileNotFoundError, ConnectionError, DatasetNotFound)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtmError(f"{self.name}: cannot load ({first})") from None
        for i, record in enumerate(data, 1):
            if not isinstance(record.get(field), str):
                raise AtmError(f"{self.name}:{i}: record has no text field {field!r} (data.*.hf text_field)")
            yield record[field]


Source = FileSource | HFSource


def _datasets(where: str):
    """The ``datasets`` package.

    Raises:
        AtmError: ``<where>: reading Hugging Face datasets needs the `datasets` package (...)`` when it is missing.
    """
    try:
        import datasets
    except ImportError:
        raise AtmError(f"{where}: reading Hugging Face datasets needs the `datasets` package "
                       "(pip install 'atm[hf]')") from None
    return datasets


def _setting(data_cfg: Mapping, kind: str) -> Mapping:
    return (data_cfg.get(kind) or {}) if hasattr(data_cfg, "get") else {}


def configured_sources(data_cfg: Mapping, kind: str) -> list[Source]:
    """The sources of ``data.<kind>.paths`` and ``data.<kind>.hf``, in that order; ``[]`` when neither is set (the
    built-in sources apply).

    Raises:
        AtmError: naming the key: a setting of the wrong type, a glob that matches no file, a file that cannot be
            read, an ``hf`` entry without ``name`` or with an unknown key.
    """
    setting = _setting(data_cfg, kind)
    paths, hf = setting.get("paths") or [], setting.get("hf") or []
    field = setting.get("text_field", "text")
    if not isinstance(field, str) or not field:
        raise AtmError(f"data.{kind}.text_field={field!r} must be a non-empty string")
    if isinstance(paths, str) or not isinstance(paths, Sequence):
        raise AtmError(f"data.{kind}.paths={paths!r} must be a list of globs, e.g. '[corpus/*.txt.gz]'")
    sources: list[Source] = []
    for i, pattern in enumerate(paths):
        key = f"data.{kind}.paths[{i}]"
        if not isinstance(pattern, str) or not pattern:
            raise AtmError(f"{key}={pattern!r} must be a non-empty glob")
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        files = tuple(os.path.abspath(m) for m in matches if os.path.isfile(m))
        if not files:
            raise AtmError(f"{key}={pattern!r} matches no file (relative to {os.getcwd()})")
        for file in files:
            if not os.access(file, os.R_OK):
                raise AtmError(f"{file}: cannot read (permission denied) ({key})")
        sources.append(FileSource(pattern, files, field))
    if isinstance(hf, (str, Mapping)) or not isinstance(hf, Sequence):
        raise AtmError(f"data.{kind}.hf must be a list of {{name, config, split, streaming}} mappings")
    for i, entry in enumerate(hf):
        key = f"data.{kind}.hf[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry.get("name"):
            raise AtmError(f"{key}={entry!r} must be a mapping with a dataset `name`")
        unknown = sorted(set(entry) - _HF_KEYS)
        if unknown:
            raise AtmError(f"{key}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_HF_KEYS))})")
        options = {"text_field": field, "split": "train", **_plain(entry)}
        label = "/".join(str(options[k]) for k in ("name", "config", "split") if options.get(k) is not None)
        sources.append(HFSource(f"hf:{label}", json.dumps(options, sort_keys=True)))
    return sources


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def check_sources(data_cfg: Mapping) -> None:
    """Config-time checks of ``data.<kind>.paths``/``hf``/``text_field`` for both kinds (before anything trains):
    every glob matches readable files, and the first record of each JSON-lines file has the text field.

    Raises:
        AtmError: as :func:`configured_sources`; ``<file>:<line>: missing field 'text'`` and the like; an ``hf``
            source when the ``datasets`` package is missing.
    """
    for kind in KINDS:
        for source in configured_sources(data_cfg, kind):
            if isinstance(source, HFSource):
                _datasets(f"data.{kind}.hf")
                continue
            for file in source.files:
                if is_json_lines(file):
                    _check_first_record(file, source.text_field)


def _check_first_record(file: str, field: str) -> None:
    for lineno, line in numbered_lines(file):
        if line.strip():
            loc = f"{file}:{lineno}"
            get_field(parse_json_line(line, loc), field, loc)
            return


class Sample(NamedTuple):
    """A sample of a source (:func:`sample_lines`): the lines, and the source's non-blank lines read and dropped
    as evaluation-split text."""

    lines: list[str]
    read: int
    dropped_evaluation: int


def sample_lines(source: Source, cap: int | None, seed: int, exclude: frozenset[str] | None) -> Sample:
    """A uniform sample of at most ``cap`` non-blank lines of ``source`` that are not evaluation text (``exclude``,
    normalised forms), in source order (reservoir sampling, Vitter 1985 Algorithm R, seeded by ``(seed,
    source name)``); every such line when ``cap`` is None. One pass; memory is ``cap`` lines.
    """
    from atm.data.corpora import normalize_text

    rng, reservoir, seen, read = random.Random(f"{seed}/{source.name}"), [], 0, 0
    for line in source.lines():
        if not (text := line.strip()):
            continue
        read += 1
        if exclude is not None and normalize_text(text) in exclude:
            continue
        if cap is None or len(reservoir) < cap:
            reservoir.append((seen, text))
        elif (j := rng.randrange(seen + 1)) < cap:
            reservoir[j] = (seen, text)
        seen += 1
    return Sample([text for _, text in sorted(reservoir)], read, read - seen)
