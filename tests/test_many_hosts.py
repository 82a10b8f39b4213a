"""Workers on many hosts: the same `harness sweep` started three times, joined through Optuna's
RDB storage on the machine's PostgreSQL and one real `mlflow server` on loopback. Each worker
is a separate process with its own HARNESS_WORKER_INDEX, as a SLURM array task or a Kubernetes
indexed Job would be."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def postgres() -> str:
    """The machine's PostgreSQL: a failure in CI, a skip with the reason elsewhere."""
    import psycopg

    try:
        psycopg.connect(POSTGRES, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL must run on 127.0.0.1:5432 (database test) in CI: {exc}")
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {exc}")
    return POSTGRES


def test_three_workers_share_a_study_through_postgres_and_a_tracking_server(
    postgres, mlflow_server, tmp_path
):
    name = f"many_hosts_{uuid.uuid4().hex[:8]}"
    overrides = [
        "backend=fake",
        f"name={name}",
        "sweep.n_trials=60",
        "pruner=none",
        f"storage.url={postgres}",
        f"tracking.uri={mlflow_server}",
    ]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "sweep",
                *overrides,
                f"paths.runs_dir={tmp_path / f'host{index}'}",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_WORKER_INDEX": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for index in range(3)
    ]
    outputs = [worker.communicate(timeout=400)[0].decode() for worker in workers]
    try:
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output
        study = optuna.load_study(study_name=name, storage=postgres)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 60
        assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
        hosts = {t.user_attrs["worker"]["pid"] for t in finished}
        assert len(hosts) == 3  # every worker ran trials
        client = MlflowClient(mlflow_server)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
        children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
        assert len(parents) == 1
        assert parents[0].info.status == "FINISHED"
        # one run per finished trial: none lost, none duplicated, all nested, all closed
        numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
        assert numbers == sorted(t.number for t in finished)
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
        assert {r.info.status for r in children} == {"FINISHED"}
    finally:
        optuna.delete_study(study_name=name, storage=postgres)
