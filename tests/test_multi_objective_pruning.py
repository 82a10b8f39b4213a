"""Pruning a multi-objective study by Pareto rank (harness.pareto_pruner): the rule on stored
vectors, and sweeps with the fake backend that prune, or with pruner=none do not."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState, create_trial

from harness.pareto_pruner import (
    ATTR_PREFIX,
    ParetoPruner,
    describe,
    dominates,
    pareto_ranks,
    pruner_for_objectives,
    values_at,
)
from harness.pruning import Evaluations
from harness.report import pruning_savings
from harness.study import Sweep
from harness.tracking import InMemoryStore

FAST = ("backend=fake", "tracking.log_best_model=false")
TWO = "sweep.objectives={eval/f1: maximize, train/steps: minimize}"
GOALS = [("eval/f1", "maximize"), ("train/steps", "minimize")]


def study_of(*vectors: dict[int, list[float]], state: TrialState = TrialState.COMPLETE):
    """A multi-objective study whose trials stored these vectors ({evaluation: [f1, steps]})."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for by_step in vectors:
        last = by_step[max(by_step)]
        study.add_trial(
            create_trial(
                state=state,
                values=last if state == TrialState.COMPLETE else None,
                user_attrs={f"{ATTR_PREFIX}{step}": v for step, v in by_step.items()},
            )
        )
    return study


def pruner(startup: int = 1, warmup: int = 0) -> ParetoPruner:
    return ParetoPruner(GOALS, n_startup_trials=startup, n_warmup_steps=warmup)


def test_pareto_ranks_peel_fronts_of_minimized_vectors():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (2, 1))
    assert not dominates((1, 1), (1, 1))
    assert pareto_ranks([(1, 5), (2, 2), (5, 1), (3, 3), (4, 4), (2, 2)]) == [0, 0, 0, 1, 2, 0]


def test_a_dominated_trial_is_pruned_and_one_on_the_front_kept():
    study = study_of({1: [0.8, 10.0]}, {1: [0.7, 5.0]})
    assert pruner().should_prune(study, 1, [0.6, 12.0])  # worse f1 and more steps than both
    assert not pruner().should_prune(study, 1, [0.9, 20.0])  # best f1: on the front
    assert not pruner().should_prune(study, 1, [0.75, 7.0])  # between the two: on the front
    # directions count: the same numbers, f1 minimized, put the trial on the front
    flipped = ParetoPruner(
        [("eval/f1", "minimize"), ("train/steps", "minimize")], n_startup_trials=1, n_warmup_steps=0
    )
    assert not flipped.should_prune(study, 1, [0.6, 12.0])


def test_a_dominated_trial_ahead_of_most_completed_ones_is_kept():
    # ranks with the candidate: A 0, candidate 1 (behind A only), B 2, C 3: median of A, B, C is 2
    study = study_of({1: [0.9, 5.0]}, {1: [0.5, 50.0]}, {1: [0.4, 60.0]})
    assert not pruner().should_prune(study, 1, [0.6, 40.0])
    assert pruner().should_prune(study, 1, [0.45, 55.0])  # behind A and B: rank 2 > median 1


def test_startup_trials_warmup_and_unreached_evaluations_prune_nothing():
    study = study_of({1: [0.8, 10.0], 2: [0.9, 20.0]}, {1: [0.7, 5.0], 2: [0.85, 10.0]})
    bad = [0.1, 100.0]
    assert pruner(startup=2).should_prune(study, 1, bad)
    assert not pruner(startup=3).should_prune(study, 1, bad)  # only 2 trials completed
    assert not pruner(warmup=2).should_prune(study, 1, bad)  # evaluation 1 < 2
    assert pruner(warmup=2).should_prune(study, 2, bad)
    assert not pruner().should_prune(study, 3, bad)  # no completed trial reached evaluation 3
    # pruned trials are no yardstick: only complete ones are (as Optuna's median pruner)
    assert not pruner().should_prune(study_of({1: [0.9, 1.0]}, state=TrialState.PRUNED), 1, bad)


def test_optunas_prune_call_reads_the_trials_latest_stored_vector():
    study = study_of({1: [0.8, 10.0], 2: [0.9, 20.0]})
    running = create_trial(
        state=TrialState.RUNNING,
        user_attrs={f"{ATTR_PREFIX}1": [0.9, 5.0], f"{ATTR_PREFIX}2": [0.5, 30.0], "steps": 3},
    )
    assert pruner().prune(study, running)  # evaluation 2 decides, not 1
    assert not pruner().prune(study, create_trial(state=TrialState.RUNNING))  # nothing stored


