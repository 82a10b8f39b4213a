"""The processes of `sweep.n_workers`: started by a sweep and stopped with it; the lock they
share on this host; whether a process of this host is still alive."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

HELPER_ENV = "_HARNESS_HELPER"  # set in processes a sweep starts for sweep.n_workers
PARENT_ENV = "_HARNESS_PARENT_RUN"  # ... with the MLflow parent run they record under
# ... and the sweep's overrides (a JSON list): a storage URL's password or a key given on the
# command line would show in `ps` to every user of the host; a process's environment does not
OVERRIDES_ENV = "_HARNESS_OVERRIDES"


class Preempted(KeyboardInterrupt):
    """SIGTERM: the scheduler is taking the machine (SLURM, Kubernetes, a spot instance), not
    the user stopping the study. The running trial keeps its saved state and is retried, where
    a Ctrl-C fails it for good."""


def overrides_env(overrides: list[str]) -> dict[str, str]:
    """The environment entry that hands ``overrides`` to a worker process."""
    return {OVERRIDES_ENV: json.dumps(overrides)}


def inherited_overrides() -> list[str]:
    """The overrides a sweep handed to this worker process (none elsewhere), taken out of the
    environment so that no process this one starts inherits them."""
    return list(json.loads(os.environ.pop(OVERRIDES_ENV, "[]")))


@contextlib.contextmanager
def locked(path: Path) -> Any:
    """An exclusive lock on ``path`` for processes of this host."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.wait()  # each ends when the study has its trials (or its own bound)
    failed = [w.args for w in workers if w.returncode not in (0, None)]
    if failed:
        logging.getLogger("harness").warning("%d worker(s) exited with an error", len(failed))


def stop(workers: list[subprocess.Popen[bytes]], preempted: bool = False) -> None:
    """Ctrl-C or an error here: each worker gets one interrupt (they run in their own session,
    so a terminal's Ctrl-C reaches only this process), SIGTERM where this process got one (their
    trials are retried too), and 30 s in all to close its trial, then is killed."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM if preempted else signal.SIGINT)
    deadline = time.monotonic() + 30
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def worker_identity() -> dict[str, Any]:
    """This process, as a running trial names its owner: {"host": ..., "pid": ...}."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
