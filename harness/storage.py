"""Optuna storages: which one a study uses, opening it, and recognising its failures.

The default is a journal file under runs/ (safe for several processes on one host, unlike
SQLite); ``storage.url`` names any RDB storage, such as PostgreSQL shared by many hosts.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.config import ConfigError, runs_dir
from harness.secrets import first_line, redact_text
from harness.workers import worker_identity

STORAGE_ATTEMPTS = 4  # opening an RDB storage: 0.5 + 1 + 2 s of backoff between tries


def storage_for(cfg: DictConfig, on_stale: Callable[..., None] | None = None) -> Any:
    """Optuna storage: the configured URL, else a journal file under runs/ (safe for several
    processes on one host, unlike SQLite), created if missing. An RDB storage sends heartbeats
    from running trials (storage.heartbeat_s); ``on_stale(study, trial)`` is called for a trial
    whose heartbeat stopped."""
    url = cfg.storage.url
    if is_rdb(url):
        heartbeat = int(cfg.storage.heartbeat_s) or None

        def open_rdb() -> Any:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return OwnedTrialsRDBStorage(
                    str(url),
                    # a connection dropped by a database restart is replaced, not used
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat,
                    grace_period=int(cfg.storage.grace_s) if heartbeat else None,
                    heartbeat_stale_trial_callback=on_stale if heartbeat else None,
                )

        # Workers starting together on an empty database race to create Optuna's tables: the
        # loser retries and finds them made.
        return _with_retries(str(url), open_rdb)
    path = journal_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    return OwnedTrialsJournalStorage(TrialSyncedJournal(str(path)))


# Who runs a RUNNING trial, so that one left by a dead process is recognised (harness.study's
# _fail_stale_trials). The owner must be written in the same storage write that makes the trial
# RUNNING: a process killed between Optuna's ask and a later set_user_attr left a trial that no
# rule could call stale, and every resume then ended one trial short. A new trial is created
# with its "worker" attr in its creating write (one journal line; one RDB transaction). A
# waiting trial (a retry, a warm start) becomes RUNNING in a write of Optuna's own, so each
# process first leaves a claim on it (a key of its own: processes racing for the same trial do
# not overwrite each other's): while the "worker" attr is missing, the trial is one of its
# claimers', and stale once every claimer is dead. Liveness is a pid on this host; a trial of
# another host is judged by its heartbeats (RDB storages; storage.heartbeat_s).
WORKER_ATTR = "worker"
CLAIM_PREFIX = "harness_claim:"


def _owned_template() -> optuna.trial.FrozenTrial:
    """What Optuna's ask creates (a RUNNING trial, started now), with its owner."""
    return optuna.trial.FrozenTrial(
        number=-1,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={WORKER_ATTR: worker_identity()},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )


class _OwnedTrials:
    """Mixin of an Optuna storage: every trial this process makes RUNNING names it as owner."""

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        if state != optuna.trial.TrialState.RUNNING:  # only a waiting trial is popped to it
            return bool(super().set_trial_state_values(trial_id, state, values))  # type: ignore[misc]
        me = worker_identity()
        try:  # the claim first: a kill right after the pop must leave an owner to check
            self.set_trial_user_attr(  # type: ignore[attr-defined]
                trial_id, f"{CLAIM_PREFIX}{me['host']}:{me['pid']}", me
            )
        except (RuntimeError, ValueError):  # another process popped and finished it meanwhile
            return False
        if not super().set_trial_state_values(trial_id, state, values):  # type: ignore[misc]
            return False  # another process popped it first
        self.set_trial_user_attr(trial_id, WORKER_ATTR, me)  # type: ignore[attr-defined]
        return True


class OwnedTrialsJournalStorage(_OwnedTrials, optuna.storages.JournalStorage):
    def create_new_trial(
        self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None
    ) -> int:
        return super().create_new_trial(study_id, template_trial or _owned_template())


class OwnedTrialsRDBStorage(_OwnedTrials, optuna.storages.RDBStorage):
    # Optuna's cache in front of an RDB storage creates trials through this private method
    def _create_new_trial(
        self, study_id: int, template_trial: optuna.trial.FrozenTrial | None = None
    ) -> optuna.trial.FrozenTrial:
        return super()._create_new_trial(study_id, template_trial or _owned_template())


# Optuna journal operations (optuna.storages.journal._storage.JournalOperation) synced to disk
# as they are written: the study's own, a trial's creation and its end (state and values).
SYNCED_OPS = frozenset({0, 1, 2, 3, 4, 6, 10})


