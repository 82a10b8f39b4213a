"""Fault injection: a tracking server (`tracking.uri=http://...`) that dies mid-study, a SIGTERM
while MLflow's client retries, and a tracking URI with `user:password@`.

Each sweep runs as `python -m harness.cli sweep` (signals need a process of its own) with the
fake backend slowed to a second an epoch, so that a kill lands inside a trial.
"""

from __future__ import annotations

import base64
import http.client
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from harness.cli import main
from harness.config import load_config
from harness.storage import storage_for
from tests.helpers import (
    free_port,
    kill_group,
    snapshot,
    start_cli,
    start_mlflow_server,
    stop_process,
    study_runs,
    wait_for_running,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # the slow tier (pyproject.toml)

EPOCHS = 3
# trials of ~3 s whose metrics reach MLflow only when the trial ends
SLOW_TRIALS = [
    "backend=fake",
    "backend.seconds_per_epoch=1",
    f"train.epochs={EPOCHS}",
    "pruner=none",
    "tracking.flush_every_s=1000",
    "sweep.n_trials=4",
]


def start_sweep(overrides: list[str]) -> subprocess.Popen[str]:
    return start_cli("sweep", *overrides)


def run_sweep(overrides: list[str]) -> tuple[int, str]:
    process = start_sweep(overrides)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_process(process)
    return process.returncode, output


def midway(running: list[optuna.trial.FrozenTrial]) -> bool:
    """A trial past its first evaluation and before its last: its MLflow run is open."""
    return any(0 < len(t.intermediate_values) < EPOCHS and t.number >= 1 for t in running)


def at_its_end(running: list[optuna.trial.FrozenTrial]) -> bool:
    """A trial that made all its evaluations and is still RUNNING: it is sending its metrics
    and closing its run, which a dead server makes MLflow's client retry."""
    return any(len(t.intermediate_values) == EPOCHS for t in running)


def assert_resumed_whole(cfg, url: str) -> None:
    """sweep.n_trials finished, nothing RUNNING in Optuna or MLflow, each trial number once."""
    study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] == cfg.sweep.n_trials and not states["RUNNING"], states
    found = study_runs(url, cfg.name).runs
    assert [r.info.run_name for r in found if r.info.status == "RUNNING"] == []
    finished = [
        r.data.tags["optuna.trial_number"]
        for r in found
        if r.data.tags.get("harness.role") == "trial" and r.info.status == "FINISHED"
    ]
    assert sorted(finished) == sorted({*finished})  # no trial number recorded twice
    complete = {str(t.number) for t in study.trials if t.state.name == "COMPLETE"}
    assert set(finished) == complete


class ServerLost(NamedTuple):
    cfg: DictConfig
    port: int
    url: str
    overrides: list[str]
    process: subprocess.Popen[str]  # the sweep, still running


