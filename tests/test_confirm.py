"""The confirm step (`harness confirm`, sweep.confirm_top_k): the best trials re-run with new
seeds, ranked by the mean with its sd and CI; seed noise shown in the report; +from_best."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pytest

from harness import noise
from harness.backends.fake import seed_noise
from harness.champion import champion_config, train_champion
from harness.config import ConfigError, load_config
from harness.noise import (
    CONFIRM_ATTR,
    CONFIRM_SPENT_ATTR,
    SeedNoise,
    confirmed_ranking,
    confirmed_winner,
)
from harness.report import Objective as ReportObjective
from harness.report import gather, summary_markdown
from harness.study import Sweep, confirm, load_study
from harness.study import sweep as sweep_module
from harness.study.queries import ranked_trials, study_spend
from harness.tracking import InMemoryStore
from tests.helpers import run_in_process, study_runs

FAKE = ("backend=fake", "sampler=random", "pruner=none", "tracking.log_best_model=false")
CONFIRM = ("sweep.confirm_top_k=2", "sweep.confirm_seeds=2")


def confirm_records(store: InMemoryStore, name: str) -> dict[str, dict[str, str]]:
    """The tags of each confirm run, by run name."""
    return {
        run.name: run.tags
        for run in store.runs_of(name, "confirm")
        if run.name.startswith("confirm-")
    }


def test_sweep_confirms_its_best_trials_with_new_seeds_as_child_runs(make_cfg):
    store = InMemoryStore()
    cfg = make_cfg(*FAKE, *CONFIRM, "sweep.n_trials=4")
    study = Sweep(cfg, [*FAKE, *CONFIRM], tracker_factory=store.tracker).run()
    top = ranked_trials(study)[:2]
    stored = study.user_attrs[CONFIRM_ATTR]
    assert set(stored) == {str(t.number) for t in top}
    parent = store.runs_of(cfg.name, "study")[0]
    runs = confirm_records(store, cfg.name)
    assert set(runs) == {f"confirm-trial-{t.number:04d}-seed-{s}" for t in top for s in (1, 2)}
    for trial in top:
        by_seed = stored[str(trial.number)]
        assert set(by_seed) == {"1", "2"}  # new seeds only: the trial's own (0) is no sample
        # the fake's score moves by seed_noise(seed), scaled by its learning curve
        curve = 1.0 - math.exp(-trial.params["train.epochs"] / 1.5)
        for seed in (1, 2):
            assert by_seed[str(seed)] == pytest.approx(trial.values[0] + seed_noise(seed) * curve)
            tags = runs[f"confirm-trial-{trial.number:04d}-seed-{seed}"]
            assert tags["harness.confirm_of"] == str(trial.number)
            assert tags["harness.confirm_seed"] == str(seed)
            assert tags["mlflow.parentRunId"] == parent.run_id
            assert "optuna.trial_number" not in tags  # not a trial: resumes leave it alone
            assert tags["harness.role"] == "confirm" and "optuna.trial_state" not in tags
    seeds = {r.params["seed"] for r in store.runs_of(cfg.name, "confirm")}
    assert seeds == {"1", "2"}
    assert not any(r.name.startswith("confirm-") for r in store.runs_of(cfg.name, "trial"))
    assert len(study.trials) == 4  # confirm runs are no Optuna trials
    winner = confirmed_winner(study)
    assert winner is not None and parent.tags["confirmed_winner"] == str(winner.number)


def test_confirm_goes_on_after_an_interrupt_skipping_the_seeds_done(make_cfg):
    store = InMemoryStore()
    first = Sweep(make_cfg(*FAKE, "sweep.n_trials=3"), list(FAKE), tracker_factory=store.tracker)
    first.run()
    again_cfg = (*FAKE, *CONFIRM, "sweep.n_trials=3")
    sweep = Sweep(make_cfg(*again_cfg), list(again_cfg), tracker_factory=store.tracker)
    real_run = sweep.plan.backend.run
    seen: list[tuple[int, int]] = []

    def interrupted_at_the_third(spec, reporter):
        seen.append((spec.number, int(spec.config.seed)))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_run(spec, reporter)

    sweep.plan.backend.run = interrupted_at_the_third
    with pytest.raises(KeyboardInterrupt):
        sweep.run()
    study = load_study(sweep.cfg)
    assert sum(len(s) for s in study.user_attrs[CONFIRM_ATTR].values()) == 2  # two done
    statuses = [r.status for r in store.runs_of(sweep.cfg.name) if r.name.startswith("confirm-")]
    assert sorted(statuses) == ["FAILED", "FINISHED", "FINISHED"]

    again = Sweep(make_cfg(*again_cfg), list(again_cfg), tracker_factory=store.tracker)
    ran: list[tuple[int, int]] = []
    real_again = again.plan.backend.run

    def recorded(spec, reporter):
        ran.append((spec.number, int(spec.config.seed)))
        return real_again(spec, reporter)

    again.plan.backend.run = recorded
    study = again.run()
    assert ran == [seen[2], (seen[2][0], 2)]  # the interrupted seed, then the one never run
    stored = study.user_attrs[CONFIRM_ATTR]
    assert all(set(by_seed) == {"1", "2"} for by_seed in stored.values())
    assert len(stored) == 2


def hand_study(direction: str, confirm: dict, own: tuple[float, ...] = ()) -> optuna.Study:
    """A study with trials 0, 1, ... of values ``own`` and confirm samples ``confirm``."""
    study = optuna.create_study(direction=direction)
    for value in own:
        study.add_trial(optuna.trial.create_trial(value=value))
    study.set_user_attr(CONFIRM_ATTR, confirm)
    return study


def test_ranking_mean_sd_and_t_interval_match_a_hand_calculation():
    study = hand_study(
        "maximize",
        {"1": {"1": 0.80, "2": 0.82, "3": 0.78}, "2": {"1": 0.83, "2": 0.85}, "3": {"1": 0.99}},
        own=(0.5, 0.83, 0.86, 0.99),
    )
    ranked = confirmed_ranking(study)
    assert [c.number for c in ranked] == [2, 1]  # best mean first; one new seed is not ranked
    two, one = ranked
    assert one.mean == pytest.approx(0.80) and one.sd == pytest.approx(0.02)
    # t(0.975, df=2) = 4.302653: 0.80 ± 4.302653 x 0.02 / sqrt(3)
    assert one.interval == pytest.approx((0.80 - 0.0496828, 0.80 + 0.0496828), abs=1e-6)
    # t(0.975, df=1) = 12.706205: 0.84 ± 12.706205 x 0.0141421 / sqrt(2)
    assert two.interval == pytest.approx((0.84 - 0.1270620, 0.84 + 0.1270620), abs=1e-6)
    assert one.line("eval/f1") == (
        "trial 1: eval/f1 0.8 ± 0.02 (95% CI 0.7503 to 0.8497, 3 new seeds; its search run 0.83)"
    )
    assert confirmed_winner(study).number == 2  # trial 3's lucky 0.99 on one seed: no winner
    # pooled over the trials with two new seeds: sqrt((2 x 0.02^2 + 1 x 0.0141421^2) / 3)
    assert noise.seed_noise(study) == pytest.approx((math.sqrt(0.001 / 3), 5, "confirm runs"))
    minimized = hand_study("minimize", {"1": {"1": 0.3, "2": 0.5}, "2": {"1": 0.5, "2": 0.6}})
    assert confirmed_winner(minimized).number == 1


def test_repeated_configurations_are_no_seed_noise():
    """Every trial runs with the study's seed: identical params give identical runs."""
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x, value in [(0.1, 0.5), (0.1, 0.7), (0.2, 0.9)]:
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=value))
    assert noise.seed_noise(study) is None
    assert confirmed_winner(study) is None


