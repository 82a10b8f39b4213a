"""A trial run's MLflow writes, made in order by a writer process beside the sweep.

Why: MLflow's SQLite store spends ~4 ms of Python per request (sessions, ORM, reloading the
run) and a trial makes five (create, params, dataset inputs, final metrics and tags, end):
most of what harness added to a trial (benchmarks/overhead.py). The run is still created in
the sweep's process (its id names the run's artifacts and the Optuna trial's
``mlflow_run_id``); everything after that is sent down a pipe to a writer process the sweep
forked, which makes the requests on another core while the next trial trains, a run's waiting
writes in one request.

What stays true:
- Order: the writer makes a process's writes in the order they were sent, so a run is closed
  after its last metrics, as before. Every other request the tracker makes (``MLflowTracker``'s
  ``client``) first waits until the writer has made everything sent so far (``sync``).
- A run's duration is its trial's: its end time is taken when the trial ends, not when the
  writer gets to it.
- A kill of the sweep's process loses nothing it sent: the writer ignores Ctrl-C and SIGTERM,
  runs in its own session (a signal to the sweep's process group does not reach it), and at
  the end of its input (the sweep ended or was killed) makes what is left, then exits. A sweep
  starting on the same store, and the recovery of trials whose process died, first wait for
  the writers of ended sweeps (``wait_for_ended_writers``); a run whose sweep is alive and
  writing through a writer is left for that sweep to close (``writer_alive``).
- Lost writes are repaired by the next sweep: those of a writer killed itself (SIGKILL, the
  OOM killer, a whole process group or container stopped) and a request MLflow refused (a full
  disk, a read-only store: said on stderr; the next trial's run, created in the sweep's
  process, meets the same failure and stops the study as before, but the trial whose writes
  failed stays COMPLETE in Optuna). It closes the runs left RUNNING and logs a completed
  trial's final metrics from Optuna (records.missing_finals).
- A writer that died is noticed at the next write: the sweep says so and makes its writes
  itself from then on.

Used for the local SQLite store only, on Linux, in a process that has not opened the store yet
(``DeferredClient.start``): a tracking server's requests (and their time-outs) stay in the
sweep's process, where harness.tracking.server guards them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import itertools
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from harness.secrets import redact_text
from harness.tracking.sqlite_store import open_in_this_process
from harness.workers import alive

ENDED_WRITER_WAIT_S = 120.0  # a writer of an ended sweep has this long to make what it was sent
CLOSE_WAIT_S = 600.0  # what the sweep's process waits at its exit for its writer to finish
_HEADER = struct.Struct("<I")
PIPE_BYTES = 1 << 20  # the most Linux allows an unprivileged process by default
_WRITERS = itertools.count()  # this process's writers, for their lock files' names


def writers_folder(store: Path) -> Path:
    """Where the writers of the SQLite store ``store`` keep their lock files."""
    return store.with_name(store.name + "-writers")


class DeferredClient:
    """The part of MLflow's client a trial run uses after its creation, sent to a writer
    process instead of made here."""

    def __init__(self, uri: str, store: Path) -> None:
        self.tracking_uri = uri
        self.store = store
        self.pid = 0  # the writer's, while it runs
        self.to_writer = -1  # the pipe's ends: the writes in, the writer's acknowledgements out
        self.acks = -1
        self.in_place: Any = None  # an MlflowClient, once the writer died
        self.syncs = 0  # syncs sent: the writer acknowledges each with its number

    @classmethod
    def start(cls, uri: str, store: Path) -> DeferredClient | None:
        """A writer for the SQLite store ``store`` (at ``uri``), forked now; None (writes made
        in place) off Linux, or where this process holds a connection to the store already (a
        forked child could then corrupt it: a process that runs several sweeps on one store,
        such as a test)."""
        if not sys.platform.startswith("linux") or open_in_this_process(store):
            return None  # (macOS: a forked child of a process using its frameworks may crash)
        client = cls(uri, store)
        client._start()
        return client

    def log_batch(
        self,
        run_id: str,
        metrics: Iterable[Any] = (),
        params: Iterable[Any] = (),
        tags: Iterable[Any] = (),
    ) -> None:
        self._send(("log_batch", run_id, list(metrics), list(params), list(tags)))

    def log_inputs(self, run_id: str, datasets: list[Any]) -> None:
        self._send(("log_inputs", run_id, datasets))

    def set_terminated(self, run_id: str, status: str) -> None:
        # the run ends now, not when the writer gets to it: its duration is the trial's
        self._send(("set_terminated", run_id, status, int(time.time() * 1000)))

    def sync(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Returns once the writer has made every write sent so far. (An earlier sync cut short
        by Ctrl-C or its time-out left its acknowledgement behind: numbered, it is skipped.)"""
        if not self.pid:
            return
        self.syncs += 1
        self._send(("sync", self.syncs))
        deadline = time.monotonic() + timeout_s
        while self.pid:  # else it had died: the writes are made here now
            if not _readable(self.acks, deadline - time.monotonic()):
                raise RuntimeError(
                    f"the MLflow writer process (pid {self.pid}) did not finish its writes in "
                    f"{timeout_s:.0f} s"
                )
            ack = _read_exact(self.acks, _HEADER.size)
            if ack is None:  # it died before it got there
                self._lost()
            elif _HEADER.unpack(ack)[0] == self.syncs:
                return

    def close(self) -> None:
        """Ends the writer's input and waits for it to make what is left (bounded: past that, it
        goes on alone, and the next sweep on the store waits for it). No write can follow."""
        pid, self.pid = self.pid, 0
        if not pid:
            return
        os.close(self.to_writer)
        self.to_writer = -1
        deadline = time.monotonic() + CLOSE_WAIT_S
        try:  # its end closes the acknowledgements' pipe
            ready = _readable(self.acks, CLOSE_WAIT_S)
            while ready and os.read(self.acks, 4096):
                ready = _readable(self.acks, deadline - time.monotonic())
        finally:
            self._close_pipe()
        if not ready:
            print(
                f"harness: the MLflow writer (pid {pid}) is still writing; it goes on alone",
                file=sys.stderr,
            )
            return
        status = 0
        with contextlib.suppress(ChildProcessError):
            status = os.waitpid(pid, 0)[1]  # it has ended: no wait
        if status:  # killed, say: what it had not made is lost
            how = (
                f"killed by signal {os.WTERMSIG(status)}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.WEXITSTATUS(status)}"
            )
            _say(
                f"harness: the MLflow writer process (pid {pid}) ended before its last writes "
                f"({how}); the next sweep closes the runs it left open"
            )

    def _start(self) -> None:
        folder = writers_folder(self.store)
        folder.mkdir(parents=True, exist_ok=True)
        writes_out, writes_in = os.pipe()
        acks_out, acks_in = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: room for ~100 trials' writes
            fcntl.fcntl(writes_in, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        # Locked before the fork: the writer holds the lock from its first moment (the lock
        # belongs to the open file, which the child keeps and this process closes).
        lock = folder / f"{os.getpid()}-{next(_WRITERS)}.lock"
        held = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
        fcntl.flock(held, fcntl.LOCK_EX)
        # Forked, not a new interpreter: MLflow's import (~2 s of CPU) is done already. The
        # child uses none of this process's threads or connections.
        gc.freeze()  # the child's collector leaves what it inherited alone (and shared)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
                pid = os.fork()
        finally:
            if pid != 0:
                gc.unfreeze()
        if pid == 0:
            code = 1
            try:
                os.close(writes_in)
                os.close(acks_out)
                code = serve(self.tracking_uri, lock, held, writes_out, acks_in)
            except BaseException:
                _say(f"harness: the MLflow writer stopped: {traceback.format_exc()[-2000:]}")
            finally:
                os._exit(code)
        for fd in (held, writes_out, acks_in):
            os.close(fd)
        self.pid, self.to_writer, self.acks = pid, writes_in, acks_out
        _LIVE.add(self)
        atexit.register(self.close)

    def _forget_in_child(self) -> None:
        """In a process forked from the sweep's (a data loader's worker, a next writer): this
        writer is not its own; its pipe's ends closed, so the writer still ends with the sweep."""
        self._close_pipe()
        self.pid = 0

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.in_place is not None:
            _make_now(self.in_place, message)
            return
        if not self.pid:  # forking again now could corrupt the store (see start)
            raise RuntimeError("a trial run's write after its tracker's close_writes()")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = memoryview(_HEADER.pack(len(data)) + data)
        try:
            with _signals_held():  # a frame cut in half by Ctrl-C would garble every next one
                while frame:
                    frame = frame[os.write(self.to_writer, frame) :]
        except OSError:  # it died (killed)
            self._lost()
            self._send(message)

    def _lost(self) -> None:
        """The writer died (killed, say): the sweep makes its writes itself from here on. What
        the writer had not made is lost; the next sweep closes the runs it left open."""
        from mlflow.tracking import MlflowClient

        _say(
            f"harness: the MLflow writer process (pid {self.pid}) ended; this sweep makes its "
            "MLflow writes itself from here on (runs it left open are closed by the next sweep)"
        )
        self._close_pipe()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)  # it has ended
        self.pid = 0
        self.in_place = MlflowClient(self.tracking_uri)

    def _close_pipe(self) -> None:
        """Closes this process's ends of the pipe (their numbers may be reused at once)."""
        _LIVE.discard(self)
        for fd in (self.to_writer, self.acks):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.to_writer = self.acks = -1


