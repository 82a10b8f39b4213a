"""`harness report`: plots, summary.md, the pruning estimate, search-space advice, MLflow."""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from rich.console import Console

from harness import advice
from harness.backends.local import LocalBackend
from harness.config import ConfigError, load_config, runs_dir
from harness.report import pruning_savings, write_report
from harness.search import to_distribution
from harness.storage import storage_for
from harness.study import Sweep, make_backend
from harness.tracking import tracking_uri
from tests.helpers import cli_env, run_cli

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = ("backend=fake", "sweep.n_trials=12", "pruner=median", "tracking.log_best_model=false")
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")
LOCAL_LIMITS = advice.hard_limits(LocalBackend())


def console() -> Console:
    return Console(file=io.StringIO(), width=200, highlight=False)


def printed(out: Console) -> str:
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory):
    """A 12-trial fake study (some pruned) and its report, shared by the tests below."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config([*SWEEP, f"paths.runs_dir={runs}"])
    study = Sweep(cfg, list(SWEEP)).run()
    out = console()
    folder = write_report(cfg, out)
    return cfg, study, folder, printed(out)


def count(study: optuna.Study, state: TrialState) -> int:
    return sum(1 for t in study.trials if t.state == state)


def test_report_writes_pngs_html_and_summary(fake_study):
    cfg, study, folder, out = fake_study
    assert folder == runs_dir(cfg) / "reports" / cfg.name
    for name in (*PLOTS, "intermediate_values"):
        assert (folder / f"{name}.png").read_bytes().startswith(PNG), name
    summary = (folder / "summary.md").read_text()
    complete, pruned = count(study, TrialState.COMPLETE), count(study, TrialState.PRUNED)
    assert pruned > 0
    assert f"12 trials: {complete} complete, {pruned} pruned, 0 failed, 0 running" in summary
    assert f"{pruned} of 12 trials were pruned." in summary
    best = study.best_trial
    assert f"Best trial: {best.number} (eval/f1 = {best.value:.4g})" in summary
    assert "harness train " in summary and f"train.epochs={best.params['train.epochs']}" in summary
    for name in (*PLOTS, "intermediate_values"):  # linked with relative paths
        assert f"]({name}.png)" in summary
    # importances: one row per searched key, percentages adding up to 100
    shares = [float(x) for x in re.findall(r"^\| train\.\w+ \| ([\d.]+)% \|$", summary, re.M)]
    assert len(shares) == len(best.params) and sum(shares) == pytest.approx(100, abs=1)
    assert "Estimated saving: ~" in summary and "How this is estimated" in summary
    assert "## Search-space advice" in summary
    # the console names the folder, the files and the parent run
    assert str(folder) in out and str(folder / "summary.md") in out
    assert study.user_attrs["mlflow_parent_run_id"] in out


def test_report_html_is_one_offline_file(fake_study):
    _, _, folder, _ = fake_study
    page = (folder / "report.html").read_text()
    assert re.findall(r"<script[^>]*\bsrc=", page) == []  # plotly.js is inline, no CDN
    assert page.count("Plotly.newPlot(") == len((*PLOTS, "intermediate_values"))
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:2000]) == 1  # plotly.js embedded once


def test_report_is_logged_to_the_parent_run(fake_study):
    cfg, study, _, _ = fake_study
    client = MlflowClient(tracking_uri(cfg))
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/summary.md", "report/report.html", "report/slice.png"} <= logged


@pytest.mark.slow  # a CLI process; the report itself is checked in-process above
def test_cli_report_prints_the_folder(fake_study):
    cfg, _, folder, _ = fake_study
    runs = cfg.paths.runs_dir
    done = run_cli("report", "backend=fake", runs=runs, timeout=120, env=cli_env(COLUMNS="300"))
    assert done.returncode == 0, done.stderr
    assert str(folder) in done.stdout
    assert "logged to MLflow run" in done.stdout


# ---- hand-built studies ----------------------------------------------------------------------

START = datetime(2026, 1, 1)
LR = FloatDistribution(1e-5, 1e-2, log=True)


def trial(
    number: int,
    state: TrialState,
    values: list[float] | None,
    seconds: float,
    evaluations: int,
    params: dict | None = None,
    distributions: dict | None = None,
    **attrs,
) -> optuna.trial.FrozenTrial:
    params = params if params is not None else {"train.learning_rate": 1e-3}
    return optuna.trial.FrozenTrial(
        number=number,
        state=state,
        value=None,
        values=values,
        datetime_start=START,
        datetime_complete=START + timedelta(seconds=seconds),
        params=params,
        distributions=distributions or {"train.learning_rate": LR},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={i + 1: 0.1 * (i + 1) for i in range(evaluations)},
        trial_id=number,
    )


def stored_study(cfg, trials, directions=("maximize",), **attrs) -> optuna.Study:
    study = optuna.create_study(
        study_name=cfg.name, storage=storage_for(cfg), directions=list(directions)
    )
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for t in trials:
        study.add_trial(t)
    return study


def savings_trials() -> list[optuna.trial.FrozenTrial]:
    C, P = TrialState.COMPLETE, TrialState.PRUNED
    return [
        # complete: 4, 4 and 6 evaluations -> median M = 4
        trial(0, C, [0.9], 20, 4, steps=200, cost_usd=1.0),
        trial(1, C, [0.8], 20, 4, steps=200, cost_usd=1.0),
        trial(2, C, [0.7], 20, 6, steps=200, cost_usd=1.0),
        # 2 evaluations in 10 s: ~20 s to the end -> saved 10 s, 100 steps, $0.50
        trial(3, P, [0.2], 10, 2, steps=100, cost_usd=0.5),
        # 1 evaluation in 3 s: ~12 s -> saved 9 s, 90 steps, $0.90
        trial(4, P, [0.1], 3, 1, steps=30, cost_usd=0.3),
        # pruned after more evaluations than the median: saved nothing
        trial(5, P, [0.5], 25, 5, steps=250, cost_usd=0.5),
        trial(6, TrialState.FAIL, None, 2, 0, fail_reason="boom"),
    ]


def test_pruning_savings_arithmetic(make_cfg):
    cfg = make_cfg("backend=fake", "name=savings")
    study = stored_study(cfg, savings_trials())
    s = pruning_savings(study)
    assert (s.pruned, s.estimated, s.median_evaluations) == (3, 3, 4.0)
    assert s.seconds_saved == pytest.approx(19.0)
    assert s.seconds_spent == pytest.approx(60 + 10 + 3 + 25 + 2)
    assert s.steps_saved == pytest.approx(190.0)
    assert s.steps_spent == pytest.approx(600 + 100 + 30 + 250)
    assert s.usd_saved == pytest.approx(1.4)
    assert s.usd_spent == pytest.approx(4.3)
    assert s.share(s.seconds_saved, s.seconds_spent) == pytest.approx(19 / (100 + 19))

    out = console()
    folder = write_report(cfg, out)  # no parent run recorded: the files are still written
    summary = (folder / "summary.md").read_text()
    assert "3 of 7 trials were pruned." in summary
    assert "~19.0 s of compute (16% of" in summary
    assert "~190 optimizer steps (16% of" in summary
    assert "~$1.4000 (25% of" in summary
    assert "(M = 4)" in summary
    # the best learning rate (1e-3) lies inside its range (1e-5 .. 1e-2, log scale)
    assert "No boundary problems" in summary and "Tentative: only 3 complete" in summary
    assert "Total: $4.3000 over 6 trials that spent money." in summary
    assert "| cost |" in summary and "$0.5000" in summary  # the top-5 table has a cost column
    assert "not logged to MLflow: the study records no parent run id" in printed(out)
    # a space with one parameter: importances are skipped with the reason, the rest is drawn
    assert "Parameter importances (eval/f1): not drawn: the space searches 1 parameter" in summary
    assert not (folder / "param_importances.png").exists()
    assert (folder / "optimization_history.png").read_bytes().startswith(PNG)


def test_a_study_without_a_complete_trial_is_an_error(make_cfg):
    cfg = make_cfg("backend=fake", "name=nothing_done")
    with pytest.raises(ConfigError, match="no study named"):
        write_report(cfg, console())
    failed, pruned = trial(0, TrialState.FAIL, None, 1, 0), trial(1, TrialState.PRUNED, [0.1], 1, 1)
    stored_study(cfg, [failed, pruned])
    with pytest.raises(
        ConfigError, match=r"no complete trial yet \(2 trials: 0 complete, 1 pruned"
    ):
        write_report(cfg, console())


def test_multi_objective_report_has_a_pareto_front(make_cfg):
    cfg = make_cfg("backend=fake", "name=multi")
    dists = {"train.learning_rate": LR, "train.epochs": IntDistribution(1, 6)}
    points = [(0.9, 300, 3e-3, 6), (0.8, 100, 1e-3, 2), (0.7, 200, 5e-4, 4), (0.6, 50, 2e-4, 1)]
    trials = [
        trial(
            i,
            TrialState.COMPLETE,
            [f1, steps],
            10,
            0,
            {"train.learning_rate": lr, "train.epochs": epochs},
            dists,
            steps=steps,
        )
        for i, (f1, steps, lr, epochs) in enumerate(points)
    ]
    objectives = [["eval/f1", "maximize"], ["train/steps", "minimize"]]
    study = stored_study(cfg, trials, ("maximize", "minimize"), objectives=objectives)
    folder = write_report(cfg, console())
    summary = (folder / "summary.md").read_text()
    assert "Objectives: maximize `eval/f1`, minimize `train/steps`" in summary
    front = sorted(t.number for t in study.best_trials)
    assert front == [0, 1, 3]  # trial 2 is dominated by trial 1
    assert f"## Pareto front ({len(front)} trials)" in summary
    table = summary.split("## Pareto front", 1)[1].split("##", 1)[0]
    assert sorted(int(n) for n in re.findall(r"^\| (\d+) \|", table, re.M)) == front
    assert "Best trial: 0 (best on eval/f1, the first objective)" in summary
    assert (folder / "pareto_front.png").read_bytes().startswith(PNG)
    for name in PLOTS:
        assert (folder / f"{name}.png").read_bytes().startswith(PNG), name
    assert not (folder / "intermediate_values.png").exists()
    assert "not drawn: no learning curves: a multi-objective study has no Optuna" in summary
    # the hand-made study was never swept with Pareto pruning: the report does not claim it
    assert "0 of 4 trials were pruned.\n\n" in summary and "Pareto rank" not in summary
    study.set_user_attr("pareto_pruning", True)  # as a sweep that pruned by rank stores it
    summary = (write_report(cfg, console()) / "summary.md").read_text()
    assert (
        "0 of 4 trials were pruned.\nSeveral objectives: a trial is pruned by its Pareto" in summary
    )


# ---- search-space advice ---------------------------------------------------------------------


def ranked(values_and_params, distributions):
    """COMPLETE trials, best first, for advice.boundary_advice."""
    return [
        trial(i, TrialState.COMPLETE, [v], 1, 0, p, distributions)
        for i, (v, p) in enumerate(values_and_params)
    ]


def test_advice_when_the_best_is_at_the_edge_of_a_log_range():
    narrow = FloatDistribution(1e-5, 2e-4, log=True)
    dists = {"train.learning_rate": narrow}
    top = ranked(
        [(0.9, {"train.learning_rate": 1.9e-4}), (0.8, {"train.learning_rate": 1e-4})], dists
    )
    [found] = advice.boundary_advice(top, dists, LOCAL_LIMITS)
    assert (found.key, found.edge, found.suggestion) == (
        "train.learning_rate",
        "upper",
        "tag(log, interval(1e-5, 2e-3))",
    )
    assert "Widen it: `train.learning_rate=tag(log, interval(1e-5, 2e-3))`" in found.text()
    inside = ranked([(0.9, {"train.learning_rate": 5e-5})], dists)
    assert advice.boundary_advice(inside, dists, LOCAL_LIMITS) == []
    # 20 complete trials: the top 10% are 2; both at the edge here
    many = [(1 - i / 100, {"train.learning_rate": 1.9e-4 if i < 2 else 5e-5}) for i in range(20)]
    [found] = advice.boundary_advice(ranked(many, dists), dists, LOCAL_LIMITS)
    assert "(2 of the top 2 trials are there)" in found.text()


BATCH = CategoricalDistribution((8, 16, 32))


@pytest.mark.parametrize(
    ("key", "distribution", "edge", "expected"),
    [
        ("train.batch_size", BATCH, "upper", "choice(8, 16, 32, 64)"),
        ("train.batch_size", BATCH, "lower", "choice(4, 8, 16, 32)"),
        ("train.batch_size", CategoricalDistribution((1, 2, 4)), "lower", None),  # >= 1
        ("train.epochs", IntDistribution(2, 6), "upper", "range(2, 9)"),  # stop excluded
        ("train.epochs", IntDistribution(1, 6), "lower", None),
        ("train.dropout", FloatDistribution(0.0, 0.3), "upper", "interval(0.0, 0.45)"),
        ("train.dropout", FloatDistribution(0.0, 0.3), "lower", None),  # 0 is the floor
        ("train.warmup_ratio", FloatDistribution(0.05, 0.2), "lower", "interval(0.0, 0.2)"),
        ("train.warmup_ratio", FloatDistribution(0.1, 0.9), "upper", "interval(0.1, 1.0)"),
        (
            "train.weight_decay",
            FloatDistribution(1e-4, 1e-1, log=True),
            "lower",
            "tag(log, interval(1e-5, 0.1))",
        ),
        ("train.trainable_blocks", CategoricalDistribution((-1, 0, 1)), "lower", None),
    ],
)
def test_widened_ranges_stay_within_what_the_key_can_take(key, distribution, edge, expected):
    suggestion = advice.widen(key, distribution, edge, LOCAL_LIMITS.get(key, (None, None)))
    assert suggestion == expected
    if suggestion is not None:  # a valid override of the same kind
        assert type(to_distribution(key, suggestion)) is type(distribution)


def test_hosted_limits_make_an_edge_a_hard_limit(make_cfg):
    limits = advice.hard_limits(make_backend(make_cfg("backend=openai")))
    epochs = IntDistribution(10, 50)
    assert advice.widen("train.epochs", epochs, "upper", limits["train.epochs"]) is None
    dists = {"train.epochs": epochs}
    [found] = advice.boundary_advice(ranked([(0.9, {"train.epochs": 50})], dists), dists, limits)
    assert "hard limit" in found.text()


def test_report_advice_in_a_real_sweep(make_cfg):
    """The fake peaks at learning rate 1e-3: a grid below it puts the best at the top edge."""
    edge = ("backend=fake", "search=none", "sampler=grid", "pruner=none", "sweep.n_trials=3")
    cfg = make_cfg(*edge, "name=edge", "train.learning_rate=choice(1e-5, 3e-5, 1e-4)")
    Sweep(cfg, []).run()
    summary = (write_report(cfg, console()) / "summary.md").read_text()
    assert "Tentative: only 3 complete trial(s)" in summary
    assert "lies at the upper edge of `train.learning_rate=choice(1e-5, 3e-5, 1e-4)`" in summary
    assert "Widen it: `train.learning_rate=choice(1e-5, 3e-5, 1e-4, 2e-4)`" in summary