def test_new_seeds_skip_the_seed_the_trial_ran_with(make_cfg):
    cfg = make_cfg(*FAKE, "seed=0", "sweep.confirm_seeds=3")
    assert confirm.confirm_seeds(cfg, own=0) == [1, 2, 3]
    assert confirm.confirm_seeds(cfg, own=2) == [1, 3, 4]  # a searched seed drew 2


def test_differences_within_seed_noise_are_said_and_others_are_not():
    small = SeedNoise(0.012, 12, "confirm runs")
    said = noise.top_within_noise([0.806, 0.803, 0.800], small, "eval/f1")
    assert said is not None and "differ by 0.006 in eval/f1" in said
    assert "sd 0.012, from 12 confirm runs" in said and "not meaningful" in said
    assert noise.top_within_noise([0.90, 0.85, 0.80], small, "eval/f1") is None
    assert noise.top_within_noise([0.806, 0.803], None, "eval/f1") is None
    # effects: sqrt(share x variance); variance of (0, 1) is 0.25
    weak = noise.weak_effects({"a": 0.9, "b": 0.0004}, [0.0, 1.0], small)
    assert weak == {"b": pytest.approx(0.01)}


def test_multi_objective_and_unbudgeted_paid_confirms_are_refused(make_cfg, openai_cfg):
    goals = "sweep.objectives={eval/f1: maximize, train/seconds: minimize}"
    with pytest.raises(ConfigError, match="multi-objective study has a Pareto front"):
        Sweep(make_cfg(*FAKE, goals, "sweep.confirm_top_k=1"), [])
    with pytest.raises(ConfigError, match=r"sweep\.confirm_seeds=1: .* one run has no spread"):
        Sweep(make_cfg(*FAKE, "sweep.confirm_top_k=1", "sweep.confirm_seeds=1"), [])
    with pytest.raises(ConfigError, match=r"set sweep\.budget_usd"):
        Sweep(openai_cfg("sweep.confirm_top_k=1", "sweep.budget_usd=null"), [])
    Sweep(openai_cfg("sweep.confirm_top_k=1", "sweep.budget_usd=5"), [])  # capped: allowed


