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
os.environ["HARNESS_BACKENDS"] = ",".join(
    f"tests.helpers.{name}" for name in ("ArtifactBackend", "FlakyBackend", "RendezvousBackend")
)

import gc
import subprocess
from pathlib import Path

import pytest

from harness.config import load_config
from tests.helpers import (
    MLFLOW_CLIENT_ENV,
    OPENAI_TEST_SETTINGS,
    POSTGRES,
    free_port,
    start_mlflow_server,
    stop_process,
)


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


@pytest.fixture
def fake_openai():
    """The loopback fake of the OpenAI API on a free port, with fast jobs (a step per ms)."""
    from harness.fake_openai import FakeOpenAI, FakeOpenAIServer, Timing

    with FakeOpenAIServer(FakeOpenAI(Timing(validate_s=0.01, queue_s=0.01, step_s=0.001))) as srv:
        yield srv


@pytest.fixture
def fake_together():
    """The loopback fake of Together's API on a free port, with fast jobs (a step per ms).
    Its ``base_url`` is what ``together.Together(base_url=...)`` takes (the server's root)."""
    from harness.fake_together import FakeTogether, FakeTogetherServer, TogetherTiming

    timing = TogetherTiming(validate_s=0.01, queue_s=0.01, step_s=0.001, restart_s=0.01)
    with FakeTogetherServer(FakeTogether(timing)) as srv:
        yield srv


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
