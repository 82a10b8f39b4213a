"""What the tests share, in one importable module (fixtures stay in conftest.py, which uses it):

- the command line, run as a user runs it (`run_cli`, `start_cli`: a subprocess with this
  checkout on PYTHONPATH) or in this process (`run_in_process`);
- processes and servers a test starts and must stop (`start_mlflow_server`, `stop_process`,
  `wait_for_running`), and `harness ui` in the background (`harness_ui`);
- the MLflow runs of a study (`study_runs`: its parent run and its trial runs);
- the test suite's own backends (`FlakyBackend`, `ArtifactBackend`, named in configs as
  ``tests.helpers.FlakyBackend``) and what the backend contract suite runs a backend with
  (`RecordingReporter`, `Setup`, `spec`).

Importing it is cheap (no MLflow, torch or transformers): a `harness sweep` subprocess that
instantiates a test backend imports it too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig

from harness.backends.base import Backend, Reporter, TrialResult, TrialSpec
from harness.backends.fake import FakeBackend

if TYPE_CHECKING:
    import psutil
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent  # this checkout: its harness and tests packages


# --- the command line -------------------------------------------------------------------------


def cli_env(**changes: str | None) -> dict[str, str]:
    """The environment of a `harness` subprocess: this process's, with this checkout first on
    PYTHONPATH (its harness and the tests package, whatever else is installed) and COLUMNS=200
    (nothing wrapped), then ``changes`` (None removes a variable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def cli_command(*args: str) -> list[str]:
    """`harness ARGS` as a command line: ``python -m harness.cli ARGS``."""
    return [sys.executable, "-m", "harness.cli", *args]


def start_cli(
    *args: str, runs: Path | None = None, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen:
    """`harness ARGS [paths.runs_dir=RUNS]` started in its own process (which a test may signal
    or kill), from the checkout's root, with ``env`` (cli_env() if None). Its output is one
    text pipe, stdout and stderr together as a terminal shows them, unless ``popen`` (the
    arguments of subprocess.Popen) says otherwise."""
    extra = [f"paths.runs_dir={runs}"] if runs is not None else []
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen(
        cli_command(*args, *extra), env=cli_env() if env is None else env, cwd=ROOT, **popen
    )


def run_cli(
    *args: str, runs: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`harness ARGS [paths.runs_dir=RUNS]` in a subprocess, to its end: exit code and output."""
    extra = [f"paths.runs_dir={runs}"] if runs is not None else []
    return subprocess.run(
        cli_command(*args, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env() if env is None else env,
        cwd=ROOT,
    )


def run_in_process(*args: str, runs: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`harness ARGS [paths.runs_dir=RUNS]` through harness.cli.main in this process, with what
    it prints captured: run_cli's result without a process's imports, for a test of what a
    command does and says rather than of the process (signals, kills, the environment)."""
    from harness.cli import main

    argv = [*args, *([f"paths.runs_dir={runs}"] if runs is not None else [])]
    out, err = io.StringIO(), io.StringIO()
    with _env_set(COLUMNS="200"), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _env_set(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- files ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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


# --- settings shared by tests -----------------------------------------------------------------

# the fake OpenAI API's timings, quick (the openai_cfg fixture and hosted sweeps use them)
OPENAI_TEST_SETTINGS = (
    "backend.poll_interval_s=0.01",
    "backend.max_poll_interval_s=0.05",
    "backend.request_retries=4",
    "backend.create_grace_s=0.05",
)

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"

# what a tracker on an http(s) URI sets process-wide (harness.tracking): undone after each test
MLFLOW_CLIENT_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


# --- processes and servers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval=0.3) -> None:
    """Polls ``condition`` until it holds; fails the test, saying ``what``, after ``timeout``."""
    import pytest

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(interval)


def save_tiny_gpt2(cfg: Any, dataset: Any, directory: Path) -> Path:
    """A tiny random GPT-2 checkpoint in ``directory``, beside the tokenizer the local backend
    trains for ``cfg``'s data, as save_pretrained writes a Hub checkpoint: what
    model.name_or_path=<dir> loads in tests (nothing downloads)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from harness.backends.local import LocalBackend

    tokenizer = AutoTokenizer.from_pretrained(LocalBackend().prepare(cfg, dataset).tokenizer_source)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 (False for a refused connection, an error or a timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:``port`` with its store and artifacts in ``folder`` (a
    second one on the same folder and port is the first one restarted); returns once it
    answers. The caller stops it (stop_process)."""
    import pytest

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
    while not answers(f"{url}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()}")
        time.sleep(0.5)  # the poll interval of a bounded wait on the server answering
    return server


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


def wait_for_running(study_name: str, storage, ready, what: str, timeout: float = 120.0) -> None:
    """Polls a study another process runs until ``ready(running_trials)``; fails the test with
    ``what`` if that does not happen within ``timeout`` seconds."""
    import pytest

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


def past_the_first_trial(running) -> bool:
    """The second trial or a later one runs and has reported an evaluation."""
    return reported(running) and running[0].number >= 1


def one_error_line(command: str, code: int, out: str, err: str) -> str:
    """Checks that `harness COMMAND` exited with 2 and said why in exactly one error line, with
    no traceback; returns that line."""
    assert code == 2, out + err
    assert "Traceback" not in err, err
    message = [line for line in err.splitlines() if line.startswith(f"harness {command}: error:")]
    assert len(message) == 1, err
    return message[0]


# --- the MLflow runs of a study ---------------------------------------------------------------


@dataclass
class StudyRuns:
    """The runs of a study's MLflow experiment, as search_runs returns them (newest first):
    the study's parent run (tag harness.role=study) and a run per trial (harness.role=trial)."""

    client: MlflowClient
    runs: list[Run]

    @property
    def by_name(self) -> dict[str, Run]:
        return {r.info.run_name: r for r in self.runs}

    @property
    def statuses(self) -> dict[str, str]:
        """Each run's status by run name."""
        return {r.info.run_name: r.info.status for r in self.runs}

    @property
    def parents(self) -> list[Run]:
        return [r for r in self.runs if r.data.tags.get("harness.role") == "study"]

    @property
    def trials(self) -> list[Run]:
        return [r for r in self.runs if r.data.tags.get("harness.role") == "trial"]


def study_runs(
    where: DictConfig | str,
    name: str | None = None,
    *,
    client: MlflowClient | None = None,
    filter_string: str = "",
) -> StudyRuns:
    """The runs of study ``name`` in the MLflow store at ``where``: a composed config (its
    tracking URI; its study name unless ``name`` is given) or a tracking URI. ``client``:
    one already open on that store; ``filter_string``: MLflow's search filter."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import tracking_uri

    if isinstance(where, DictConfig):
        uri, name = tracking_uri(where), name or where.name
    else:
        uri = where
    client = client or MlflowClient(uri)
    experiment = client.get_experiment_by_name(str(name))
    assert experiment is not None, f"no MLflow experiment {name!r} at {uri}"
    found = client.search_runs([experiment.experiment_id], filter_string, max_results=5000)
    return StudyRuns(client, list(found))


# --- `harness ui` in the background ---------------------------------------------------------

UI_START_S = 90.0  # `mlflow server` alone needs ~10 s; more on two shared cores
UI_STOP_S = 30.0  # harness gives its server 20 s to stop before killing it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ui_env() -> dict[str, str]:
    # unbuffered output is not what a user's pipe or log file gets: take it away, so the test
    # sees the URL line only if harness flushes it
    return cli_env(PYTHONUNBUFFERED=None, MLFLOW_DISABLE_TELEMETRY="true")


def refuses(port: int) -> bool:
    """Whether connections to the port are refused: nothing listens (not merely slow)."""
    with socket.socket() as sock:
        sock.settimeout(3)
        return sock.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def descendants(pid: int) -> set[psutil.Process]:
    """The children of ``pid``, their children, and so on."""
    import psutil

    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def running(process: psutil.Process) -> bool:
    """Still there (psutil checks the pid was not reused) and not a zombie: a process that
    has exited but not been reaped serves nothing and holds no port."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class UI:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    servers: set[psutil.Process] = field(default_factory=set)  # what harness started

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def see_servers(self) -> set[psutil.Process]:
        self.servers |= descendants(self.process.pid)
        return self.servers

    def interrupt(self, terminal: bool = False) -> int:
        """SIGINT: as a terminal's Ctrl-C sends it, to the foreground process group that
        `harness ui` leads here, or to harness alone (`kill -INT PID`). Either way harness must
        stop its server itself. Returns the exit code; fails if harness runs on past
        UI_STOP_S."""
        import pytest

        self.see_servers()
        if terminal:
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=UI_STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"harness ui still runs {UI_STOP_S:.0f} s after SIGINT:\n{self.output()}")

    def stop(self) -> None:
        """Cleanup, whatever the test did: SIGINT, then SIGKILL to what harness started and
        left running, and to harness's own process group (ours: start_new_session)."""
        import psutil

        if self.process.poll() is None:
            self.see_servers()
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=UI_STOP_S)
        for server in self.servers:
            if running(server):
                with contextlib.suppress(psutil.Error):
                    server.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)


@contextlib.contextmanager
def harness_ui(runs: Path, logs: Path, *flags: str, health: str) -> Iterator[UI]:
    """`harness ui FLAGS --port P paths.runs_dir=RUNS` on a free port, once ``health`` answers
    and the URL is printed; stopped, with all it started, on the way out."""
    import pytest

    port = free_port()
    log = logs / f"harness-ui-{port}.log"
    with log.open("wb") as out:
        process = start_cli(
            "ui",
            *flags,
            "--port",
            str(port),
            f"paths.runs_dir={runs}",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ui_env(),
            start_new_session=True,
        )
    ui = UI(f"http://127.0.0.1:{port}", port, process, log)
    try:
        wait_for(
            lambda: process.poll() is not None or answers(ui.url + health),
            UI_START_S,
            f"{ui.url}{health} answers",
        )
        if process.poll() is not None:
            pytest.fail(f"harness ui exited with {process.returncode}:\n{ui.output()}")
        # harness polls the same URL, then prints: give it a moment, no more
        wait_for(lambda: f"open {ui.url}" in ui.output(), 20, "harness ui prints the URL")
        assert ui.see_servers(), "harness ui runs no server process of its own"
        yield ui
    finally:
        ui.stop()


def playwright_and_chromium() -> tuple[Any, str]:
    """Python playwright's sync API and the system Chromium (no browser download), or a skip
    saying which is missing: CI installs both, a bare machine may lack them."""
    import pytest

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (python) is not installed: pip install playwright")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    return sync_playwright, chromium


# --- backends and the backend contract --------------------------------------------------------


class FlakyBackend(FakeBackend):
    """Fails for some params (batch size 8), to check that a failing trial fails alone."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        if spec.config.train.batch_size == 8:
            raise RuntimeError("out of memory (simulated for batch size 8)")
        return super().run(spec, reporter)


class ArtifactBackend(FakeBackend):
    """Its trials return an artifact, to see what a failure to store one does."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        result = super().run(spec, reporter)
        spec.workdir.mkdir(parents=True, exist_ok=True)
        path = spec.workdir / "predictions.txt"
        path.write_text(f"trial {spec.number}\n")
        result.artifacts.append(path)
        return result


class RendezvousBackend(FakeBackend):
    """Each worker process's first trial waits until every worker of the sweep (sweep.n_workers)
    has started one: a test of several workers then sees each of them run trials whatever the
    machine's speed, on an event rather than a guess at how long a process takes to start. The
    wait is bounded (RENDEZVOUS_S): a worker that never comes fails the test's own checks."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        arrived = Path(spec.config.paths.runs_dir) / "rendezvous"
        arrived.mkdir(parents=True, exist_ok=True)
        mine = arrived / str(os.getpid())
        if not mine.exists():
            mine.touch()
            deadline = time.monotonic() + RENDEZVOUS_S
            while len(list(arrived.iterdir())) < spec.config.sweep.n_workers:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # poll interval of the bounded wait
        return super().run(spec, reporter)


RENDEZVOUS_S = 120.0
RENDEZVOUS = "backend._target_=tests.helpers.RendezvousBackend"

_: type[Backend] = FlakyBackend  # all are Backends (mypy)
_artifact: type[Backend] = ArtifactBackend
_rendezvous: type[Backend] = RendezvousBackend


class RecordingReporter:
    """A Reporter that records what a backend reports (steps with metrics, tags, the trial's
    length), and prunes at evaluation ``prune_at_eval`` of ``metric`` if given."""

    def __init__(self, metric: str, prune_at_eval: int | None = None) -> None:
        self.metric, self.prune_at_eval = metric, prune_at_eval
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.totals: list[int] = []  # what the backend said the trial's length would be

    def set_tags(self, tags):
        self.tags.update(tags)

    def set_total_steps(self, total):
        self.totals.append(total)

    def report(self, step, metrics):
        self.calls.append((step, dict(metrics)))
        evals = sum(1 for _, m in self.calls if self.metric in m)
        if self.metric in metrics and evals == self.prune_at_eval:
            raise optuna.TrialPruned(f"pruned at evaluation {evals}")


class OrderReporter(RecordingReporter):
    """Also records whether the trial's length was given before its first report."""

    totals_before_first_report: bool | None = None

    def report(self, step, metrics):
        if self.totals_before_first_report is None:
            self.totals_before_first_report = bool(self.totals)
        super().report(step, metrics)


@dataclass
class Setup:
    """A backend under the contract: its name, the backend, its config, its prepared data."""

    name: str
    backend: Backend
    cfg: DictConfig
    prepared: Any

    def __iter__(self):
        return iter((self.backend, self.cfg, self.prepared))


def trial_spec(
    cfg: DictConfig, prepared: Any, workdir: Path, save_model=False, key="", number=0
) -> TrialSpec:
    """A trial of ``cfg`` as a study hands it over: judged by the study's metric and direction."""
    return TrialSpec(
        number,
        cfg,
        prepared,
        workdir,
        save_model,
        key,
        metric=str(cfg.sweep.metric),
        direction=str(cfg.sweep.direction),
    )