def test_report_shows_the_ranking_and_flags_differences_within_noise(make_cfg):
    memory = InMemoryStore().tracker  # what MLflow records is not under test here
    study = Sweep(make_cfg(*FAKE, "sweep.n_trials=5"), list(FAKE), tracker_factory=memory).run()
    cfg = make_cfg(*FAKE)
    ranked = ranked_trials(study)
    best, second = ranked[0].number, ranked[1].number
    objectives = [ReportObjective("eval/f1", "maximize")]

    def summary(confirm: dict) -> str:
        study.set_user_attr(CONFIRM_ATTR, confirm)
        return summary_markdown(gather(study, cfg, objectives, ranked), [], cfg)

    noisy = summary({str(best): {"0": 0.2, "1": 0.9}, str(second): {"0": 0.3, "1": 0.8}})
    assert "## Confirmed across seeds" in noisy
    assert "their order is not meaningful" in noisy.split("## Search-space advice")[1]
    importance = noisy.split("## Parameter importances")[1].split("## Pruning")[0]
    assert "Within seed noise (sd 0.4" in importance
    quiet = summary({str(best): {"0": 0.8, "1": 0.8000001}})
    assert "not meaningful" not in quiet and "Within seed noise" not in quiet
    assert f"Confirmed winner: trial {best}" in quiet


def test_from_best_retrains_the_confirmed_winner(make_cfg, runs):
    # in MLflow: the champion looks up the trial's run (a hosted model?)
    study = Sweep(make_cfg(*FAKE, "sweep.n_trials=5"), list(FAKE)).run()
    ranked = ranked_trials(study)
    runner_up = ranked[1]
    study.set_user_attr(
        CONFIRM_ATTR,
        {str(ranked[0].number): {"0": 0.5, "1": 0.4}, str(runner_up.number): {"0": 0.6, "1": 0.7}},
    )
    overrides = [*FAKE, f"paths.runs_dir={runs}", "+from_best=true"]
    _, champion, _ = champion_config(overrides)
    assert champion.number == runner_up.number
    said: list[str] = []
    assert train_champion(overrides, said.append) == 1  # the fake saves no model to register
    assert said[0].startswith(f"champion of study sentiment_tiny: trial {runner_up.number}'s")
    assert "the confirmed winner" in said[0] and "2 new seeds" in said[0]


