"""Study logic end to end with the fake backend: real Optuna storage, real MLflow store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import pytest

from harness.backends.base import UntunableKeyError
from harness.config import ConfigError
from harness.search import SearchSpaceError
from harness.storage import storage_for
from harness.study import Sweep, load_study, reproduce_command
from harness.tracking import InMemoryStore
from tests.helpers import (
    past_the_first_trial,
    start_cli,
    study_runs,
    wait_for_running,
    window_ends,
)

FAKE = (
    "backend=fake",
    "sampler=random",
    "pruner=median",
    "pruner.n_startup_trials=2",
    "pruner.n_warmup_steps=0",
)


def children(cfg):
    found = study_runs(cfg)
    return found.client, found.parents, found.trials


def test_sweep_records_parent_and_nested_trials(make_cfg):
    cfg = make_cfg(*FAKE, "sweep.n_trials=8")
    study = Sweep(cfg, list(FAKE)).run()
    assert len(study.trials) == 8
    client, parents, trials = children(cfg)
    assert len(parents) == 1 and parents[0].info.run_name == cfg.name
    assert parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    assert sorted(r.info.run_name for r in trials) == [f"trial-{n:04d}" for n in range(8)]
    keys = {frozenset(r.data.params) for r in trials}
    assert keys == {frozenset(cfg.search.space)}  # same param keys in every trial
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trials}
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["optuna.study_name"] == cfg.name
        assert run.data.tags["optuna.trial_state"] == trial.state.name
        assert run.data.params["train.batch_size"] == str(trial.params["train.batch_size"])
        assert (
            "git.commit" in run.data.tags and run.data.tags["version.optuna"] == optuna.__version__
        )
        assert run.data.tags["seed"] == "0"
        assert any(k.startswith("data.sha256.") for k in run.data.tags)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["objective"] == pytest.approx(trial.value)
            history = client.get_metric_history(run.info.run_id, "eval/f1")
            assert [m.step for m in history] == sorted(m.step for m in history)
            assert len(history) == trial.params["train.epochs"]
            assert "test/f1" in run.data.metrics
            losses = client.get_metric_history(run.info.run_id, "train/loss")
            assert [m.step for m in losses] == window_ends(trial.user_attrs["steps"])
        elif trial.state == optuna.trial.TrialState.PRUNED:
            assert run.info.status == "FINISHED"  # told apart by optuna.trial_state (above)
            assert "pruned at evaluation" in run.data.tags["harness.pruned_reason"]
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert parents[0].data.metrics["best_objective"] == pytest.approx(study.best_value)


def test_resume_adds_only_missing_trials_under_the_same_parent(make_cfg):
    first = Sweep(make_cfg(*FAKE, "sweep.n_trials=3"), list(FAKE)).run()
    assert len(first.trials) == 3
    cfg = make_cfg(*FAKE, "sweep.n_trials=5")
    again = Sweep(cfg, list(FAKE)).run()
    assert len(again.trials) == 5
    assert len(Sweep(cfg, list(FAKE)).run().trials) == 5  # complete: nothing more to do
    _, parents, trials = children(cfg)
    assert len(parents) == 1
    assert len(trials) == 5
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}


def test_interrupted_trial_is_failed_and_replaced_on_resume(make_cfg):
    cfg = make_cfg(*FAKE, "sweep.n_trials=4")
    Sweep(make_cfg(*FAKE, "sweep.n_trials=2"), list(FAKE)).run()
    # a process killed mid-trial leaves the trial RUNNING in the storage
    study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = study.ask()
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": int(gone.stdout)})
    alive = study.ask()  # a trial of a live process (this one) must be left alone
    alive.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    resumed = Sweep(cfg, list(FAKE)).run()
    states = [t.state.name for t in resumed.trials]
    assert resumed.trials[dead.number].state.name == "FAIL"
    assert resumed.trials[alive.number].state.name == "RUNNING"
    assert states.count("FAIL") == 1
    # the live worker's running trial counts toward n_trials: 3 finished + 1 running = 4
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3
    retry = next(t for t in resumed.trials if "harness_retry_of" in t.user_attrs)
    assert retry.user_attrs["harness_retry_of"] == dead.number


@pytest.mark.slow  # a kill -9 of a sweep process; test_faults_recovery kills at every moment
def test_sweep_killed_mid_trial_resumes_cleanly(make_cfg, runs):
    """kill -9 during a trial: on resume that trial is FAIL in Optuna and FAILED in MLflow, and
    the study still ends with exactly n_trials finished trials under one parent run."""
    overrides = [*FAKE, "backend.seconds_per_epoch=1", "train.epochs=3", "sweep.n_trials=3"]
    cfg = make_cfg(*overrides)
    process = start_cli("sweep", *overrides, runs=runs, stdout=subprocess.DEVNULL)
    try:
        wait_for_running(
            cfg.name, storage_for(cfg), past_the_first_trial, "the second trial has reported"
        )
    finally:
        process.kill()
        process.wait(timeout=30)
    fast = [o for o in overrides if not o.startswith("backend.seconds")]
    resumed = Sweep(make_cfg(*fast), fast).run()
    states = [t.state.name for t in resumed.trials]
    assert states.count("FAIL") == 1
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3
    killed = next(t.number for t in resumed.trials if t.state.name == "FAIL")
    retry = next(t for t in resumed.trials if t.user_attrs.get("harness_retry_of") == killed)
    assert retry.params == resumed.trials[killed].params  # retried once, same params
    _, parents, trials = children(cfg)
    assert len(parents) == 1
    killed_run = next(r for r in trials if r.data.tags["optuna.trial_number"] == str(killed))
    assert killed_run.info.status == "FAILED"
    assert "process running this trial ended" in killed_run.data.tags["harness.failure_reason"]
    assert all(r.info.status != "RUNNING" for r in trials)


def test_resumed_sweep_draws_new_params(make_cfg):
    memory = InMemoryStore().tracker  # what MLflow records is not under test here
    first = Sweep(make_cfg(*FAKE, "sweep.n_trials=3"), list(FAKE), tracker_factory=memory).run()
    old = [t.params["train.learning_rate"] for t in first.trials]
    resumed = Sweep(make_cfg(*FAKE, "sweep.n_trials=6"), list(FAKE), tracker_factory=memory).run()
    new = [t.params["train.learning_rate"] for t in resumed.trials[3:]]
    assert not set(old) & set(new)


def test_failing_trial_fails_alone_and_the_study_goes_on(make_cfg):
    overrides = [
        "backend._target_=tests.helpers.FlakyBackend",
        "backend=fake",
        "sampler=grid",
        "search=none",
        "train.batch_size=choice(8, 16, 32)",
        "pruner=none",
    ]
    cfg = make_cfg(*overrides, "sweep.n_trials=3")
    study = Sweep(cfg, overrides).run()
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    _, _, trials = children(cfg)
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(failed) == 1
    assert "out of memory (simulated" in failed[0].data.tags["harness.failure_reason"]


def test_errors_before_any_trial(make_cfg, runs):
    with pytest.raises(UntunableKeyError, match=r"cannot tune model\.n_layer"):
        Sweep(make_cfg("backend=fake", "model.n_layer=choice(1, 2)"), [])
    with pytest.raises(SearchSpaceError, match=r"train\.dropout: 'interval\(0.5, 0.1\)'"):
        Sweep(make_cfg("backend=fake", "train.dropout=interval(0.5, 0.1)"), [])
    with pytest.raises(ConfigError, match=r"train\.epochs=interval\(1, 3\): 1.0 is not valid"):
        Sweep(make_cfg("backend=fake", "train.epochs=interval(1, 3)"), [])
    with pytest.raises(ConfigError, match=r"sweep.metric=test/f1 is not measured"):
        Sweep(make_cfg("backend=fake", "sweep.metric=test/f1"), [])
    assert not (runs / "mlflow.db").exists()  # nothing was started


def test_best_and_reproduce_command(make_cfg):
    overrides = [*FAKE, "sweep.n_trials=4", "train.max_length=32"]
    cfg = make_cfg(*overrides)
    Sweep(cfg, overrides, tracker_factory=InMemoryStore().tracker).run()
    study = load_study(cfg)
    command = reproduce_command("train", study.user_attrs["overrides"], study.best_params)
    assert command.startswith("harness train backend=fake")
    assert "train.max_length=32" in command
    assert "sweep.n_trials" not in command  # means nothing to `harness train`
    assert f"train.learning_rate={study.best_params['train.learning_rate']!r}" in command
    with pytest.raises(ConfigError, match="harness sweep study=nothing_here"):
        load_study(make_cfg("backend=fake", "name=nothing_here"))


def test_secrets_are_redacted_from_logged_config(make_cfg):
    from harness.secrets import redact, redact_override
    from harness.tracking import config_yaml

    cfg = make_cfg("backend=fake", "storage.url=postgresql://bob:hunter2@db:5432/optuna")
    text = config_yaml(cfg)
    assert "hunter2" not in text and "postgresql://bob:***@db:5432/optuna" in text
    assert redact({"openai_api_key": "sk-123", "n": 1}) == {"openai_api_key": "***", "n": 1}
    assert "max_new_tokens: 32" in text  # a key merely containing "token" is no secret
    assert redact_override("backend.api_key=sk-123") == "backend.api_key=***"
    assert redact_override("storage.url=mysql://u:pw@h/db") == "storage.url=mysql://u:***@h/db"


def test_hyperband_prunes_on_evaluation_index(make_cfg):
    overrides = ["backend=fake", "sampler=random", "pruner=hyperband", "train.epochs=6"]
    cfg = make_cfg(*overrides, "sweep.n_trials=12")
    study = Sweep(cfg, overrides, tracker_factory=InMemoryStore().tracker).run()
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and "COMPLETE" in states
    for trial in study.trials:  # Optuna steps are evaluation indexes 1..epochs
        assert set(trial.intermediate_values) <= set(range(1, 7))
