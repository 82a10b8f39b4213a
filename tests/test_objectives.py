"""Several objectives (a Pareto front; their pruning: test_multi_objective_pruning.py) and warm
starts (sweep.enqueue)."""

from __future__ import annotations

import optuna
import pytest
from rich.console import Console

from harness.config import ConfigError
from harness.report import write_report
from harness.study import Sweep, load_study
from harness.tracking import InMemoryStore
from tests.helpers import run_in_process

FAST = ("backend=fake", "tracking.log_best_model=false")
WAITING = optuna.trial.TrialState.WAITING
TWO = "sweep.objectives={eval/f1: maximize, train/steps: minimize}"


def test_two_objectives_give_a_pareto_front(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, TWO, "sweep.n_trials=10", "pruner=none")
    sweep = Sweep(cfg, [TWO])
    study = sweep.run()
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.user_attrs["objectives"] == [["eval/f1", "maximize"], ["train/steps", "minimize"]]
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 10  # pruner=none: nothing pruned, nothing said of it
    assert not any("prun" in n for n in sweep.plan.notices)
    for trial in study.trials:  # each objective is the trial's own final metric
        metrics = trial.user_attrs["metrics"]
        assert trial.values == [metrics["eval/f1"], metrics["train/steps"]]
        assert trial.user_attrs["steps"] == metrics["train/steps"]
    front = study.best_trials
    assert 1 <= len(front) <= 10
    for a in front:  # no trial of the front is beaten on both objectives by any trial
        assert not any(
            b.values[0] >= a.values[0] and b.values[1] <= a.values[1] and b.values != a.values
            for b in study.trials
        )
    folder = write_report(cfg, Console(quiet=True))
    assert (folder / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (folder / "summary.md").read_text()
    assert f"## Pareto front ({len(front)} trials)" in summary


def test_the_cli_says_how_it_prunes_and_prints_the_front(tmp_path):
    done = run_in_process("sweep", *FAST, TWO, "sweep.n_trials=4", runs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "pruning by Pareto rank (pruner=hyperband" in done.stdout and "Pareto front" in done.stdout
    )
    assert "objectives=" in done.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.objectives={eval/f1: maximize, eval/speed: minimize}", "'eval/speed' is not a"),
        ("sweep.objectives={eval/f1: maximize, cost_usd: lower}", "must be maximize or minimize"),
        ("sweep.objectives={eval/f1: maximize, cost_usd: minimize}", "backend FakeBackend does"),
        ("sweep.objectives={eval/loss: minimize}", "use sweep.metric=eval/loss sweep.direction"),
    ],
)
def test_bad_objectives_are_refused_before_any_trial(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        Sweep(make_cfg(*FAST, override), [override])


def test_cmaes_and_a_changed_number_of_objectives_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="sampler=cmaes optimizes one objective"):
        Sweep(make_cfg(*FAST, TWO, "sampler=cmaes"), [])
    Sweep(make_cfg(*FAST, "sweep.n_trials=1"), [], tracker_factory=InMemoryStore().tracker).run()
    with pytest.raises(ConfigError, match=r"exists with the objective\(s\) maximize eval/f1; this"):
        Sweep(make_cfg(*FAST, TWO, "sweep.n_trials=2"), []).run()
    # the same number of objectives, another metric or direction: refused too, not mixed
    flipped = ("sweep.metric=eval/loss", "sweep.direction=minimize", "sweep.n_trials=2")
    with pytest.raises(ConfigError, match="this command has minimize eval/loss"):
        Sweep(make_cfg(*FAST, *flipped), []).run()


WARM = "sweep.enqueue=[{train.learning_rate: 0.001, train.batch_size: 16}, {train.epochs: 6}]"


def test_enqueued_param_sets_run_first_and_once(make_cfg):
    memory = InMemoryStore().tracker  # what MLflow records is not under test here
    study = Sweep(make_cfg(*FAST, WARM, "sweep.n_trials=4"), [WARM], tracker_factory=memory).run()
    first, second = study.trials[0].params, study.trials[1].params
    assert first["train.learning_rate"] == 0.001 and first["train.batch_size"] == 16
    assert second["train.epochs"] == 6
    assert study.user_attrs["harness_warm_started"] is True  # a resume enqueues nothing more
    resumed = Sweep(make_cfg(*FAST, WARM, "sweep.n_trials=6"), [WARM], tracker_factory=memory).run()
    assert len(resumed.trials) == 6 and not resumed.get_trials(states=(WAITING,))


def test_a_key_the_command_line_fixes_is_dropped_from_the_warm_start(make_cfg):
    cfg = make_cfg(*FAST, WARM, "train.epochs=3", "sweep.n_trials=2")
    sweep = Sweep(cfg, [WARM], tracker_factory=InMemoryStore().tracker)
    assert "train.epochs=6 dropped: an override fixes it to 3" in " ".join(sweep.plan.notices)
    assert sweep.warm_sets == [{"train.learning_rate": 0.001, "train.batch_size": 16}]
    study = sweep.run()
    assert study.trials[0].params["train.learning_rate"] == 0.001
    assert "train.epochs" not in study.trials[0].params  # fixed: not searched, not a param


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.enqueue=[{train.learning_rate: 5.0}]", r"train.learning_rate=5.0 is outside"),
        ("sweep.enqueue=[{train.max_length: 32}]", "train.max_length is not a searched key"),
        ("sweep.enqueue=[0.001]", "0.001 is not a param set"),
    ],
)
def test_bad_warm_starts_name_the_value(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        Sweep(make_cfg(*FAST, override), [override])


def test_warm_start_from_another_study_takes_its_best(make_cfg):
    memory = InMemoryStore().tracker  # what MLflow records is not under test here
    Sweep(make_cfg(*FAST, "name=first", "sweep.n_trials=6"), [], tracker_factory=memory).run()
    first = load_study(make_cfg(*FAST, "name=first"))
    ranked = sorted(
        (t for t in first.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: -t.values[0],
    )
    warm = "sweep.enqueue=[{from_study: first, top: 2}]"
    sweep = Sweep(
        make_cfg(*FAST, "name=second", warm, "sweep.n_trials=3"), [warm], tracker_factory=memory
    )
    second = sweep.run()
    assert [t.params for t in second.trials[:2]] == [ranked[0].params, ranked[1].params]
    assert "2 param set(s) from study 'first'" in " ".join(sweep.plan.notices)
    # values this study's choices do not hold are left to the sampler, not a crash
    narrow = ("train.batch_size=choice(4, 64)", "train.epochs=choice(7)")
    cfg = make_cfg(*FAST, "name=third", warm, *narrow, "sweep.n_trials=1")
    third = Sweep(cfg, [warm], tracker_factory=memory).run()
    taken = third.trials[0].params
    assert taken["train.learning_rate"] == ranked[0].params["train.learning_rate"]
    assert taken["train.batch_size"] in (4, 64) and taken["train.epochs"] == 7
    missing = "sweep.enqueue=[{from_study: nowhere}]"
    with pytest.raises(ConfigError, match="no study named 'nowhere'"):
        Sweep(make_cfg(*FAST, "name=fourth", missing, "sweep.n_trials=1"), [])
