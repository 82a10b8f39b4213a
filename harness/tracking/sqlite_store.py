"""The local SQLite MLflow store: checked writable before a study starts, and written in WAL
mode (fewer waits on the disk per trial)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from harness.secrets import redact_text
from harness.tracking.server import TrackingServerError


def check_store_writable(uri: str) -> None:
    """An existing SQLite MLflow store must take writes before a study starts: a read-only file
    (or folder, where SQLite keeps its write-ahead log) would fail every trial in a row. The file
    is opened for writing and closed, nothing written (SQLite itself would quietly open a
    write-protected file read-only and fail only at the first write)."""
    if not uri.startswith("sqlite:///"):
        return
    store = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not store.is_file():
        return  # created by the first run, in a folder harness makes
    try:
        with store.open("r+b"):
            pass
        if not os.access(store.parent, os.W_OK):
            raise PermissionError(f"its folder {store.parent} is read-only")
    except OSError as exc:
        problem = exc.strerror if exc.filename and exc.strerror else str(exc)
        raise TrackingServerError(unwritable_store_message(uri, problem)) from None


def unwritable_store_message(uri: str, problem: str) -> str:
    store = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return (
        f"the MLflow store {redact_text(store)} cannot be written ({redact_text(problem)}). "
        "Make the file and its folder writable by this user (e.g. chmod u+w), or point "
        "tracking.uri at another store; then run the same command again: it resumes."
    )


# MLflow SQLite store files of this process whose connections get fast_sqlite_writes' pragmas
_FAST_STORES: set[str] = set()
# SQLite files (real paths) -> connections SQLAlchemy holds open to them in this process
_OPEN: Counter[str] = Counter()
_FILE_OF: dict[int, str] = {}  # id of an open connection -> its file


def fast_sqlite_writes(store: Path) -> None:
    """Opens the SQLite MLflow store at ``store`` in WAL mode with synchronous=NORMAL: a commit
    then appends to the write-ahead log without waiting for the disk, about 3x fewer ms of
    writes per trial (FACTS.md). The store stays consistent after a crash; a power cut may lose
    the last commits. WAL needs every writer on one host (not on NFS), as SQLite does anyway.

    journal_mode=WAL persists in the file; synchronous is per connection, so both are set as
    each connection opens (_on_connect, for every engine: MLflow makes its engine inside its
    store), on connections to these files alone, so an Optuna SQLite storage in the same
    process is left as it is."""
    _listen()
    _FAST_STORES.add(os.path.realpath(store))


def open_in_this_process(store: Path) -> bool:
    """Whether this process holds a connection to the SQLite file ``store`` (through
    SQLAlchemy, as MLflow's store does) since harness.tracking was imported. A process forked
    while it holds one must not use SQLite on that file (SQLite's "how to corrupt": a child
    inherits the parent's locks' bookkeeping)."""
    _listen()
    return _OPEN[os.path.realpath(store)] > 0


def _listen() -> None:
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "connect", _on_connect):
        event.listen(Pool, "connect", _on_connect)
        event.listen(Pool, "close", _on_close)
        event.listen(Pool, "close_detached", _on_close_detached)


def _on_connect(connection: Any, _record: Any) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return
    files = {row[1]: row[2] for row in connection.execute("PRAGMA database_list")}
    if not files.get("main"):
        return  # in memory
    path = os.path.realpath(files["main"])
    _OPEN[path] += 1
    _FILE_OF[id(connection)] = path
    if path not in _FAST_STORES:
        return
    mode = ""
    with contextlib.suppress(sqlite3.OperationalError):  # another process holds it: next time
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode == "wal":  # NORMAL is safe from corruption in WAL mode only
        connection.execute("PRAGMA synchronous=NORMAL")


def _on_close(connection: Any, _record: Any) -> None:
    _on_close_detached(connection)


def _on_close_detached(connection: Any) -> None:
    path = _FILE_OF.pop(id(connection), None)
    if path is not None:
        _OPEN[path] -= 1


_listen()  # from the start: a connection opened before would go uncounted
