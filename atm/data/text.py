"""Shared low-level text I/O for every reader in :mod:`atm.data`.

All readers read files through :func:`numbered_lines` / :func:`open_binary` (so a cached copy may be
plain or gzipped, detected from the content), parse JSON lines with :func:`iter_jsonl` and report bad
input as ``AtmError("<file>:<line>: <what is wrong>")`` via :func:`where` -- one format everywhere.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from atm.errors import AtmError

_GZIP_MAGIC = b"\x1f\x8b"
#: What reading a damaged gzip stream raises: truncated (EOFError), bad header or CRC (BadGzipFile, an OSError),
#: corrupt deflate data (zlib.error).
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
#: How to repair a damaged data file, appended to the error naming it.
FIX_HINT = ("replace it with a complete copy (a copy in the data cache $ATM_DATA_DIR: delete it, and the next run "
            "copies it again from $ATM_DATA_MIRROR)")


def damaged(name: str | Path, exc: BaseException, line: int | None = None) -> str:
    """One-line message for a truncated or corrupt (gzipped) file: names it, the last good line and the fix.

    Args:
        name: the file (or ``archive:member``) at fault.
        exc: what the reader raised (one of :data:`GZIP_ERRORS`, or a ``tarfile.TarError``).
        line: the last line read completely, if any.
    """
    after = f" after line {line}" if line else ""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{name}: truncated or corrupt data{after} ({reason}); {FIX_HINT}"


def is_gzip(path: str | Path) -> bool:
    """Return True when the file at ``path`` starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a file for reading bytes, transparently decompressing gzip (detected from the content).

    Raises:
        AtmError: the file does not exist.
    """
    path = Path(path)
    try:
        return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
    except FileNotFoundError:
        raise AtmError(f"{path}: no such file") from None


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading as UTF-8, transparently decompressing gzip.

    Gzip is detected from the content, not the name, so ``x.conllu`` and ``x.conllu.gz`` both work
    whichever form the cache holds. Only ``\\n`` ends a line (a stray ``\\r`` inside a field is not a
    line break); line endings are returned untranslated.

    Raises:
        AtmError: the file does not exist.
    """
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="\n")


def decode_lines(fh: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for the UTF-8 lines of a binary stream (1-based, line ending removed).

    Only ``\\n`` ends a line; a trailing ``\\r`` is removed with it. Blank lines are yielded too.

    Raises:
        AtmError: ``"<name>:<line>: not valid UTF-8 (...)"``; ``"<name>: truncated or corrupt data after line
            <n> (...); replace it ..."`` when a gzip stream ends early or is damaged (see :func:`damaged`).
    """
    lineno = 0
    try:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AtmError(f"{where(name, lineno)}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            yield lineno, line.rstrip("\r\n")
    except GZIP_ERRORS as exc:
        raise AtmError(damaged(name, exc, lineno or None)) from None


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for every line of a plain or gzipped UTF-8 file (see :func:`decode_lines`).

    Raises:
        AtmError: the file does not exist or a line is not valid UTF-8 (message names file and line).
    """
    with open_binary(path) as fh:
        yield from decode_lines(fh, str(path))


def read_lines(path: str | Path) -> Iterator[str]:
    """Yield the lines of a plain or gzipped UTF-8 text file, stripped, skipping blank lines.

    Raises:
        AtmError: the file does not exist or a line is not valid UTF-8 (message names file and line).
    """
    for _, line in numbered_lines(path):
        if line := line.strip():
            yield line


def where(path: str | Path, line: int | None = None) -> str:
    """Format an error location: ``"<path>:<line>"`` (or just the path when no line is given)."""
    return f"{path}:{line}" if line is not None else str(path)


def parse_json_line(line: str, loc: str) -> dict[str, Any]:
    """Parse one JSON-lines record that must be a JSON object.

    Args:
        line: the text of the line.
        loc: the location used in error messages, e.g. ``"file.jsonl:12"``.

    Raises:
        AtmError: ``"<loc>: malformed JSON (<reason>): <line start>"`` or ``"<loc>: expected a JSON
            object, got <type>"``.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AtmError(f"{loc}: malformed JSON ({exc.msg} at column {exc.colno}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise AtmError(f"{loc}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_jsonl(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse numbered JSON lines into ``(location, record)`` pairs, skipping blank lines.

    Args:
        lines: ``(line_number, text)`` pairs, e.g. from :func:`numbered_lines`.
        name: the file name used in locations (``"<name>:<line>"``).

    Raises:
        AtmError: a line is not a JSON object (see :func:`parse_json_line`).
    """
    for lineno, line in lines:
        if line.strip():
            loc = where(name, lineno)
            yield loc, parse_json_line(line, loc)


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, record)`` for each non-blank line of a plain or gzipped JSON-lines file.

    Raises:
        AtmError: a line is not a JSON object; the message starts with ``"<path>:<line>:"``.
    """
    return iter_jsonl(numbered_lines(path), str(path))


def get_field(record: dict[str, Any], key: str, loc: str, kind: type | tuple[type, ...] = str) -> Any:
    """Return ``record[key]`` after checking it exists and has type ``kind``.

    Raises:
        AtmError: ``"<loc>: missing field 'key'"`` or ``"<loc>: field 'key' should be <kind>, got ..."``.
    """
    try:
        value = record[key]
    except KeyError:
        raise AtmError(f"{loc}: missing field {key!r}") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AtmError(f"{loc}: field {key!r} should be {names}, got {value!r:.60}")
    return value
