"""A trial run's MLflow writes, made in order by a writer process beside the sweep.

Why: MLflow's SQLite store spends ~4 ms of Python per request (sessions, ORM, reloading the
run) and a trial makes five (create, params, dataset inputs, final metrics and tags, end):
about two thirds of what harness added to a trial (benchmarks/overhead.py). The run is still
created in the sweep's process (its id names the run's artifacts and the Optuna trial's
``mlflow_run_id``); everything after that is sent down a pipe to the writer, which makes the
requests on another core while the next trial trains.

What stays true:
- Order: the writer makes a process's writes in the order they were sent, so a run is closed
  after its last metrics, as before. Every other request the tracker makes (``MLflowTracker``'s
  ``client``) first waits until the writer has made everything sent so far (``sync``).
- Nothing sent is lost when the sweep's process dies: the writer ignores Ctrl-C and SIGTERM,
  runs in its own session (a signal to the sweep's process group does not reach it), and at
  the end of its input (the sweep ended or was killed) makes what is left, then exits. A sweep
  starting on the same store first waits for the writers of ended sweeps to finish
  (``wait_for_ended_writers``), so it never closes a run their writes would close too.
- A write that fails (a full disk, a read-only store) is reported on stderr; the next trial's
  run, created in the sweep's process, meets the same failure and stops the study as before.
  Only a writer killed itself (SIGKILL, the machine down) loses writes: the next sweep closes
  the runs it left RUNNING and logs a completed trial's metrics from Optuna (records.closing_of).

Used for the local SQLite store only: a tracking server's requests (and its time-outs) stay in
the sweep's process, where harness.tracking.server guards them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
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
from collections.abc import Iterable, Iterator
from itertools import zip_longest
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
        """Returns once the writer has made every write sent so far."""
        if not self.pid:
            return
        self._send(("sync",))
        if not self.pid:  # it had died: the writes are made here now
            return
        ready, _, _ = select.select([self.acks], [], [], timeout_s)
        if not ready:
            raise RuntimeError(
                f"the MLflow writer process (pid {self.pid}) did not finish its writes in "
                f"{timeout_s:.0f} s"
            )
        if not os.read(self.acks, 1):  # it died before it got there
            self._lost()

    def close(self) -> None:
        """Ends the writer's input and waits for it to make what is left (bounded: past that, it
        goes on alone, and the next sweep on the store waits for it). No write can follow."""
        pid, self.pid = self.pid, 0
        if not pid:
            return
        os.close(self.to_writer)
        try:  # its end closes the acknowledgements' pipe
            ready, _, _ = select.select([self.acks], [], [], CLOSE_WAIT_S)
            while ready and os.read(self.acks, 4096):
                ready, _, _ = select.select([self.acks], [], [], CLOSE_WAIT_S)
        finally:
            os.close(self.acks)
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
            pid = os.fork()
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
        atexit.register(self.close)

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
        for fd in (self.to_writer, self.acks):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)  # it has ended
        self.pid = 0
        self.in_place = MlflowClient(self.tracking_uri)


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
                        return
                    time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):  # its writer was killed before removing it
            lock.unlink()


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
    while not messages or (len(messages) < 1000 and select.select([fd], [], [], 0)[0]):
        header = _read_exact(fd, _HEADER.size)
        data = _read_exact(fd, _HEADER.unpack(header)[0]) if header else None
        if data is None:
            return messages or None
        messages.append(pickle.loads(data))
    return messages


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)] or [[]]


class _RunWrites:
    """One run's writes waiting together: one log_batch for all its params, metrics and tags
    (within MLflow's limits per request), its dataset inputs, then its end."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}  # the last value of a tag set twice wins, as it would
        self.inputs: list[Any] = []
        self.end: tuple[str, int] | None = None

    def add(self, operation: str, args: list[Any]) -> None:
        if operation == "log_batch":
            metrics, params, tags = args
            self.metrics += metrics
            self.params.update((p.key, p) for p in params)
            self.tags.update((t.key, t) for t in tags)
        elif operation == "log_inputs":
            self.inputs.append(args[0])
        elif operation == "set_terminated":
            self.end = (args[0], args[1])
        else:
            raise ValueError(f"unknown write {operation!r}")

    def make(self, client: Any, run_id: str) -> None:
        from harness.tracking.mlflow_client import retried

        batches: Iterable[tuple[list[Any], ...]] = zip_longest(
            _chunks(self.metrics, 1000),
            _chunks(list(self.params.values()), 100),
            _chunks(list(self.tags.values()), 100),
            fillvalue=[],
        )
        for metrics, params, tags in batches:
            if metrics or params or tags:
                retried(lambda: client.log_batch(run_id, metrics, params, tags))  # noqa: B023
        for datasets in self.inputs:
            retried(lambda: client.log_inputs(run_id, datasets=datasets))  # noqa: B023
        if self.end is not None:
            client.set_terminated(run_id, *self.end)


def _make_now(client: Any, message: tuple[Any, ...]) -> None:
    """One write made in the sweep's process, its errors raised (a sync is one already)."""
    if message[0] != "sync":
        writes = _RunWrites()
        writes.add(message[0], list(message[2:]))
        writes.make(client, message[1])


def _make(client: Any, messages: list[tuple[Any, ...]]) -> None:
    """Makes ``messages`` (no sync among them) by run, each run's in one go."""
    runs: dict[str, _RunWrites] = {}
    for operation, run_id, *args in messages:
        runs.setdefault(run_id, _RunWrites()).add(operation, args)
    for run_id, writes in runs.items():
        try:
            writes.make(client, run_id)
        except Exception as exc:
            _say(
                f"harness: MLflow writes of run {run_id} failed: "
                f"{redact_text(f'{type(exc).__name__}: {exc}')[:500]}"
            )


def serve(uri: str, lock: Path, held: int, writes: int, acks: int) -> int:
    """The writer (a forked child of the sweep's process): the writes read from the file
    descriptor ``writes``, made in order until its end; each sync acknowledged on ``acks``;
    ``lock`` held (open as ``held``) until then."""
    from mlflow.tracking import MlflowClient

    for number in (signal.SIGINT, signal.SIGTERM):  # it stops at the end of its input
        signal.signal(number, signal.SIG_IGN)
    os.setsid()  # a signal to the sweep's process group is not for it
    _keep_only_fds(held, writes, acks)
    client: Any = None
    while (messages := _read_waiting(writes)) is not None:
        pending: list[tuple[Any, ...]] = []
        for message in messages:
            if message[0] != "sync":
                pending.append(message)
                continue
            client = client or MlflowClient(uri)  # not before there is work: it takes ~0.5 s
            _make(client, pending)
            pending = []
            os.write(acks, b".")
        if pending:
            client = client or MlflowClient(uri)
            _make(client, pending)
    lock.unlink()  # before the lock is let go (at exit): a waiter that gets it finds it done
    return 0


def _keep_only_fds(*keep: int) -> None:
    """Closes what the writer inherited but must not hold open (a server's socket, a pipe a
    caller reads to its end), but stderr; stdin and stdout are /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    for fd in sorted({null, *_open_fds()} - {0, 1, 2, *keep}):
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (macOS): the usual range
        return list(range(3, 1024))
