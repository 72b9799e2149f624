"""Files that are whole or absent, and locks between processes: atm's one home for both.

* :func:`atomic_path` / :func:`atomic_write_text`: a file is written under a temporary name in its directory
  and renamed over the target (``os.replace``, atomic on POSIX), so a reader or a killed writer never leaves
  a half-written file; :func:`atomic_dir` does the same for a directory (a checkpoint, a tokenizer).
* :func:`file_lock`: an exclusive ``flock`` on a lock file (one machine, or a shared filesystem with POSIX
  locks), blocking or not; :func:`is_locked` asks whether a live process holds one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path | str) -> None:
    """Flush a file's or a directory's data to disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally it is renamed over ``path``.

    The parent directory is created. On an exception (or a kill) ``path`` keeps its old content (or stays
    absent) and the temporary file is removed. The file gets the usual mode (``0o666 & ~umask``).

    Args:
        durable: fsync the file and its directory, so the rename survives a power loss too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(path: Path | str, *, replace: bool = True, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; when the block ends normally it becomes ``path``.

    Args:
        replace: an existing ``path`` is replaced (moved aside, then removed); with ``replace=False`` an
            existing ``path`` (another process renamed its copy first) is kept and the new copy discarded.
        durable: fsync the directory and its parent around the rename.

    Raises:
        AtmError: ``path`` exists and is not a directory (checked before anything is written).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        from atm.errors import AtmError

        raise AtmError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if durable:
            fsync(tmp)
        old = None
        if path.exists() and replace:
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.is_dir():
                raise
        if durable:
            fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: Path | str, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its directory) for the block.

    The lock is released when the block ends or the process dies.

    Raises:
        BlockingIOError: ``blocking=False`` and another process holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_locked(path: Path | str) -> bool:
    """True while another process holds :func:`file_lock` on ``path`` (False when ``path`` does not exist)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with file_lock(path, blocking=False):
            return False
    except BlockingIOError:
        return True
