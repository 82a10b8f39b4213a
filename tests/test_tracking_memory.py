"""The in-memory tracker: a sweep recorded in memory (no MLflow store written), closing runs
by the same rules as MLflow's tracker, and model logging left to a backend that can."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.backends.local import LocalBackend
from harness.study import Sweep, make_backend
from harness.tracking import UNRECORDED, InMemoryStore
from tests.helpers import window_ends

FAST = ("backend=fake", "tracking.log_best_model=false", "sweep.n_trials=3", "pruner=median")


def test_a_sweep_in_memory_records_parent_and_trial_runs_and_no_mlflow_store(make_cfg, runs):
    store = InMemoryStore()
    cfg = make_cfg(*FAST)
    study = Sweep(cfg, list(FAST), tracker_factory=store.tracker).run()
    [parent] = store.runs_of(cfg.name, "study")
    trials = store.runs_of(cfg.name, "trial")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.run_id
    assert parent.status == "FINISHED" and parent.metrics["trials_complete"] == [(0, 3.0)]
    assert parent.tags["best_trial"] == str(study.best_trial.number)
    assert "config.yaml" in parent.texts
    assert [t.user_attrs["mlflow_run_id"] for t in study.trials] == [r.run_id for r in trials]
    for trial, run in zip(study.trials, trials, strict=True):
        assert run.status == "FINISHED" and run.tags["optuna.trial_state"] == "COMPLETE"
        assert run.tags["mlflow.parentRunId"] == parent.run_id
        assert run.tags["optuna.trial_number"] == str(trial.number)
        assert run.metrics["objective"][-1][1] == trial.value
        assert set(trial.params) <= set(run.params) and "config.yaml" in run.texts
        # train/loss windowed as MLflow's runs log it (tracking.log_every_steps)
        assert [step for step, _ in run.metrics["train/loss"]] == window_ends(
            trial.user_attrs["steps"]
        )
    assert not (runs / "mlflow.db").exists()
    resumed = Sweep(make_cfg(*FAST, "sweep.n_trials=4"), list(FAST), tracker_factory=store.tracker)
    resumed.run()
    assert store.runs_of(cfg.name, "study") == [parent]  # found again, not a second one
    assert len(store.runs_of(cfg.name, "trial")) == 4


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_runs_left_open_are_closed_by_what_optuna_says_of_their_trial(make_cfg):
    store = InMemoryStore()
    tracker = store.tracker(make_cfg(*FAST))
    cfg = make_cfg(*FAST)
    runs = [
        tracker.start_run(f"trial-{n}", {}, {"optuna.trial_number": str(n)}, cfg) for n in range(4)
    ]
    orphan = tracker.start_run("train", {}, {}, cfg)  # a run of no trial whose process died
    store.runs[orphan.run_id].tags["harness.pid"] = str(_dead_pid())
    trials = {0: ("COMPLETE", ""), 1: ("FAIL", "out of memory"), 2: ("RUNNING", "")}
    tracker.close_abandoned_runs(trials)
    status = {r.run_id: store.runs[r.run_id].status for r in [*runs, orphan]}
    assert [status[r.run_id] for r in runs] == ["FINISHED", "FAILED", "RUNNING", "RUNNING"]
    assert status[orphan.run_id] == "KILLED"
    assert store.runs[runs[1].run_id].tags["harness.failure_reason"] == "out of memory"
    runs[2].end("FINISHED", {"optuna.trial_state": "COMPLETE"})  # ... then Optuna lost it
    tracker.fail_stale_run(2, "its process died")
    assert store.runs[runs[2].run_id].status == "FAILED"
    assert store.runs[runs[2].run_id].tags["harness.failure_reason"] == UNRECORDED
    tracker.fail_stale_run(3, "its process died")
    assert store.runs[runs[3].run_id].tags["harness.failure_reason"] == "its process died"


def test_only_a_backend_that_logs_models_can_have_one_logged(make_cfg, tmp_path):
    store = InMemoryStore()
    cfg = make_cfg(*FAST)
    tracker = store.tracker(cfg)
    run = tracker.start_run("train", {}, {}, cfg)
    with pytest.raises(TypeError, match="backend FakeBackend saved a model it cannot log"):
        tracker.log_model(run.run_id, make_backend(cfg), tmp_path, "classification")
    uri = tracker.log_model(run.run_id, LocalBackend(), tmp_path, "classification", "champ")
    assert uri == "models:/champ/1" and store.models[0].model_dir == tmp_path
    tracker.log_hosted_model(run.run_id, "train", {"id": "ft:gpt-x:abc", "job": "j-1"})
    assert tracker.run_tags(run.run_id)["harness.hosted_model"] == "ft:gpt-x:abc"


def test_workers_record_in_mlflow_so_the_memory_tracker_refuses_them(make_cfg):
    cfg = make_cfg(*FAST, "sweep.n_workers=2")
    with pytest.raises(ValueError, match=r"sweep\.n_workers > 1 records in MLflow"):
        Sweep(cfg, [], tracker_factory=InMemoryStore().tracker)


def test_trials_nested_under_a_parent_run_deleted_by_a_race_move_to_the_settled_one(make_cfg):
    """Worker Y found W's new parent run and nested its trials under it; W then found an older
    parent run (a third worker's, its clock behind) and deleted its own. At the end Y's trials
    move under the parent every worker settled on, and Y tags that one, not the deleted one."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import MLflowTracker, tracking_uri

    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    doomed = tracker.parent_run({})  # W's, found by Y
    child = tracker.start_run("trial-0000", {}, {"optuna.trial_number": "0"}, cfg, doomed)
    child.end("FINISHED")
    client = MlflowClient(tracking_uri(cfg))
    started = client.get_run(doomed).info.start_time
    older = client.create_run(  # the third worker's, created with an earlier clock
        tracker.experiment_id,
        start_time=started - 1000,
        tags={"harness.study": cfg.name, "harness.role": "study"},
    ).info.run_id
    client.delete_run(doomed)  # W deletes its own, as parent_run does on losing
    assert tracker.settle_parent(doomed) == older
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == older
    assert tracker.settle_parent(older) == older  # settled: nothing moves
