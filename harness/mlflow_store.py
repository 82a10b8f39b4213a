"""The SQLite MLflow store under runs/: built whole or not at all.

MLflow builds a new SQLite store in place (``SqlAlchemyStore.__init__``: when not every table
exists, ``mlflow.store.db.utils._initialize_tables`` creates the initial tables, then runs
~60 alembic migrations, each its own step). A process stopped part-way (Ctrl-C, kill -9), or
two processes migrating one new file at once, leave a file that every later open fails on
(``table ... already exists``). Here the store is built in a temporary file of the same
folder, under an exclusive lock, and renamed into place when whole: a stop at any moment leaves
no store or a whole one, and processes starting together wait for the first to build it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from harness.config import ConfigError

BUILDING = ".building-"  # temporary store files: <store>.building-<pid>
HALF_BUILT = ".half-built"  # where a half-built store left by an older harness is moved


def ensure_store(store: Path) -> None:
    """Makes ``store`` a whole MLflow SQLite store of this MLflow's schema: built when missing
    (once, by whichever process takes the lock first); a half-built one holding no run is moved
    aside and built again. A store of another schema that holds runs is a ConfigError."""
    if store.exists() and _schema_state(store) == "whole":
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(store.parent / f".{store.name}.lock"):
        _remove_leftovers(store)
        if store.exists():
            state = _schema_state(store)
            if state == "whole":
                return  # another process built it while this one waited
            _move_aside_if_empty(store, state)
        _build(store)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on ``lock_path``, released when its holder ends, however it ends
    (the file stays: removing it would let two processes lock two different files)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _latest_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())


def _schema_state(store: Path) -> str:
    """'whole' (this MLflow's schema), 'empty' (no run recorded: nothing to lose), or the
    schema revision found (runs recorded under another MLflow's schema)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            revision = ""
            if "alembic_version" in tables:
                row = db.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else ""
            has_runs = "runs" in tables and db.execute("SELECT 1 FROM runs LIMIT 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # in use by a process writing it: built, whole (stores are
            return "whole"  # only built under other names, then renamed into place)
        raise
    except sqlite3.DatabaseError as exc:  # not a database at all (a torn or foreign file)
        return "empty" if store.stat().st_size == 0 else f"unreadable ({exc})"
    if revision == _latest_revision() and _expected_tables() <= tables:
        return "whole"
    return f"revision {revision or 'none'}" if has_runs else "empty"


def _expected_tables() -> set[str]:
    """The tables MLflow's ``_all_tables_exist`` looks for: every table of its ORM models."""
    from mlflow.store.db import utils  # imports every ORM model, filling Base.metadata

    return set(utils.Base.metadata.tables)


def _move_aside_if_empty(store: Path, state: str) -> None:
    if state != "empty":
        raise ConfigError(
            f"{store} is an MLflow store this MLflow cannot use ({state}; this MLflow needs "
            f"revision {_latest_revision()}). Back it up, then run `mlflow db upgrade "
            f"sqlite:///{store}`, or set paths.runs_dir / tracking.uri to another store."
        )
    aside = store.with_name(store.name + HALF_BUILT)
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{store}{suffix}", f"{aside}{suffix}")
    logging.getLogger("harness").warning(
        "%s was left half-built by an interrupted first start (no runs in it): moved to %s; "
        "building a new one",
        store,
        aside,
    )


def _remove_leftovers(store: Path) -> None:
    """Temporary stores of builds that were stopped (only the lock holder builds)."""
    for path in store.parent.glob(f"{store.name}{BUILDING}*"):
        path.unlink(missing_ok=True)


def _build(store: Path) -> None:
    """MLflow's own schema creation (what SqlAlchemyStore does for a new database), in a
    temporary file that becomes ``store`` only when whole."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables, _verify_schema

    building = store.with_name(f"{store.name}{BUILDING}{os.getpid()}")
    engine = sqlalchemy.create_engine(
        f"sqlite:///{building}",
        creator=lambda: _unsynced(building),
        poolclass=sqlalchemy.pool.NullPool,
    )
    try:
        _initialize_tables(engine)
        _verify_schema(engine)
    except BaseException as exc:
        engine.dispose()
        building.unlink(missing_ok=True)
        if _interrupted(exc):  # a Ctrl-C that a migration's cleanup buried under its own error
            raise KeyboardInterrupt from exc
        raise
    engine.dispose()
    with open(building, "rb+") as built:  # on disk before the rename makes it the store
        os.fsync(built.fileno())
    os.replace(building, store)
    directory = os.open(store.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt is ``exc`` or what it arose from. (Alembic's batch migrations run
    more SQL as their context exits: a Ctrl-C inside one surfaces as SQLAlchemy's
    PendingRollbackError, which would print a traceback and exit 1, not 130.)"""
    seen: BaseException | None = exc
    for _ in range(20):  # a bounded walk down the chain
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _unsynced(path: Path) -> sqlite3.Connection:
    """A connection to the temporary store whose ~120 commits are not each synced to disk
    (~10 s of a first start on a busy disk, ~1 s without): a build stopped part-way is thrown
    away anyway, and the whole file is synced once before it becomes the store. (Set here, not
    in a SQLAlchemy event: an event's weakref callback, run by the garbage collector, is where
    a Ctrl-C would then be swallowed.)"""
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA journal_mode=MEMORY")
    return connection
