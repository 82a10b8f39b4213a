"""Many processes on one study: `sweep.n_workers` on one host, with the default journal storage
and MLflow store."""

from __future__ import annotations

import os

import pytest

from harness.config import ConfigError
from harness.study import load_study, plan_study
from tests.helpers import run_cli, start_cli, study_runs, wait_for_running


@pytest.mark.slow  # many processes
def test_n_workers_share_one_study_and_one_parent_run(make_cfg, runs):
    overrides = [
        "backend=fake",
        # a second a trial: longer than a worker process takes to start (3-4 s on a busy
        # 2-core machine), so every worker gets trials before the first has run them all
        "backend.seconds_per_epoch=0.5",
        "train.epochs=2",
        "sweep.n_trials=12",
        "sweep.n_workers=3",
        "pruner=none",
    ]
    result = run_cli("sweep", *overrides, runs=runs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "database is locked" not in output
    cfg = make_cfg(*overrides)
    trials = load_study(cfg).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 12  # exactly n_trials, none extra
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 3  # three processes ran trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 12  # no params drawn twice
    found = study_runs(cfg)
    parents, children = found.parents, found.trials
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 12
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert parents[0].data.metrics["trials_complete"] == 12
    # each trial number has exactly one run
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(12))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.n_trials=0", "sweep.n_trials must be at least 1"),
        ("sweep.n_workers=0", "sweep.n_workers must be at least 1"),
    ],
)
def test_counts_below_one_are_refused(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        plan_study(make_cfg("backend=fake", override))


def test_sqlite_storage_is_refused_for_parallel_workers(make_cfg, tmp_path):
    cfg = make_cfg("backend=fake", "sweep.n_workers=2", f"storage.url=sqlite:///{tmp_path}/o.db")
    with pytest.raises(ConfigError, match="SQLite is not"):
        plan_study(cfg)


@pytest.mark.slow  # many processes, an interrupt
def test_ctrl_c_with_workers_closes_every_trial_and_run(make_cfg, runs):
    """SIGINT to the sweep: its helpers get one interrupt each, every trial ends FAIL or
    finished, no MLflow run stays RUNNING, and no helper outlives the sweep."""
    import signal

    import optuna

    from harness.storage import storage_for

    overrides = ["backend=fake", "backend.seconds_per_epoch=1", "sweep.n_trials=8",
                 "sweep.n_workers=2", "pruner=none"]  # fmt: skip
    cfg = make_cfg(*overrides)
    process = start_cli("sweep", *overrides, runs=runs)
    wait_for_running(
        cfg.name,
        storage_for(cfg),
        lambda running: len({t.user_attrs.get("worker", {}).get("pid") for t in running}) == 2,
        "both processes are inside a trial",
    )
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 130, output
    study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
    for pid in pids:  # every process that ran a trial is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"worker {pid} outlived the sweep")
    statuses = [r.info.status for r in study_runs(cfg).runs]
    assert "RUNNING" not in statuses


def test_one_worker_with_a_fixed_seed_draws_the_same_trials(tmp_path):
    from harness.config import load_config
    from harness.study import Sweep

    def params(folder: str) -> list[dict]:
        overrides = ["backend=fake", "sweep.n_trials=6", f"paths.runs_dir={tmp_path / folder}"]
        study = Sweep(load_config(overrides), overrides).run()
        return [t.params for t in study.trials]

    assert params("a") == params("b")