def test_harness_confirm_and_best_print_the_ranking_and_record_child_runs(runs):
    words = [*FAKE, "sweep.confirm_seeds=2"]
    refused = run_in_process("confirm", *words, runs=runs)
    assert refused.returncode == 2 and "no study named" in refused.stderr
    assert run_in_process("sweep", *FAKE, "sweep.n_trials=3", runs=runs).returncode == 0
    done = run_in_process("confirm", *words, "sweep.confirm_top_k=1", runs=runs)
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = load_config([*words, f"paths.runs_dir={runs}"])
    best = ranked_trials(load_study(cfg))[0]
    for seed in (1, 2):
        assert f"confirm-trial-{best.number:04d}-seed-{seed}: eval/f1 = " in done.stdout
    line = confirmed_ranking(load_study(cfg))[0].line("eval/f1")
    assert line.endswith(f"2 new seeds; its search run {best.values[0]:.4g})")
    assert line in done.stdout
    shown = run_in_process("best", *FAKE, runs=runs)
    assert line in shown.stdout and f"confirmed winner: trial {best.number}" in shown.stdout
    found = study_runs(cfg)
    parent = found.parents[0].info.run_id
    confirm_runs = [r for r in found.runs if r.data.tags.get("harness.role") == "confirm"]
    assert len(confirm_runs) == 2 and not any(
        r.info.run_name.startswith("confirm-") for r in found.trials
    )
    assert not any("optuna.trial_state" in r.data.tags for r in confirm_runs)
    assert {r.data.params["seed"] for r in confirm_runs} == {"1", "2"}
    assert {r.data.tags["mlflow.parentRunId"] for r in confirm_runs} == {parent}
    assert {r.info.status for r in confirm_runs} == {"FINISHED"}
    again = run_in_process("confirm", *words, "sweep.confirm_top_k=1", runs=runs)
    assert "confirm-trial-" not in again.stdout  # every seed done: nothing runs again


@pytest.mark.slow
def test_a_real_tiny_confirm_run_on_the_local_backend(make_cfg):
    store = InMemoryStore()
    words = [
        "train.epochs=1",
        "train.batch_size=32",
        "train.max_steps=4",
        "tracking.log_best_model=false",
        "sweep.confirm_top_k=1",
        "sweep.confirm_seeds=2",
    ]
    study = Sweep(make_cfg(*words, "sweep.n_trials=1"), words, tracker_factory=store.tracker).run()
    best = ranked_trials(study)[0]
    stored = study.user_attrs[CONFIRM_ATTR][str(best.number)]
    assert set(stored) == {"1", "2"}
    runs = {r.name: r for r in store.runs_of(study.study_name, "confirm")}
    for seed in (1, 2):
        run = runs[f"confirm-trial-{best.number:04d}-seed-{seed}"]
        assert run.status == "FINISHED" and run.params["seed"] == str(seed)
        assert run.metrics["objective"][-1][1] == pytest.approx(stored[str(seed)])
    assert len(set(stored.values())) > 1  # the seed changes a real run


def test_a_stop_rules_normal_end_still_confirms_and_a_timeout_does_not(make_cfg):
    words = [*FAKE, "sweep.confirm_top_k=1", "sweep.confirm_seeds=2", "sweep.n_trials=5"]
    store = InMemoryStore()
    target = [*words, "sweep.target=0.0"]
    reached = Sweep(make_cfg(*target), target, tracker_factory=store.tracker)
    study = reached.run()
    assert reached.stop_rule == "sweep.target" and len(study.trials) == 1
    assert set(study.user_attrs[CONFIRM_ATTR]["0"]) == {"1", "2"}
    # two trials, then a resume whose sweep.timeout_s is spent before Optuna's first check
    first = [*FAKE, "name=timed", "sweep.n_trials=2", "backend.seconds_per_epoch=0"]
    Sweep(make_cfg(*first), first, tracker_factory=store.tracker).run()
    timed = [*words, "name=timed", "sweep.timeout_s=1e-6", "backend.seconds_per_epoch=0"]
    timed_out = Sweep(make_cfg(*timed), timed, tracker_factory=store.tracker)
    study = timed_out.run()
    assert timed_out.stop_rule == "sweep.timeout_s" and len(study.trials) == 2
    assert CONFIRM_ATTR not in study.user_attrs
    assert store.runs_of("timed", "confirm") == []


