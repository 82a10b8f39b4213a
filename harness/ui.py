"""`harness ui`: the MLflow UI on the study's tracking store, or `--optuna`, optuna-dashboard on
its Optuna storage. Both are served on 127.0.0.1 only: the stores may hold more than a user
would publish, and MLflow's server refuses foreign Host headers anyway."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.config import ConfigError, runs_dir
from harness.secrets import redact_text
from harness.tracking import tracking_uri

HOST = "127.0.0.1"


# The servers get the store's URL through their environment, never on their command line: a
# password in it would show in `ps` to every user of the host.
MLFLOW_STORE_ENV = "MLFLOW_BACKEND_STORE_URI"  # `mlflow server --backend-store-uri`'s variable
DASHBOARD_STORAGE_ENV = "_HARNESS_DASHBOARD_STORAGE"  # read by DASHBOARD_MAIN
# optuna-dashboard's own command line, with the storage argument taken from the environment
DASHBOARD_MAIN = (
    "import os, sys; from optuna_dashboard._cli import main; "
    f"sys.argv.insert(1, os.environ.pop({DASHBOARD_STORAGE_ENV!r})); sys.exit(main())"
)


def mlflow_command(cfg: DictConfig, port: int) -> list[str] | None:
    """The `mlflow server` line for the configured store (its URL in MLFLOW_STORE_ENV); None
    when tracking.uri is already a server (there is nothing to start: its URL is the UI)."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return None
    if uri.startswith("sqlite:///"):
        # `mlflow server` would create an empty store and show no runs: say where they are not
        store = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if not store.exists():
            raise ConfigError(
                f"no MLflow store at {store}: run `harness sweep` first "
                "(or set paths.runs_dir / tracking.uri to where it is)"
            )
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def dashboard_command(cfg: DictConfig, port: int) -> list[str]:
    """optuna-dashboard on the study's storage (its URL in DASHBOARD_STORAGE_ENV)."""
    return [sys.executable, "-c", DASHBOARD_MAIN, "--host", HOST, "--port", str(port)]


def dashboard_storage(cfg: DictConfig) -> str:
    """The study's Optuna storage as optuna-dashboard takes it: the storage URL, or the journal
    file."""
    url = cfg.storage.url
    if url:
        return str(url)
    journal = runs_dir(cfg) / "optuna" / f"{cfg.name}.log"
    if not journal.exists():
        raise ConfigError(
            f"no Optuna journal at {journal}: run `harness sweep study={cfg.name}` first"
        )
    return str(journal)


def check_port(port: int) -> None:
    """Refuses a port something already listens on: the server would fail to bind, but the
    other program might answer the health check first, and the URL printed would be wrong."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {HOST} is in use ({exc.strerror}): pick another with --port N"
            ) from exc


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> bool:
    """Polls ``url`` until it answers 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def serve(cfg: DictConfig, port: int, optuna: bool, say: Callable[[str], None]) -> int:
    """Starts the server, says where it is once it answers, and runs until it stops or the
    user presses Ctrl-C (which stops it too)."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if optuna:
        env[DASHBOARD_STORAGE_ENV] = dashboard_storage(cfg)
        command: list[str] | None = dashboard_command(cfg, port)
        url, health = f"http://{HOST}:{port}", f"http://{HOST}:{port}/api/meta"
        what = f"optuna-dashboard on {redact_text(str(cfg.storage.url or 'the journal file'))}"
    else:
        command = mlflow_command(cfg, port)
        if command is None:
            say(f"tracking.uri is a server already: open {redact_text(tracking_uri(cfg))}")
            return 0
        env[MLFLOW_STORE_ENV] = tracking_uri(cfg)
        url, health = f"http://{HOST}:{port}", f"http://{HOST}:{port}/health"
        what = f"MLflow UI on {redact_text(tracking_uri(cfg))}"
    assert command is not None
    check_port(port)
    process: subprocess.Popen[bytes] | None = None
    with _SignalTrap(lambda: process) as trap:
        try:
            # its own process group: stopping it reaches its workers too, and leaves no orphans
            process = subprocess.Popen(
                command,
                env=env,
                cwd=Path.cwd(),
                stdin=subprocess.DEVNULL,
                process_group=0 if os.name == "posix" else None,
            )
            if not wait_until_up(health, process):
                trap.stopping()
                stop(process)
                say(f"the server did not start (exit code {process.returncode}); see above")
                return 1
            where = "study" if optuna else "experiment"
            say(what)
            say(f"open {url}")  # a line of its own, however narrow the terminal
            say(f"({where} {cfg.name!r}; Ctrl-C stops the server)")
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            trap.stopping()
            if process is not None:
                stop(process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM to the server (it stops its workers), then SIGKILL to whatever of its process
    group is left: the server if it did not stop in time, workers it left behind."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    _kill_group(process)
    process.wait(timeout=10)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    if os.name != "posix":
        if process.poll() is None:
            process.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class _SignalTrap:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop the server: the first raises
    KeyboardInterrupt, and `serve` stops the server gracefully; one while it stops kills the
    server's process group and exits at once. The server is in a process group of its own, so
    this is the only way a signal reaches it. Outside the main thread (no handlers there) it
    does nothing."""

    def __init__(self, current: Callable[[], subprocess.Popen[bytes] | None]) -> None:
        self.current = current
        self.interrupted = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalTrap:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT, signal.SIGTERM]
            if hasattr(signal, "SIGHUP"):
                signals.append(signal.SIGHUP)
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in signals}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def stopping(self) -> None:
        """From now on a signal means: stop now."""
        self.interrupted = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        print("\ninterrupted: killing the server", file=sys.stderr, flush=True)
        process = self.current()
        if process is not None:
            _kill_group(process)
        os._exit(130)
