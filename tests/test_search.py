import signal

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from harness.cli import main
from harness.config import load_config
from harness.pruning import PatientPruner, make_pruner
from harness.search import (
    SearchSpaceError,
    fixed_values,
    grid_of,
    make_sampler,
    suggest,
    to_distributions,
)
from harness.study import load_study


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
        ("range(1, 5, 0)", "non-zero step"),
        ("range(1, 5, -1)", "counts down needs a negative step"),
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


def test_pruners_and_unknown_names(make_cfg):
    pruners = make_cfg().pruner
    assert isinstance(make_pruner(pruners, name="median"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(pruners, name="hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(pruners, name="asha"), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner(pruners, name="patient"), PatientPruner)
    assert isinstance(make_pruner(pruners, name="none"), optuna.pruners.NopPruner)
    with pytest.raises(SearchSpaceError, match="unknown pruner 'bohb'"):
        make_pruner(pruners, name="bohb")
    with pytest.raises(SearchSpaceError, match="unknown sampler 'bohb'"):
        make_sampler("bohb", 0, 1, {})


def _values(distribution):
    """Every value an int/stepped float/categorical distribution can take, as a set."""
    if isinstance(distribution, CategoricalDistribution):
        return set(distribution.choices)
    count = round((distribution.high - distribution.low) / distribution.step) + 1
    return {round(distribution.low + i * distribution.step, 10) for i in range(count)}


def _hydra_expansion(expression):
    """What Hydra's own sweeper would run for ``key=expression``."""
    override = OverridesParser.create().parse_override(f"k={expression}")
    return {round(v, 10) for v in override.sweep_iterator()}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # as the plugin does (create_optuna_distribution_from_override): a shuffled range or
        # choice is a categorical; its choices in Hydra's unshuffled order, so that a resumed
        # study sees the same distribution
        ("shuffle(range(1, 5))", CategoricalDistribution((1, 2, 3, 4))),
        ("shuffle(range(10, 0, -3))", CategoricalDistribution((10, 7, 4, 1))),
        ("shuffle(range(0.0, 0.3, 0.1))", CategoricalDistribution((0.0, 0.1, 0.2))),
        ("shuffle(8, 16, 32)", CategoricalDistribution((8, 16, 32))),
        ("shuffle(choice(adamw, sgd))", CategoricalDistribution(("adamw", "sgd"))),
    ],
)
def test_shuffle_is_a_categorical_over_the_same_values(expression, expected):
    assert to_distributions({"train.x": expression}) == {"train.x": expected}
    assert set(expected.choices) == {
        v for v in OverridesParser.create().parse_override(f"k={expression}").sweep_iterator()
    }


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("range(10, 0, -2)", IntDistribution(2, 10, step=2)),  # 10, 8, 6, 4, 2
        ("range(10, 1, -3)", IntDistribution(4, 10, step=3)),  # 10, 7, 4
        ("range(5, 0, -1)", IntDistribution(1, 5)),
        ("sort(range(1, 6), reverse=true)", IntDistribution(1, 5)),  # Hydra: range(5, 0, -1)
        ("tag(log, range(8, 0, -1))", IntDistribution(1, 8, log=True)),
        ("range(1.0, 0.0, -0.25)", FloatDistribution(0.25, 1.0, step=0.25)),
        ("range(0.5, 0.0, -0.1)", FloatDistribution(0.1, 0.5, step=0.1)),
    ],
)
def test_a_negative_step_gives_the_values_hydra_expands(expression, expected):
    distribution = to_distributions({"train.x": expression})["train.x"]
    assert distribution == expected
    assert _values(distribution) == _hydra_expansion(expression)


def test_a_descending_range_samples_only_its_own_values():
    dists = to_distributions({"train.epochs": "range(10, 0, -2)"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = {suggest(study.ask(), dists)["train.epochs"] for _ in range(60)}
    assert seen == {10, 8, 6, 4, 2}


@pytest.mark.parametrize("expression", ["", "''", '""', None])
def test_an_empty_expression_is_refused_with_the_key(expression):
    with pytest.raises(SearchSpaceError) as error:
        to_distributions({"train.dropout": expression})
    message = str(error.value)
    assert message.startswith("train.dropout: the expression is empty (train.dropout=")
    assert "interval(0.0, 0.3)" in message  # says what to write instead
    with pytest.raises(SearchSpaceError, match=r"train\.dropout: the expression is empty"):
        fixed_values({"train.dropout": expression})


@pytest.mark.parametrize(
    "expression",
    [
        "interval(0, inf)",
        "interval(-inf, 1)",
        "interval(0, nan)",
        "tag(log, interval(1e-5, inf))",
        "range(0, inf)",
        "range(0, 10, nan)",
        "shuffle(range(0, inf))",
    ],
)
def test_bounds_that_are_not_finite_are_refused(expression):
    with pytest.raises(SearchSpaceError) as error:
        to_distributions({"train.dropout": expression})
    message = str(error.value)
    assert message.startswith(f"train.dropout: {expression!r}: the bounds must be finite")
    assert "give the real limits" in message


def test_a_huge_shuffled_range_says_to_drop_shuffle():
    with pytest.raises(SearchSpaceError, match="1,000,000 choices; drop shuffle"):
        to_distributions({"train.x": "shuffle(range(0, 1000000))"})
    assert to_distributions({"train.x": "range(0, 1000000)"}) == {
        "train.x": IntDistribution(0, 999_999)
    }


@pytest.fixture
def cli():
    """`harness` in this process; the Ctrl-C/SIGTERM handlers its main() installs are put back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield main
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.dropout=interval(0, inf)", "train.dropout: 'interval(0, inf)': the bounds must"),
        ("train.epochs=range(0, inf)", "train.epochs: 'range(0, inf)': the bounds must"),
        ("train.dropout=", "nothing after '=' in 'train.dropout=': give train.dropout a value"),
    ],
)
def test_the_cli_refuses_them_before_anything_is_written(tmp_path, capsys, cli, override, message):
    runs = tmp_path / "runs"
    code = cli(["sweep", "backend=fake", f"paths.runs_dir={runs}", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()


def test_the_cli_sweeps_a_descending_range(tmp_path, cli):
    runs = tmp_path / "runs"
    overrides = ["backend=fake", f"paths.runs_dir={runs}", "sweep.n_trials=4"]
    assert cli(["sweep", *overrides, "train.epochs=range(10, 0, -2)"]) == 0
    study = load_study(load_config(overrides))
    assert study.trials[0].distributions["train.epochs"] == IntDistribution(2, 10, step=2)
    assert {t.params["train.epochs"] for t in study.trials} <= {10, 8, 6, 4, 2}
