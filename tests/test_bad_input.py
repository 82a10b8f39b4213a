"""Bad input at the edges of a study: stores that cannot be reached. Each is one clear error
before any trial, and nothing is written."""

from __future__ import annotations

import socket

import pytest

from harness.config import ConfigError
from harness.study import Sweep


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_storage_is_one_clear_error_without_the_password(make_cfg, runs):
    url = f"postgresql://harness:hunter2@127.0.0.1:{free_port()}/nowhere"
    cfg = make_cfg("backend=fake", f"storage.url={url}")
    with pytest.raises(ConfigError, match="cannot open the Optuna storage") as error:
        Sweep(cfg, []).run()
    assert "hunter2" not in str(error.value)
    assert "harness:***@127.0.0.1" in str(error.value)
    assert not (runs / "mlflow.db").exists()  # nothing recorded for a study that never began


def test_unreachable_tracking_server_is_one_clear_error(make_cfg, runs):
    cfg = make_cfg("backend=fake", f"tracking.uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking server") as error:
        Sweep(cfg, []).run()
    assert "mlflow server" in str(error.value)
