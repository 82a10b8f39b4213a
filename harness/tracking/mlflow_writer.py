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
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from harness.workers import alive

ENDED_WRITER_WAIT_S = 120.0  # a writer of an ended sweep has this long to make what it was sent
CLOSE_WAIT_S = 600.0  # what the sweep's process waits at its exit for its writer to finish
_HEADER = struct.Struct("<I")


def writers_folder(store: Path) -> Path:
    """Where the writers of the SQLite store ``store`` keep their lock files."""
    return store.with_name(store.name + "-writers")


class DeferredClient:
    """The part of MLflow's client a trial run uses after its creation, sent to a writer
    process (started at the first write) instead of made here."""

    def __init__(self, uri: str, store: Path) -> None:
        self.tracking_uri = uri
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

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
        self._send(("set_terminated", run_id, status))

    def sync(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Returns once the writer has made every write sent so far."""
        if self.process is None:
            return
        self._send(("sync",))
        assert self.process.stdout is not None
        stdout = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready or not os.read(stdout.fileno(), 1):  # unbuffered: one ack per sync
            raise RuntimeError(self._ended(f"did not finish its writes in {timeout_s:.0f} s"))

    def close(self) -> None:
        """Ends the writer's input and waits for it to make what is left (bounded: past that, it
        goes on alone and the next sweep on the store waits for it)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            print(
                f"harness: the MLflow writer (pid {process.pid}) is still writing; it goes on "
                "in the background",
                file=sys.stderr,
            )

    def _start(self) -> subprocess.Popen[bytes]:
        folder = writers_folder(self.store)
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, self.tracking_uri, str(folder), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C and a group's SIGKILL reach the sweep, not it
        )
        atexit.register(self.close)
        return process

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.process is None:
            self.process = self._start()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        assert self.process.stdin is not None
        try:
            with _signals_held():  # a frame cut in half by Ctrl-C would garble every next one
                self.process.stdin.write(_HEADER.pack(len(data)) + data)
                self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:  # it died (killed), or was closed
            raise RuntimeError(self._ended(f"ended ({type(exc).__name__})")) from None

    def _ended(self, what: str) -> str:
        pid = self.process.pid if self.process is not None else "?"
        return (
            f"the MLflow writer process (pid {pid}) {what}: this trial's run may lack its last "
            "writes; run the same command again: it closes the runs left open"
        )


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
    writer (its process alive) is left alone: its runs are its own."""
    folder = writers_folder(store)
    if not folder.is_dir():
        return
    deadline = time.monotonic() + timeout_s
    for lock in sorted(folder.glob("*.lock")):
        owner = lock.name.split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and alive(int(owner)):
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


def _read_frames(stream: BinaryIO) -> Iterator[tuple[Any, ...]]:
    while True:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        data = stream.read(_HEADER.unpack(header)[0])
        if len(data) < _HEADER.unpack(header)[0]:
            return
        yield pickle.loads(data)


def _write(client: Any, message: tuple[Any, ...]) -> None:
    from harness.tracking.mlflow_client import retried

    operation, run_id, *args = message
    if operation == "log_batch":
        metrics, params, tags = args
        retried(lambda: client.log_batch(run_id, metrics=metrics, params=params, tags=tags))
    elif operation == "log_inputs":
        retried(lambda: client.log_inputs(run_id, datasets=args[0]))
    elif operation == "set_terminated":
        client.set_terminated(run_id, args[0])
    else:
        raise ValueError(f"unknown write {operation!r}")


def serve(uri: str, folder: Path, owner: int) -> None:
    """The writer: the frames on stdin, made in order, until its end."""
    from mlflow.tracking import MlflowClient

    from harness.secrets import redact_text
    from harness.tracking.sqlite_store import fast_sqlite_writes

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it stops at the end of its input, no sooner
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lock = folder / f"{owner}-{os.getpid()}.lock"
    with lock.open("wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        fast_sqlite_writes(Path(uri.removeprefix("sqlite:///").split("?", 1)[0]))
        client = MlflowClient(uri)
        for message in _read_frames(sys.stdin.buffer):
            if message[0] == "sync":
                sys.stdout.buffer.write(b".")
                sys.stdout.buffer.flush()
                continue
            try:
                _write(client, message)
            except Exception as exc:
                print(
                    f"harness: MLflow write {message[0]} of run {message[1]} failed: "
                    f"{redact_text(f'{type(exc).__name__}: {exc}')[:500]}",
                    file=sys.stderr,
                    flush=True,
                )
        lock.unlink()  # before the lock is let go: a waiter that gets it finds the writer done


# the writer's program (not `-m` this module: the package imports it first, and runpy warns)
_SERVE = (
    "import sys; from pathlib import Path; from harness.tracking.mlflow_writer import serve; "
    "serve(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))"
)