def test_midway_values_of_costs_and_which_objectives_are_ranked():
    goals = [("eval/f1", "maximize"), ("train/seconds", "minimize"), ("cost_usd", "minimize")]
    seen = {"eval/f1": 0.5, "eval/loss": 0.7}
    assert values_at(goals, seen, seconds=3.5, steps=40, cost_usd=0.25) == [0.5, 3.5, 0.25]
    assert values_at(goals, seen, seconds=3.5, steps=40, cost_usd=None) is None  # not yet billed
    assert values_at([("train/steps", "minimize")], {}, seconds=0, steps=7, cost_usd=None) == [7.0]
    settings = {"n_startup_trials": 4, "n_warmup_steps": 1, "min_resource": "auto"}
    cfg = OmegaConf.create({"name": "hyperband", **settings})
    with_test = [("eval/f1", "maximize"), ("test/f1", "maximize"), ("train/steps", "minimize")]
    made = pruner_for_objectives(cfg, with_test, Evaluations(least=2, most=6))
    assert isinstance(made, ParetoPruner)  # any pruner but none: Pareto, with its settings
    # hyperband's first decision is its first rung: min_resource, auto the shortest trial's end
    assert (made.goals, made.n_startup_trials, made.n_warmup_steps) == (GOALS, 4, 2)
    median = pruner_for_objectives(OmegaConf.create({"name": "median", **settings}), with_test)
    assert isinstance(median, ParetoPruner) and median.n_warmup_steps == 1
    notice = describe(cfg, with_test, Evaluations(least=2, most=6))
    assert notice.startswith(
        "pruning by Pareto rank (pruner=hyperband with its n_startup_trials=4, first decision "
        "at evaluation 2 (min_resource=auto))"
    )
    assert "(test/f1: measured after training, not ranked midway)" in notice
    # a rank by cost alone would stop every slower trial: off, and said so
    costs_only = [("test/f1", "maximize"), ("train/seconds", "minimize")]
    assert isinstance(pruner_for_objectives(cfg, costs_only), optuna.pruners.NopPruner)
    assert describe(cfg, costs_only).startswith("pruning is off (pruner=hyperband ignored)")
    none = OmegaConf.create({"name": "none", **settings})
    assert isinstance(pruner_for_objectives(none, with_test), optuna.pruners.NopPruner)
    assert describe(none, with_test) == ""


def sweep(make_cfg, *overrides: str) -> tuple[Sweep, optuna.Study, InMemoryStore]:
    store = InMemoryStore()
    cfg = make_cfg(*FAST, TWO, "sweep.n_trials=12", *overrides)
    runner = Sweep(cfg, [TWO], tracker_factory=store.tracker)
    return runner, runner.run(), store


def test_a_multi_objective_sweep_prunes_dominated_trials_and_ends_with_a_front(make_cfg):
    runner, study, store = sweep(make_cfg, "pruner=median", "pruner.n_startup_trials=3")
    assert any(n.startswith("pruning by Pareto rank (pruner=median") for n in runner.plan.notices)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and len(pruned) + len(complete) == 12
    runs = {r.name: r for r in store.runs_of(runner.cfg.name, "trial")}
    for trial in pruned:
        assert trial.values is None and trial.number >= 3  # none before 3 trials completed
        step = max(int(k[len(ATTR_PREFIX) :]) for k in trial.user_attrs if ATTR_PREFIX in k)
        f1, steps = trial.user_attrs[f"{ATTR_PREFIX}{step}"]
        earlier = [
            t.user_attrs[f"{ATTR_PREFIX}{step}"]
            for t in complete
            if t.number < trial.number and f"{ATTR_PREFIX}{step}" in t.user_attrs
        ]  # one worker: the trials that had completed when it was judged
        assert any(e[0] >= f1 and e[1] <= steps and e != [f1, steps] for e in earlier)
        run = runs[f"trial-{trial.number:04d}"]
        assert run.status == "FINISHED" and run.tags["optuna.trial_state"] == "PRUNED"
        assert run.tags["harness.pruned_reason"].startswith(f"pruned at evaluation {step} ")
        assert "Pareto rank" in run.tags["harness.pruned_reason"]
        assert trial.user_attrs["steps"] == steps  # what it cost, as a single objective's
    for trial in complete:  # every evaluation stored its vector; the last one is the result
        evaluations = trial.params["train.epochs"]
        last = trial.user_attrs[f"{ATTR_PREFIX}{evaluations}"]
        assert last == pytest.approx(trial.values)
        assert runs[f"trial-{trial.number:04d}"].tags["optuna.trial_state"] == "COMPLETE"
    front = study.best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    # the report extrapolates each pruned trial from its stored evaluations
    assert pruning_savings(study).estimated == len(pruned)


def test_pruner_none_prunes_no_trial_of_a_multi_objective_study(make_cfg):
    runner, study, _ = sweep(make_cfg, "pruner=none")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12
    assert not any("prun" in n for n in runner.plan.notices)
    assert not any(k.startswith(ATTR_PREFIX) for t in study.trials for k in t.user_attrs)
