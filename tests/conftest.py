"""Shared fixtures. Nothing here downloads: HF_HUB_OFFLINE is set before transformers loads."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# The test suite's own backends, allowed as a user allows theirs (harness.checks.ALLOW_ENV):
# configs may name only harness's backends and these in backend._target_.
os.environ["HARNESS_BACKENDS"] = (
    "tests.artifact_backend.ArtifactBackend,tests.flaky_backend.FlakyBackend"
)

import gc
import hashlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness.config import load_config


@pytest.fixture(autouse=True)
def _quiet_stays_in_its_test():
    """`harness sweep --quiet` run in-process sets HARNESS_QUIET for the workers it starts; left
    set, it would silence the subprocess sweeps of later tests (which pass on os.environ)."""
    yield
    os.environ.pop("HARNESS_QUIET", None)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def make_cfg(runs: Path):
    """load_config with runs_dir in the test's temp folder."""

    def make(*overrides: str):
        return load_config([*overrides, f"paths.runs_dir={runs}"])

    return make


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``, files with their sha256: equal snapshots mean
    nothing was created, changed or removed there."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        )
        for path in sorted(folder.rglob("*"))
    }


def window_ends(last_step: int, every: int = 10) -> list[int]:
    """The steps train/loss is logged at when a trial reports it at steps 1..last_step: the
    end of each window of ``every`` steps (tracking.log_every_steps), then the partial one."""
    return [*range(every, last_step + 1, every), *([last_step] if last_step % every else [])]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def fake_openai():
    """The loopback fake of the OpenAI API on a free port, with fast jobs (a step per ms)."""
    from harness.fake_openai import FakeOpenAI, FakeOpenAIServer, Timing

    with FakeOpenAIServer(FakeOpenAI(Timing(validate_s=0.01, queue_s=0.01, step_s=0.001))) as srv:
        yield srv


OPENAI_TEST_SETTINGS = (
    "backend.poll_interval_s=0.01",
    "backend.max_poll_interval_s=0.05",
    "backend.request_retries=4",
    "backend.create_grace_s=0.05",
)


@pytest.fixture
def openai_cfg(make_cfg, fake_openai):
    """A hosted study's config pointed at the fake (tickets_openai unless study=... is given)."""

    def make(*overrides: str):
        study = [o for o in overrides if o.startswith("study=")] or ["study=tickets_openai"]
        rest = [o for o in overrides if not o.startswith("study=")]
        base = f"backend.base_url={fake_openai.base_url}"
        return make_cfg(study[0], base, *OPENAI_TEST_SETTINGS, *rest)

    return make


class ServerURL(str):
    """The server's URL, with its process (a test may stop the server mid-study)."""

    def __new__(cls, url: str, process: subprocess.Popen) -> ServerURL:
        value = super().__new__(cls, url)
        value.process = process
        return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:``port`` with its store and artifacts in ``folder`` (a
    second one on the same folder and port is the first one restarted); returns once it
    answers. The caller stops it (stop_process)."""
    log = (folder / "server.log").open("a")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its own process group: kill_group ends its workers too
    )
    log.close()  # the child has its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL (to its process group, if it leads one) if it has not ended
    within 20 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to a process and, when it leads a process group (start_mlflow_server's), every
    process of it: `mlflow server` serves from worker processes, which outlive their parent."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


# what a tracker on an http(s) URI sets process-wide (harness.tracking): undone after each test
MLFLOW_CLIENT_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    for name in MLFLOW_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        yield ServerURL(f"http://127.0.0.1:{port}", server)
    finally:
        stop_process(server)


POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def postgres():
    """The machine's PostgreSQL: a failure in CI, a skip with the reason elsewhere. Afterwards the
    connections of storages the test dropped are closed: an Optuna RDBStorage's pool lives in a
    reference cycle, so only the cyclic collector closes it, and left to run whenever, a whole
    suite's worth exhausted the server's 100 connections in CI ("too many clients already")."""
    import psycopg

    try:
        psycopg.connect(POSTGRES, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL must run on 127.0.0.1:5432 (database test) in CI: {exc}")
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {exc}")
    yield POSTGRES
    gc.collect()


def wait_for_running(study_name: str, storage, ready, what: str, timeout: float = 120.0) -> None:
    """Polls a study another process runs until ``ready(running_trials)``; fails the test with
    ``what`` if that does not happen within ``timeout`` seconds."""
    import optuna

    if isinstance(storage, str):  # one storage for the whole wait: each holds a connection
        storage = optuna.storages.RDBStorage(storage)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:  # not created yet
                continue
            if ready(study.get_trials(states=(optuna.trial.TrialState.RUNNING,))):
                return
        pytest.fail(f"timed out waiting until {what}")
    finally:
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.engine.dispose()


def reported(running) -> bool:
    """A running trial has reported an evaluation: mid-trial, its MLflow run exists."""
    return bool(running) and bool(running[0].intermediate_values)