class TrialSyncedJournal(optuna.storages.journal.BaseJournalBackend):
    """Optuna's journal file, written as JournalFileBackend writes it (same lock, same lines),
    but synced to disk (fsync: up to ~1.5 ms each on a busy disk here) only for SYNCED_OPS, not
    for a trial's params, reported values and attributes: 2 syncs a trial instead of ~18. A
    sync also carries every write before it to the disk. A crashed process loses nothing (its
    writes are in the OS's cache, which writes them out within ~30 s); a power cut may lose
    what the trials then running wrote since, and a resume fails and retries those anyway.

    An append never leaves a part of a line behind: one that fails (a full disk) is cut back
    to the last whole line, and a torn last line left by a process stopped mid-write is cut
    before the next append. Optuna's reader skips a torn last line, but a line appended after
    it would join it into one that is not JSON, and every later read would fail on it."""

    def __init__(self, path: str) -> None:
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        self._file = JournalFileBackend(path)  # reads; creates the file
        self._path = path
        self._lock = JournalFileSymlinkLock(path)  # the lock JournalFileBackend takes

    def read_logs(self, log_number_from: int) -> Any:
        from optuna.storages.journal import JournalFileBackend

        try:  # whole, before Optuna applies any: a failed read applies none
            return list(self._file.read_logs(log_number_from))
        except ValueError:  # JSONDecodeError: a line an older harness joined to a torn one
            self._lock.acquire()
            try:
                repair_joined_lines(Path(self._path))
            finally:
                self._lock.release()
            self._file = JournalFileBackend(self._path)  # its line offsets are stale now
            return list(self._file.read_logs(log_number_from))

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        sync = any(log["op_code"] in SYNCED_OPS for log in logs)
        self._lock.acquire()
        try:
            journal = os.open(self._path, os.O_RDWR | os.O_APPEND)
            try:
                _append_whole(journal, lines.encode("utf-8"), sync, self._path)
            finally:
                os.close(journal)
        finally:
            self._lock.release()


def _append_whole(journal: int, data: bytes, sync: bool, path: str) -> None:
    """Appends ``data`` (whole lines) to the open journal, which the caller has locked: all of
    it, or none of it."""
    end = _cut_torn_line(journal, path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(journal, view) :]
    except BaseException:  # a full disk, Ctrl-C: back to the last whole line
        with contextlib.suppress(OSError):  # else the next append cuts it
            os.ftruncate(journal, end)
        raise
    if sync:  # written whole: other processes may have read it already, so it stays
        os.fsync(journal)


RECORD_START = b'{"op_code":'  # how every journal line begins (Optuna's json.dumps of a log)


def repair_joined_lines(path: Path) -> None:
    """Repairs a journal in which a record was appended after a torn last line (older
    harness versions did, after a full disk): each such line is the torn part, never written
    whole, then a whole record, which is kept. The original is kept beside it (.damaged).
    A line that is not of that kind is a ConfigError naming it."""
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    repaired = 0
    for number, line in enumerate(lines):
        if not line.endswith(b"\n"):
            continue  # a torn last line: the next append cuts it
        try:
            json.loads(line)
            continue
        except ValueError:
            pass
        start = line.rfind(RECORD_START)
        try:
            json.loads(line[start:])
        except ValueError:
            start = -1
        if start <= 0:
            raise ConfigError(
                f"{path}:{number + 1}: not a whole Optuna journal record; restore the journal "
                "from a backup, or delete that line to lose only what it recorded"
            ) from None
        lines[number] = line[start:]
        repaired += 1
    if not repaired:
        return
    damaged = path.with_name(path.name + ".damaged")
    damaged.write_bytes(original)
    fresh = path.with_name(path.name + ".repairing")
    with open(fresh, "wb") as file:
        file.write(b"".join(lines))
        file.flush()
        os.fsync(file.fileno())
    os.replace(fresh, path)
    logging.getLogger("harness").warning(
        "%s: repaired %d line(s) where a record was appended to a torn one; the journal as it "
        "was is kept in %s",
        path,
        repaired,
        damaged,
    )


