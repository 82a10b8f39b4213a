"""Pruners whose resources come from the search space, and the patient median rule."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from harness.cli import main
from harness.pruning import Evaluations, evaluation_range, make_pruner

SPACE = {
    "train.epochs": IntDistribution(2, 6),
    "train.batch_size": CategoricalDistribution([8, 16, 32]),
}


def test_the_space_tells_the_shortest_and_longest_trials_evaluations(make_cfg):
    train = make_cfg("backend=fake").train
    assert evaluation_range(train, SPACE, 100) == Evaluations(2, 6)  # one per epoch
    train.eval_every_steps = 10
    # batch 32: 4 steps an epoch, 2 epochs: 8 steps, one evaluation (at the end); batch 8: 13 a
    # epoch, 6 epochs: 78 steps, evaluations at 10, 20, ..., 70 and 78
    assert evaluation_range(train, SPACE, 100) == Evaluations(1, 8)
    train.max_steps = 25
    assert evaluation_range(train, SPACE, 100) == Evaluations(1, 3)
    assert evaluation_range(train, SPACE, 100, each_epoch=True) == Evaluations(2, 6)  # the fake
    train.eval_every_steps, train.max_steps, train.epochs = 0, 0, 3
    assert evaluation_range(train, {}, 100) == Evaluations(3, 3)  # nothing searched: fixed


def test_auto_resources_come_from_the_space(make_cfg):
    cfg = make_cfg("backend=fake", "pruner=hyperband")
    hyperband = make_pruner(cfg.pruner, Evaluations(2, 6))
    assert hyperband._min_resource == 2 and hyperband._max_resource == 6
    asha = make_pruner(cfg.pruner, Evaluations(3, 9), name="asha")
    assert asha._min_resource == 3
    median = make_pruner(
        make_cfg("backend=fake", "pruner=median", "pruner.n_warmup_steps=auto").pruner
    )
    assert median._n_warmup_steps == 1  # no evaluations known: auto is the first
    cfg.pruner.min_resource = 4  # a number given is kept
    assert make_pruner(cfg.pruner, Evaluations(2, 6))._min_resource == 4


def _finished(study: optuna.Study, curve: list[float]) -> None:
    trial = study.ask()
    for step, value in enumerate(curve, 1):
        trial.report(value, step)
    study.tell(trial, curve[-1])


def _pruned_at(study: optuna.Study, curve: list[float]) -> int | None:
    """The evaluation at which the study's pruner stops a trial with this curve, or None."""
    trial = study.ask()
    for step, value in enumerate(curve, 1):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, curve[-1])
    return None


@pytest.mark.parametrize("name", ["median", "patient"])
def test_a_late_climber_survives_only_the_patient_rule(make_cfg, name):
    cfg = make_cfg("backend=fake", f"pruner={name}", "pruner.n_warmup_steps=2")
    study = optuna.create_study(direction="maximize", pruner=make_pruner(cfg.pruner))
    for _ in range(5):
        _finished(study, [0.5, 0.6, 0.65, 0.7, 0.72, 0.73])
    # starts worse and keeps climbing: ends above every finished trial
    climber = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert _pruned_at(study, climber) == (2 if name == "median" else None)
    # below the median and not improving (a model stuck at chance level): the patient rule
    # prunes it too, once its patience (2 evaluations without improvement) has run out
    stuck = [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert _pruned_at(study, stuck) == (2 if name == "median" else 3)
    assert _pruned_at(study, [0.3, 0.35, 0.34, 0.33, 0.5, 0.6]) == (2 if name == "median" else 4)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("pruner.min_resource=-1", "pruner.min_resource must be at least 1 (or auto), not -1"),
        ("pruner.min_resource=soon", "pruner.min_resource must be at least 1 (or auto)"),
        ("pruner.patience=-2", "pruner.patience must be at least 0, not -2"),
    ],
)
def test_bad_pruner_settings_are_refused_before_anything_is_written(runs, capsys, setting, says):
    assert main(["sweep", "backend=fake", "pruner=patient", setting, f"paths.runs_dir={runs}"])
    assert says in capsys.readouterr().err
    assert not runs.exists()
