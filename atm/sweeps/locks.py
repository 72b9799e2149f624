"""Cross-process (and cross-machine) locks keyed by name, held in the Optuna storage's database.

Several sweep workers share one Optuna RDB storage; whatever must happen once per study (asking for the
last trial of the budget, creating the MLflow parent run, training a missing teacher) happens under
:func:`storage_lock`:

* PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a dedicated connection, so it works
  across machines and is released by the server when the holder dies (SIGKILL, lost machine);
* SQLite: an exclusive ``flock`` on a file next to the database file (:func:`atm.files.file_lock`; one
  machine, or a shared filesystem with working POSIX locks), released by the kernel when the holder dies;
* anything else: no lock; a warning says so once (no storage at all, an in-memory study, has one worker by
  construction: no lock and no warning).

:func:`store_lock` does the same for an MLflow tracking store's URI (its schema and experiment are created once,
under it, by :func:`atm.tracking.configure`); a tracking server or a file store needs none.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from atm.files import file_lock

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def lock_id(key: str) -> int:
    """A signed 64-bit integer for ``key`` (PostgreSQL advisory locks take a ``bigint``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def backend(url: str | None) -> str:
    """``postgresql``, ``sqlite`` or another SQLAlchemy backend name; ``none`` for no URL."""
    if not url:
        return "none"
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name()


@contextmanager
def storage_lock(url: str | None, key: str) -> Iterator[None]:
    """Hold an exclusive lock named ``key`` in the database at SQLAlchemy ``url`` (blocks until free).

    Raises:
        sqlalchemy.exc.OperationalError: the PostgreSQL server cannot be reached.
        FileNotFoundError: the directory of the SQLite database file does not exist.
    """
    kind = backend(url)
    if kind == "postgresql":
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": lock_id(key)})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id(key)})
                    conn.commit()
        finally:
            engine.dispose()
        return
    if kind == "sqlite":
        db = sqlite_file(url)
        if db is not None:
            db = db.resolve()
            path = db.parent / f".{db.name}.locks" / f"{lock_id(key) & 0xFFFFFFFFFFFFFFFF:016x}.lock"
            path.parent.mkdir(exist_ok=True)  # FileNotFoundError when the database's directory is missing
            with file_lock(path):
                yield
            return
    if kind != "none" and kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("no cross-process lock for storage backend %r: run one sweep worker at a time", kind)
    yield


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (``sqlite:///optuna.db`` -> ``optuna.db``, relative to the working
    directory); None for an in-memory database or another backend.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a SQLAlchemy URL.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    return Path(db) if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" else None


def absolute_url(url: str | None) -> str | None:
    """``url`` with a relative SQLite database path made absolute (from the working directory); others unchanged.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a SQLAlchemy URL.
    """
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not os.path.isabs(db):
        parsed = parsed.set(database=os.path.abspath(db))
    return parsed.render_as_string(hide_password=False)


#: MLflow tracking URI schemes that are SQLAlchemy databases (``mlflow.store.db.db_types``).
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@contextmanager
def store_lock(uri: str, key: str) -> Iterator[None]:
    """Hold an exclusive lock named ``key`` for the MLflow tracking store ``uri``: :func:`storage_lock` in the
    store's own database (SQLite: a file lock next to the file; PostgreSQL: an advisory lock); no lock for a
    tracking server (``http(s)://``, it creates its schema once itself) or a file store.

    Raises:
        sqlalchemy.exc.OperationalError: the PostgreSQL server cannot be reached.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in _DB_SCHEMES:
        yield
        return
    with storage_lock(uri, key):
        yield