def test_the_confirm_step_stops_once_sweep_timeout_s_is_spent(make_cfg, monkeypatch):
    store = InMemoryStore()
    words = [*FAKE, "sweep.n_trials=2"]
    Sweep(make_cfg(*words), words, tracker_factory=store.tracker).run()
    # the sweep starts at 0 on its clock; the confirm step's, before each run: the second
    # run would start past the limit
    monkeypatch.setattr(sweep_module, "time", SimpleNamespace(monotonic=lambda: 0.0))
    clock = iter([1.0, 100.0])
    monkeypatch.setattr(confirm, "monotonic", lambda: next(clock))
    again = [*words, "sweep.confirm_top_k=1", "sweep.confirm_seeds=3", "sweep.timeout_s=10"]
    sweep = Sweep(make_cfg(*again), again, tracker_factory=store.tracker)
    study = sweep.run()
    assert len(store.runs_of(sweep.cfg.name, "confirm")) == 1
    assert sweep.stop_rule == "sweep.timeout_s"
    assert sweep.stop_reason == "time budget: sweep.timeout_s=10 reached; the confirm step stopped"
    assert sum(len(s) for s in study.user_attrs[CONFIRM_ATTR].values()) == 1
    assert confirmed_winner(study) is None  # one new seed confirms nothing


def test_a_confirm_run_counts_its_spend_as_it_goes_and_stores_only_successes(make_cfg):
    store = InMemoryStore()
    words = [*FAKE, "sweep.n_trials=2", "sweep.confirm_top_k=1", "sweep.confirm_seeds=2"]
    sweep = Sweep(make_cfg(*words), words, tracker_factory=store.tracker)
    real_run = sweep.plan.backend.run

    def paid_then_failed_once(spec, reporter):
        reporter.report(1, {"cost_usd": 0.25})  # billed so far
        if spec.workdir.name.startswith("confirm-") and spec.workdir.name.endswith("seed-1"):
            raise RuntimeError("the job failed after billing")
        return real_run(spec, reporter)

    sweep.plan.backend.run = paid_then_failed_once
    study = sweep.run()
    assert study.user_attrs[CONFIRM_SPENT_ATTR] == pytest.approx(0.5)  # the failed run's too
    assert study_spend(study) == pytest.approx(0.25 * 2 + 0.5)  # the trials' and the confirms'
    (stored,) = study.user_attrs[CONFIRM_ATTR].values()
    assert set(stored) == {"2"}  # seed 1 failed: nothing stored for it
    assert confirmed_ranking(study) == [] and confirmed_winner(study) is None
    runs = {r.name: r for r in store.runs_of(sweep.cfg.name, "confirm")}
    failed = runs[f"confirm-trial-{ranked_trials(study)[0].number:04d}-seed-1"]
    assert failed.status == "FAILED" and "optuna.trial_state" not in failed.tags


def test_a_trial_run_with_other_overrides_is_not_confirmed_with_this_commands(make_cfg):
    store = InMemoryStore()
    Sweep(make_cfg(*FAKE, "sweep.n_trials=2"), list(FAKE), tracker_factory=store.tracker).run()
    other = [*FAKE, "train.max_steps=50", "sweep.n_trials=2", "sweep.confirm_top_k=1"]
    sweep = Sweep(make_cfg(*other), other, tracker_factory=store.tracker)
    with pytest.raises(ConfigError, match="ran with other overrides than this command") as err:
        sweep.run()
    assert "train.max_steps: the trial ran with its default, this command has " in str(err.value)
    assert store.runs_of(sweep.cfg.name, "confirm") == []
