import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from harness.search import (
    SearchSpaceError,
    fixed_values,
    grid_of,
    make_pruner,
    make_sampler,
    suggest,
    to_distributions,
)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("choice(8, 16, 32)", CategoricalDistribution((8, 16, 32))),
        ("8,16,32", CategoricalDistribution((8, 16, 32))),
        ("choice(adamw, sgd)", CategoricalDistribution(("adamw", "sgd"))),
        # Hydra's range excludes stop; Optuna's high is included
        ("range(1, 6)", IntDistribution(1, 5)),
        ("range(1, 6, 2)", IntDistribution(1, 5, step=2)),
        ("range(1, 7, 2)", IntDistribution(1, 5, step=2)),
        ("range(0.0, 0.3, 0.1)", FloatDistribution(0.0, 0.2, step=0.1)),
        ("interval(0.0, 0.3)", FloatDistribution(0.0, 0.3)),
        ("interval(1, 5)", FloatDistribution(1.0, 5.0)),  # Hydra makes these floats
        ("int(interval(1, 5))", IntDistribution(1, 5)),
        ("tag(log, interval(1e-5, 1e-2))", FloatDistribution(1e-5, 1e-2, log=True)),
        ("tag(log, range(1, 9))", IntDistribution(1, 8, log=True)),
    ],
)
def test_expressions_become_optuna_distributions(expression, expected):
    assert to_distributions({"train.x": expression}) == {"train.x": expected}


def test_plain_values_are_fixed_not_searched():
    space = {"train.epochs": "3", "train.lr": "interval(0.1, 0.2)", "train.name": "adamw"}
    assert set(to_distributions(space)) == {"train.lr"}
    assert fixed_values(space) == {"train.epochs": 3, "train.name": "adamw"}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("range(5, 1)", "is empty"),
        ("range(3, 3)", "is empty"),
        ("range(1, 5, 0)", "positive step"),
        ("tag(log, interval(0, 1))", "low > 0"),
        ("interval(1.0, 0.5)", "low <= high"),
        ("choice(", "cannot parse"),
        ("interval(a, b)", "cannot parse"),
        ("glob(*)", "not supported"),
        ("tag(log, range(1, 9, 2))", "log scale needs step 1"),
        ("choice()", "empty choice"),
    ],
)
def test_bad_expressions_name_key_and_expression(expression, message):
    with pytest.raises(SearchSpaceError) as error:
        to_distributions({"train.learning_rate": expression})
    assert "train.learning_rate" in str(error.value)
    assert message in str(error.value)


def test_suggest_samples_inside_each_distribution():
    dists = to_distributions(
        {"a": "tag(log, interval(1e-5, 1e-2))", "b": "range(1, 4)", "c": "choice(x, y)"}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        params = suggest(study.ask(), dists)
        assert 1e-5 <= params["a"] <= 1e-2
        assert params["b"] in (1, 2, 3)
        assert params["c"] in ("x", "y")


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes", "gp"])
def test_every_sampler_is_built_seeded_and_samples(name):
    dists = to_distributions({"a": "choice(1, 2, 3)", "b": "range(0, 3)"})
    values = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(name, 7, 2, dists))
        study.optimize(lambda t: suggest(t, dists)["a"] + suggest(t, dists)["b"], n_trials=4)
        values.append([t.params for t in study.trials])
    assert values[0] == values[1]  # same seed, same trials


def test_grid_refuses_continuous_intervals():
    with pytest.raises(SearchSpaceError, match="grid sampler needs choice"):
        grid_of("train.lr", FloatDistribution(0.1, 0.2))
    assert grid_of("b", IntDistribution(1, 5, step=2)) == [1, 3, 5]


def test_pruners_and_unknown_names():
    assert isinstance(make_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(SearchSpaceError, match="unknown pruner 'asha'"):
        make_pruner("asha")
    with pytest.raises(SearchSpaceError, match="unknown sampler 'bohb'"):
        make_sampler("bohb", 0, 1, {})
