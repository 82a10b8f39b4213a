"""Many processes on one study: `sweep.n_workers` on one host, with the default journal storage
and MLflow store."""

from __future__ import annotations

import os
import re

import pytest

from harness.config import ConfigError, load_config
from harness.study import Sweep, load_study, plan_study
from harness.tracking import InMemoryStore
from tests.helpers import RENDEZVOUS, run_cli, start_cli, study_runs, wait_for_running


@pytest.mark.slow  # many processes
def test_n_workers_share_one_study_and_one_parent_run(make_cfg, runs):
    overrides = [
        "backend=fake",
        RENDEZVOUS,  # every worker gets trials before the first has run them all
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


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # two processes, ~1 s a trial
def test_a_stop_rule_stops_every_worker(make_cfg, runs, tmp_path):
    """sweep.budget_steps with 2 workers: each reads the rule from the stored study after each
    of its trials, so all stop; only the trial the other worker had in flight when the budget
    was spent can overshoot it."""
    fixed = [
        "backend=fake",
        RENDEZVOUS,  # both workers get to run trials
        "backend.seconds_per_epoch=0.5",
        "train.epochs=2",  # every trial takes the same steps
        "search=none",
        "train.trainable_blocks=choice(-1,0,1)",  # searched; the fake backend ignores it
        "pruner=none",
    ]
    probe = [*fixed, "backend.seconds_per_epoch=0", "sweep.n_trials=1"]
    probe_cfg = load_config([*probe, f"paths.runs_dir={tmp_path / 'probe'}"])
    steps = Sweep(probe_cfg, probe, tracker_factory=InMemoryStore().tracker).run()
    per_trial = int(steps.trials[0].user_attrs["steps"])
    needed = 8  # trials whose steps spend the budget: 7 take less
    overrides = [*fixed, f"sweep.budget_steps={needed * per_trial}", "sweep.n_trials=30",
                 "sweep.n_workers=2"]  # fmt: skip
    result = run_cli("sweep", *overrides, runs=runs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "stopped by sweep.budget_steps" in " ".join(output.split())
    cfg = make_cfg(*overrides)
    trials = load_study(cfg).trials
    assert {t.state.name for t in trials} == {"COMPLETE"}  # none left RUNNING
    # the worker that did not spend the budget may finish the one trial it had in flight
    assert needed <= len(trials) <= needed + 1
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2  # both processes ran trials ...
    assert all(gone(pid) for pid in pids)  # ... and stopped
    found = study_runs(cfg)
    (parent,) = found.parents
    assert parent.info.status == "FINISHED"
    # the spend when the parent process found the rule met: the other's last trial may follow
    reason = re.fullmatch(
        rf"step budget: the study's trials took (\d+) optimizer steps of "
        rf"sweep.budget_steps={needed * per_trial}",
        parent.data.tags["harness.stop_reason"],
    )
    assert reason is not None, parent.data.tags["harness.stop_reason"]
    assert int(reason[1]) in (needed * per_trial, len(trials) * per_trial)
    assert len(found.trials) == len(trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in found.trials} == {parent.info.run_id}


@pytest.mark.slow  # two processes, ~1 s an evaluation
def test_two_workers_prune_a_multi_objective_study_by_pareto_rank(make_cfg, runs):
    """Two good learning rates run first (enqueued; each value once: Optuna skips a repeated
    one), then six bad ones, whose eval/f1 is far lower for the same steps. A bad trial judged
    once both good ones completed is dominated and pruned, whichever worker runs it; every
    trial of both workers is recorded once, under the one parent run."""
    good, bad = ["0.001", "0.0009"], ["0.00001", "0.00002", "0.00003", "0.00004", "0.00005", "6e-5"]
    rates = [*good, *bad]
    enqueued = ", ".join(f"{{train.learning_rate: {rate}}}" for rate in rates)
    overrides = [
        "backend=fake",
        RENDEZVOUS,  # both workers run trials: the two good ones start together
        "backend.seconds_per_epoch=1",
        "train.epochs=3",
        "search=none",
        f"train.learning_rate=choice({','.join(rates)})",
        "sweep.objectives={eval/f1: maximize, train/steps: minimize}",
        "pruner=median",
        "pruner.n_startup_trials=2",
        "pruner.n_warmup_steps=0",
        f"sweep.enqueue=[{enqueued}]",
        "sweep.n_trials=8",
        "sweep.n_workers=2",
    ]
    result = run_cli("sweep", *overrides, runs=runs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pruner median (Pareto rank)" in output
    cfg = make_cfg(*overrides)
    trials = load_study(cfg).trials
    assert [t.params["train.learning_rate"] for t in trials] == [float(r) for r in rates]
    states = {t.number: t.state.name for t in trials}
    assert states[0] == states[1] == "COMPLETE"
    pruned = [n for n, state in states.items() if state == "PRUNED"]
    assert set(states.values()) == {"COMPLETE", "PRUNED"}
    # the bad trial a worker started before both good ones completed may end unjudged
    assert len(pruned) >= len(bad) - 1 and min(pruned) >= 2
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2
    found = study_runs(cfg)
    (parent,) = found.parents
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    recorded = {int(r.data.tags["optuna.trial_number"]): r for r in found.trials}
    assert sorted(recorded) == list(range(8))  # every trial of both workers, once
    for number, run in recorded.items():
        assert run.data.tags["optuna.trial_state"] == states[number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"


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