_LIVE: weakref.WeakSet[DeferredClient] = weakref.WeakSet()  # this process's running writers


def _forget_writers_in_child() -> None:
    for client in list(_LIVE):
        client._forget_in_child()
    _LIVE.clear()


os.register_at_fork(after_in_child=_forget_writers_in_child)


def _readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` has something to read (or its end) within ``timeout_s``."""
    poller = select.poll()  # not select(): file descriptors above 1023
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends (then delivered), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def wait_for_ended_writers(store: Path, timeout_s: float = ENDED_WRITER_WAIT_S) -> None:
    """Waits for the writers of sweeps that ended (killed, say) to finish what they were sent,
    so that runs they are about to close are not closed a second time. A running sweep's
    writer (its process alive, this one too) is left alone: its runs are its own."""
    folder = writers_folder(store)
    if not folder.is_dir():
        return
    deadline = time.monotonic() + timeout_s
    for lock in sorted(folder.glob("*.lock")):
        owner = lock.name.split("-", 1)[0]
        if owner.isdigit() and alive(int(owner)):
            continue
        try:
            handle = lock.open("rb")
        except FileNotFoundError:  # it finished a moment ago
            continue
        with handle:
            while True:  # a writer drains in milliseconds to seconds; bounded all the same
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        _say(
                            f"harness: the MLflow writer of an ended sweep ({lock.name}) is "
                            f"still writing after {timeout_s:.0f} s; going on without it"
                        )
                        return
                    time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):  # its writer was killed before removing it
            lock.unlink()


def writer_alive(store: Path, owner: int) -> bool:
    """Whether process ``owner`` of this host is alive and has a writer on ``store``: its runs
    may be RUNNING a moment after their trials ended, and are its own to close."""
    return alive(owner) and any(writers_folder(store).glob(f"{owner}-*.lock"))


def _say(text: str) -> None:
    """A line on stderr, by the file descriptor: the forked writer takes no lock the sweep's
    threads might have held when it was forked."""
    with contextlib.suppress(OSError):
        os.write(2, (text.rstrip() + "\n").encode("utf-8", "replace"))


def _read_exact(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None  # the end of the input (a frame cut short by a kill: dropped)
        data += chunk
    return data


def _read_waiting(fd: int) -> list[tuple[Any, ...]] | None:
    """The next message, and every other already waiting in the pipe (so that a run's writes
    sent while the writer was busy go in one request); None at the end of the input."""
    messages: list[tuple[Any, ...]] = []
    while not messages or (len(messages) < 1000 and _readable(fd, 0)):
        header = _read_exact(fd, _HEADER.size)
        data = _read_exact(fd, _HEADER.unpack(header)[0]) if header else None
        if data is None:
            return messages or None
        messages.append(pickle.loads(data))
    return messages


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)] or [[]]


class _RunWrites:
    """One run's writes waiting together: its params, metrics and tags in as few log_batch
    requests as MLflow's limits allow (1000 metrics, 100 params, 100 tags), its dataset inputs,
    then its end. Should a merged request be refused, each write is tried alone, so one bad
    value costs no more than it did in place; the end is made whatever failed before it."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, ...]] = []
        self.metrics: list[Any] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}  # the last value of a tag set twice wins, as it would
        self.inputs: list[Any] = []
        self.end: tuple[str, int] | None = None

    def add(self, message: tuple[Any, ...]) -> None:
        operation, _run_id, *args = message
        if operation == "log_batch":
            metrics, params, tags = args
            self.metrics += metrics
            self.params.update((p.key, p) for p in params)
            self.tags.update((t.key, t) for t in tags)
            self.messages.append(message)
        elif operation == "log_inputs":
            self.inputs.append(args[0])
        elif operation == "set_terminated":
            self.end = (args[0], args[1])
        else:
            raise ValueError(f"unknown write {operation!r}")

    def make(self, client: Any, run_id: str) -> list[Exception]:
        """Makes the writes; returns what failed."""
        from harness.tracking.mlflow_client import retried

        failed: list[Exception] = []
        try:
            for metrics, params, tags in self._merged():
                retried(lambda: client.log_batch(run_id, metrics, params, tags))  # noqa: B023
        except Exception:
            for _, _, metrics, params, tags in self.messages:  # one at a time, in order
                try:
                    retried(lambda: client.log_batch(run_id, metrics, params, tags))  # noqa: B023
                except Exception as exc:
                    failed.append(exc)
        for datasets in self.inputs:
            try:
                retried(lambda: client.log_inputs(run_id, datasets=datasets))  # noqa: B023
            except Exception as exc:
                failed.append(exc)
        if self.end is not None:
            try:
                client.set_terminated(run_id, *self.end)
            except Exception as exc:
                failed.append(exc)
        return failed

    def _merged(self) -> list[tuple[list[Any], list[Any], list[Any]]]:
        batches: Iterable[tuple[list[Any], list[Any], list[Any]]] = itertools.zip_longest(
            _chunks(self.metrics, 1000),
            _chunks(list(self.params.values()), 100),
            _chunks(list(self.tags.values()), 100),
            fillvalue=[],
        )
        return [batch for batch in batches if any(batch)]


def _make_now(client: Any, message: tuple[Any, ...]) -> None:
    """One write made in the sweep's process (the writer died), its error raised as in place."""
    if message[0] == "sync":
        return
    writes = _RunWrites()
    writes.add(message)
    failed = writes.make(client, message[1])
    if failed:
        raise failed[0]


def _make(client: Any, messages: list[tuple[Any, ...]]) -> None:
    """Makes ``messages`` (no sync among them) by run, each run's in one go; says what failed."""
    runs: dict[str, _RunWrites] = {}
    for message in messages:
        runs.setdefault(message[1], _RunWrites()).add(message)
    for run_id, writes in runs.items():
        for exc in writes.make(client, run_id):
            _say(
                f"harness: an MLflow write of run {run_id} failed: "
                f"{redact_text(f'{type(exc).__name__}: {exc}')[:500]}"
            )


def serve(uri: str, lock: Path, held: int, writes: int, acks: int) -> int:
    """The writer (a forked child of the sweep's process): the writes read from the file
    descriptor ``writes``, made in order until its end; each sync acknowledged on ``acks``
    with its number; ``lock`` held (open as ``held``) until then."""
    from mlflow.tracking import MlflowClient

    for number in (signal.SIGINT, signal.SIGTERM):  # it stops at the end of its input
        signal.signal(number, signal.SIG_IGN)
    os.setsid()  # a signal to the sweep's process group is not for it
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no thread of its own to start
    _keep_only_fds(held, writes, acks)
    client: Any = None
    acknowledging = True  # until the sweep is gone: then it only makes what is left
    while (messages := _read_waiting(writes)) is not None:
        pending: list[tuple[Any, ...]] = []
        for message in messages:
            if message[0] != "sync":
                pending.append(message)
                continue
            if pending:
                client = client or MlflowClient(uri)  # not before there is work (~0.5 s)
                _make(client, pending)
                pending = []
            if acknowledging:
                try:
                    os.write(acks, _HEADER.pack(message[1]))
                except OSError:  # the sweep's process died while it waited
                    acknowledging = False
        if pending:
            client = client or MlflowClient(uri)
            _make(client, pending)
    with contextlib.suppress(FileNotFoundError):  # before the lock is let go (at exit): a
        lock.unlink()  # waiter that gets it finds the writer done
    return 0


def _keep_only_fds(*keep: int) -> None:
    """Lets go of what the writer inherited but must not hold open (a server's socket, a pipe
    a caller reads to its end), stderr kept: each is made /dev/null rather than closed, so that
    no number is reused under an inherited object that may close it."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in sorted(set(_open_fds()) - {2, null, *keep}):
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the usual range
        return list(range(1024))