def _cut_torn_line(journal: int, path: str) -> int:
    """The journal's size once a torn last line (no newline: its writer was stopped
    mid-write) is cut off."""
    size = os.fstat(journal).st_size
    if size == 0 or os.pread(journal, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:  # back to the last newline, a block at a time
        start = max(0, end - 65536)
        found = os.pread(journal, end - start, start).rfind(b"\n")
        if found >= 0:
            end = start + found + 1
            break
        end = start
    os.ftruncate(journal, end)
    logging.getLogger("harness").warning(
        "%s: cut a torn last line (%d bytes) left by a write that was stopped midway",
        path,
        size - end,
    )
    return end


def existing_study(cfg: DictConfig) -> optuna.Study | None:
    """The study ``cfg.name`` if its storage already holds it, else None. Creates nothing: no
    journal file, no SQLite file, no database table (every check of a sweep runs before the
    first write). An unreachable database is a ConfigError, as in ``storage_for``. (The one
    write it may make: a journal damaged by an older harness is repaired as it is read, its
    original kept beside it; see ``repair_joined_lines``.)"""
    storage = _existing_storage(cfg)
    if storage is None:
        return None
    try:
        return optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        return None


def _existing_storage(cfg: DictConfig) -> Any:
    from optuna.storages import JournalStorage

    if not storage_exists(cfg):
        return None
    url = cfg.storage.url
    if not is_rdb(url):  # read as a sweep reads it: a damaged one is repaired
        return JournalStorage(TrialSyncedJournal(str(journal_path(cfg))))
    return _with_retries(
        str(url), lambda: optuna.storages.RDBStorage(str(url), skip_table_creation=True)
    )


def storage_exists(cfg: DictConfig) -> bool:
    """Whether the study's storage has been made (a journal file; a database with Optuna's
    tables). Creates nothing; an unreachable database is a ConfigError, as in ``storage_for``."""
    url = cfg.storage.url
    if not is_rdb(url):
        return journal_path(cfg).exists()
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(str(url))
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or not Path(database).exists():
            return False

    def has_tables() -> bool:
        engine = sqlalchemy.create_engine(str(url))
        try:  # an empty database: Optuna makes its tables on first write
            return bool(sqlalchemy.inspect(engine).has_table("studies"))
        finally:
            engine.dispose()

    return bool(_with_retries(str(url), has_tables))


def _with_retries(url: str, connect: Callable[[], Any]) -> Any:
    """``connect()``, tried STORAGE_ATTEMPTS times with backoff: an unreachable database is one
    clear error, not a traceback."""
    attempt = 0
    while True:
        try:
            return connect()
        except Exception as exc:
            attempt += 1
            if isinstance(exc, ImportError) or attempt == STORAGE_ATTEMPTS:
                raise ConfigError(
                    f"cannot open the Optuna storage {redact_text(url)}: "
                    f"{type(exc).__name__}: {first_line(exc)[:300]}. Check "
                    "storage.url, that the database server is up and reachable, and its driver "
                    "is installed."
                ) from None
            time.sleep(0.5 * 2 ** (attempt - 1))


def is_rdb(url: Any) -> bool:
    """A database URL (sqlite:, postgresql:, ...), not a journal file path."""
    return bool(url) and not str(url).endswith((".log", ".journal"))


def journal_path(cfg: DictConfig) -> Path:
    url = cfg.storage.url
    return Path(url) if url else runs_dir(cfg) / "optuna" / f"{cfg.name}.log"


def describe_storage(cfg: DictConfig) -> str:
    return redact_text(str(cfg.storage.url or journal_path(cfg)))


class StorageGoneError(ConfigError):
    """The study's Optuna storage stopped answering (a database down, a disk gone)."""


def storage_error(exc: BaseException) -> BaseException | None:
    """The database or file error raised inside Optuna's storage code that ``exc`` is, or
    arose from (Optuna may re-raise its own error on top), if any. Errors of a trial's own code
    never get here: Optuna catches them per trial."""
    seen: BaseException | None = exc
    for _ in range(10):  # a bounded walk down the chain
        if seen is None:
            return None
        kind = type(seen).__module__.startswith("sqlalchemy") or isinstance(seen, OSError)
        frames = traceback.extract_tb(seen.__traceback__)
        if kind and any("optuna/storages" in f.filename.replace("\\", "/") for f in frames):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class DiskFullError(ConfigError):
    """A disk the study writes to is full: the study stops (every next write would fail too)."""


def full_disk(exc: BaseException) -> BaseException | None:
    """The out-of-space error ``exc`` is or arose from, if any: an OSError ENOSPC (or EDQUOT,
    a quota), or SQLite's SQLITE_FULL as SQLAlchemy or MLflow re-raise it (in their text)."""
    seen: BaseException | None = exc
    for _ in range(10):  # a bounded walk down the chain
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        text = str(seen)
        if "database or disk is full" in text or "No space left on device" in text:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full_error(place: Path, cause: BaseException) -> DiskFullError:
    """One message for a full disk: what is full, what to do, and that the command resumes."""
    where = getattr(cause, "filename", None) or place
    return DiskFullError(
        f"the disk holding {where} is full ({type(cause).__name__}: "
        f"{first_line(cause)[:200]}). The study stopped; finished trials are kept. Free "
        f"space there (`df -h {place}` shows it), then run the same command again: it resumes."
    )


@contextlib.contextmanager
def stopped_by_full_disk(place: Path) -> Iterator[None]:
    """Turns a full disk met anywhere inside (opening the stores too) into DiskFullError's
    one message; ``place``: the folder whose disk it most likely is (runs/)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        full = full_disk(exc)
        if full is None:
            raise
        raise disk_full_error(place, full) from exc