def sweep_losing_its_server(tmp_path: Path, runs: Path, server_timeout_s: int) -> ServerLost:
    """A sweep of SLOW_TRIALS recording to an `mlflow server` (its store in ``tmp_path``), which
    is killed once a trial (1 or later) is midway: gone at once, as a crashed server or host
    would be. The caller stops the sweep."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout = f"tracking.server_timeout_s={server_timeout_s}"
    overrides = [*SLOW_TRIALS, f"tracking.uri={url}", timeout, f"paths.runs_dir={runs}"]
    cfg = load_config(overrides)
    server = start_mlflow_server(tmp_path, port)
    try:
        process = start_sweep(overrides)
        try:
            wait_for_running(cfg.name, storage_for(cfg), midway, "trial 1 or later is midway")
        except BaseException:
            stop_process(process)
            raise
    finally:
        kill_group(server)
    return ServerLost(cfg, port, url, overrides, process)


def test_server_killed_mid_study_stops_it_once_and_the_same_command_resumes(tmp_path, runs):
    cfg, port, url, overrides, process = sweep_losing_its_server(tmp_path, runs, 3)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_process(process)
    assert process.returncode != 0, output
    # one message for the study, not a failure for each remaining trial
    assert output.count("stopped answering") == 1, output
    assert "retried for tracking.server_timeout_s=3 s); the trial it was recording" in output
    assert "run the same command again when the server is back" in output
    assert "Traceback" not in output
    study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))
    assert Counter(t.state.name for t in study.trials)["FAIL"] == 1

    server = start_mlflow_server(tmp_path, port)  # the same store, the same port
    try:
        code, output = run_sweep(overrides)
        assert code == 0, output
        assert_resumed_whole(cfg, url)
    finally:
        stop_process(server)


def test_sigterm_while_mlflow_retries_exits_at_once_and_the_resume_closes_the_run(tmp_path, runs):
    # a long timeout: MLflow's client would go on retrying for minutes
    cfg, port, url, overrides, process = sweep_losing_its_server(tmp_path, runs, 600)
    try:
        wait_for_running(cfg.name, storage_for(cfg), at_its_end, "a trial retries closing its run")
        process.send_signal(signal.SIGTERM)  # as SLURM or Kubernetes stop a job
        output, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)
    assert process.returncode not in (0, None), output
    assert "interrupted: run the same command again to resume" in output
    assert "Traceback" not in output

    server = start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(url)
        running_trials = "tags.`harness.role` = 'trial' and attributes.status = 'RUNNING'"
        left_open = study_runs(url, cfg.name, client=client, filter_string=running_trials).runs
        assert left_open  # the server was gone: the interrupted trial's run could not close
        code, output = run_sweep(overrides)
        assert code == 0, output
        assert_resumed_whole(cfg, url)
        closed = client.get_run(left_open[0].info.run_id)
        assert closed.info.status == "FAILED"
        assert closed.data.tags["optuna.trial_state"] == "FAIL"
    finally:
        stop_process(server)


class BasicAuthProxy:
    """A loopback HTTP server that requires basic auth (user, password) and forwards what it
    lets through to ``upstream`` (host, port), or answers 200 itself when there is none."""

    def __init__(self, user: str, password: str, upstream: tuple[str, int] | None = None):
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.refused = 0

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, headers, data = 200, [("Content-Type", "text/plain")], b"OK"
                if upstream is not None:
                    status, headers, data = forward(self, body)
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

            def log_message(self, *args: object) -> None:
                pass

        def forward(handler: BaseHTTPRequestHandler, body: bytes | None) -> tuple:
            assert upstream is not None
            connection = http.client.HTTPConnection(*upstream, timeout=60)
            skip = ("host", "authorization", "connection", "content-length")
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            return response.status, response.getheaders(), data

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> BasicAuthProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def every_text(folder: Path) -> Iterator[str]:
    for path in folder.rglob("*"):
        if path.is_file():
            yield path.read_bytes().decode("utf-8", "replace")


def test_user_and_password_in_the_uri_pass_the_check_and_never_show(tmp_path, runs):
    password = "pw-Quiet-4711"
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        with BasicAuthProxy("harness", password, ("127.0.0.1", port)) as proxy:
            uri = f"http://harness:{password}@127.0.0.1:{proxy.port}"
            overrides = ["backend=fake", "sweep.n_trials=2", f"tracking.uri={uri}",
                         f"paths.runs_dir={runs}"]  # fmt: skip
            code, output = run_sweep(overrides)
            assert code == 0, output
            assert proxy.refused == 0  # every request, /health and artifacts too, had the auth
        assert password not in output
        assert "mlflow: http://harness:***@127.0.0.1" in output
        assert not [text for text in every_text(runs) if password in text]
        cfg = load_config(overrides)
        statuses = [r.info.status for r in study_runs(f"http://127.0.0.1:{port}", cfg.name).runs]
        assert statuses == ["FINISHED"] * 3  # the parent and two trials
    finally:
        stop_process(server)


def test_a_refused_password_is_said_before_anything_is_written_and_not_shown(runs, capsys):
    with BasicAuthProxy("harness", "right-Secret-1") as proxy:
        uri = f"http://harness:wrong-Secret-2@127.0.0.1:{proxy.port}"
        code = main(["sweep", "backend=fake", f"tracking.uri={uri}", f"paths.runs_dir={runs}"])
        assert proxy.refused == 1
    output = capsys.readouterr()
    assert code == 2
    assert "wants credentials (HTTP 401) and those given were refused" in output.err
    assert "harness:***@127.0.0.1" in output.err
    assert "wrong-Secret-2" not in output.out + output.err
    assert snapshot(runs) == {}
