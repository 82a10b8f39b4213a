"""`tracking.uri=http://...`: a sweep recorded by a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.study import Sweep


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
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
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def test_sweep_records_to_a_tracking_server(mlflow_server, make_cfg, runs):
    overrides = ["backend=fake", "sweep.n_trials=3", f"tracking.uri={mlflow_server}"]
    cfg = make_cfg(*overrides)
    Sweep(cfg, overrides).run()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(cfg.name)
    runs_found = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs_found if r.data.tags.get("harness.role") == "study"]
    trials = [r for r in runs_found if r.data.tags.get("harness.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    config_path = client.download_artifacts(trials[0].info.run_id, "config.yaml")
    assert "name: sentiment_tiny" in Path(config_path).read_text()
    assert not (runs / "mlflow.db").exists()  # nothing went to the local default store
