"""Workers on many hosts: the same `harness sweep` started three times, joined through Optuna's
RDB storage on the machine's PostgreSQL and one real `mlflow server` on loopback. Each worker
is a separate process with its own HARNESS_WORKER_INDEX, as a SLURM array task or a Kubernetes
indexed Job would be."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import optuna
import pytest

from tests.helpers import cli_env, reported, run_cli, start_cli, study_runs, wait_for_running

pytestmark = pytest.mark.slow  # many processes, PostgreSQL, an mlflow server (slow tier)


def test_three_workers_share_a_study_through_postgres_and_a_tracking_server(
    postgres, mlflow_server, tmp_path
):
    name = f"many_hosts_{uuid.uuid4().hex[:8]}"
    # a password in the storage URL (trust auth ignores it) must be redacted everywhere
    password = "s3cret-pw-9471"
    with_password = postgres.replace("postgres@", f"postgres:{password}@")
    overrides = [
        "backend=fake",
        f"name={name}",
        "sweep.n_trials=60",
        "pruner=none",
        f"storage.url={with_password}",
        f"tracking.uri={mlflow_server}",
    ]
    workers = [
        start_cli(
            "sweep",
            *overrides,
            runs=tmp_path / f"host{index}",
            env=cli_env(HARNESS_WORKER_INDEX=str(index)),
        )
        for index in range(3)
    ]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    try:
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output
        study = optuna.load_study(study_name=name, storage=postgres)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 60
        assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
        hosts = {t.user_attrs["worker"]["pid"] for t in finished}
        assert len(hosts) == 3  # every worker ran trials
        found = study_runs(mlflow_server, name)
        client, parents, children = found.client, found.parents, found.trials
        assert len(parents) == 1
        assert parents[0].info.status == "FINISHED"
        # one run per finished trial: none lost, none duplicated, all nested, all closed
        numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
        assert numbers == sorted(t.number for t in finished)
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
        assert {r.info.status for r in children} == {"FINISHED"}
        # the password is in no output, param, tag, config artifact or Optuna attribute
        assert not any(password in output for output in outputs)
        for run in [*parents, *children[:5]]:
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(password in value for value in values)
            config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
            assert password not in config.read_text()
            assert "postgres:***@127.0.0.1" in config.read_text()
        attrs = [study.user_attrs, *(t.user_attrs for t in study.trials)]
        assert password not in repr(attrs)
    finally:
        optuna.delete_study(study_name=name, storage=postgres)


def test_worker_killed_mid_trial_is_found_by_its_stopped_heartbeat(postgres, tmp_path):
    """kill -9 of a worker on an RDB storage: once its heartbeat is older than the grace
    period, the next worker fails the trial, closes its MLflow run as FAILED, and retries it
    once with the same params; the study still ends with n_trials finished trials."""
    import signal
    import time

    from harness.config import load_config

    name = f"heartbeat_{uuid.uuid4().hex[:8]}"
    overrides = [
        "backend=fake",
        "backend.seconds_per_epoch=1",
        "train.epochs=3",
        f"name={name}",
        "sweep.n_trials=2",
        "pruner=none",
        f"storage.url={postgres}",
        "storage.heartbeat_s=1",
        "storage.grace_s=2",
        f"paths.runs_dir={tmp_path}",
    ]
    worker = start_cli("sweep", *overrides, stdout=subprocess.DEVNULL)
    try:
        wait_for_running(name, postgres, reported, "the worker has reported in a trial")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        # another host: the pid means nothing there, only the heartbeat tells
        time.sleep(3)
        result = run_cli("sweep", *overrides, env=cli_env(HARNESS_WORKER_INDEX="1"))
        assert result.returncode == 0, result.stdout + result.stderr
        study = optuna.load_study(study_name=name, storage=postgres)
        dead = study.trials[0]
        assert dead.state.name == "FAIL"
        retry = next(t for t in study.trials if t.user_attrs.get("harness_retry_of") == 0)
        assert retry.params == dead.params and retry.state.name == "COMPLETE"
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
        cfg = load_config(overrides)
        runs = study_runs(cfg).by_name
        assert runs["trial-0000"].info.status == "FAILED"
        assert "heartbeat" in runs["trial-0000"].data.tags["harness.failure_reason"]
        assert "RUNNING" not in {r.info.status for r in runs.values()}
    finally:
        if worker.poll() is None:
            worker.kill()
        optuna.delete_study(study_name=name, storage=postgres)
