"""The confirm step (`harness confirm`, sweep.confirm_top_k): the best trials re-run with new
seeds, ranked by the mean with its sd and CI; seed noise shown in the report; +from_best."""

from __future__ import annotations

import math

import optuna
import pytest

from harness import noise
from harness.backends.fake import seed_noise
from harness.champion import champion_config, train_champion
from harness.config import ConfigError, load_config
from harness.noise import CONFIRM_ATTR, SeedNoise, confirmed_ranking, confirmed_winner
from harness.report import Objective as ReportObjective
from harness.report import gather, summary_markdown
from harness.study import Sweep, load_study
from harness.study.queries import ranked_trials
from harness.tracking import InMemoryStore
from tests.helpers import run_in_process, study_runs

FAKE = ("backend=fake", "sampler=random", "pruner=none", "tracking.log_best_model=false")
CONFIRM = ("sweep.confirm_top_k=2", "sweep.confirm_seeds=2")


def confirm_records(store: InMemoryStore, name: str) -> dict[str, dict[str, str]]:
    """The tags of each confirm run, by run name."""
    return {
        run.name: run.tags
        for run in store.runs_of(name, "trial")
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
        assert set(by_seed) == {"0", "1", "2"}
        assert by_seed["0"] == trial.values[0]  # the trial's own run: the study's seed
        # the fake's score moves by seed_noise(seed), scaled by its learning curve
        curve = 1.0 - math.exp(-trial.params["train.epochs"] / 1.5)
        for seed in (1, 2):
            assert by_seed[str(seed)] == pytest.approx(trial.values[0] + seed_noise(seed) * curve)
            tags = runs[f"confirm-trial-{trial.number:04d}-seed-{seed}"]
            assert tags["harness.confirm_of"] == str(trial.number)
            assert tags["harness.confirm_seed"] == str(seed)
            assert tags["mlflow.parentRunId"] == parent.run_id
            assert "optuna.trial_number" not in tags  # not a trial: resumes leave it alone
    seeds = {r.params["seed"] for r in store.runs_of(cfg.name, "trial") if "seed" in r.params}
    assert seeds == {"1", "2"}
    assert len(study.trials) == 4  # confirm runs are no Optuna trials
    winner = confirmed_winner(study)
    assert winner is not None and parent.tags["confirmed_winner"] == str(winner.number)


def test_confirm_goes_on_after_an_interrupt_skipping_the_seeds_done(make_cfg):
    store = InMemoryStore()
    first = Sweep(make_cfg(*FAKE, "sweep.n_trials=3"), list(FAKE), tracker_factory=store.tracker)
    first.run()
    sweep = Sweep(make_cfg(*FAKE, *CONFIRM, "sweep.n_trials=3"), [], tracker_factory=store.tracker)
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
    assert sum(len(s) - 1 for s in study.user_attrs[CONFIRM_ATTR].values()) == 2  # two done
    statuses = [r.status for r in store.runs_of(sweep.cfg.name) if r.name.startswith("confirm-")]
    assert sorted(statuses) == ["FAILED", "FINISHED", "FINISHED"]

    again = Sweep(make_cfg(*FAKE, *CONFIRM, "sweep.n_trials=3"), [], tracker_factory=store.tracker)
    ran: list[tuple[int, int]] = []
    real_again = again.plan.backend.run

    def recorded(spec, reporter):
        ran.append((spec.number, int(spec.config.seed)))
        return real_again(spec, reporter)

    again.plan.backend.run = recorded
    study = again.run()
    assert ran == [seen[2], (seen[2][0], 2)]  # the interrupted seed, then the one never run
    stored = study.user_attrs[CONFIRM_ATTR]
    assert all(set(by_seed) == {"0", "1", "2"} for by_seed in stored.values())
    assert len(stored) == 2


def hand_study(direction: str, confirm: dict) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    study.set_user_attr(CONFIRM_ATTR, confirm)
    return study


def test_ranking_mean_sd_and_t_interval_match_a_hand_calculation():
    study = hand_study(
        "maximize",
        {"1": {"0": 0.80, "1": 0.82, "2": 0.78}, "2": {"0": 0.83, "1": 0.85}, "3": {"0": 0.9}},
    )
    ranked = confirmed_ranking(study)
    assert [c.number for c in ranked] == [3, 2, 1]  # best mean first
    two, one = ranked[1], ranked[2]
    assert one.mean == pytest.approx(0.80) and one.sd == pytest.approx(0.02)
    # t(0.975, df=2) = 4.302653: 0.80 ± 4.302653 x 0.02 / sqrt(3)
    assert one.interval == pytest.approx((0.80 - 0.0496828, 0.80 + 0.0496828), abs=1e-6)
    # t(0.975, df=1) = 12.706205: 0.84 ± 12.706205 x 0.0141421 / sqrt(2)
    assert two.interval == pytest.approx((0.84 - 0.1270620, 0.84 + 0.1270620), abs=1e-6)
    assert one.line("eval/f1") == "trial 1: eval/f1 0.8 ± 0.02 (95% CI 0.7503 to 0.8497, 3 seeds)"
    assert ranked[0].line("eval/f1") == "trial 3: eval/f1 0.9 (1 seed)"
    assert confirmed_winner(study).number == 2  # one seed is no confirmation
    # pooled over the confirmed trials: sqrt((2 x 0.02^2 + 1 x 0.0141421^2) / 3)
    assert noise.seed_noise(study) == pytest.approx((math.sqrt(0.001 / 3), 5, "confirm runs"))
    minimized = hand_study("minimize", {"1": {"0": 0.3, "1": 0.5}, "2": {"0": 0.5, "1": 0.6}})
    assert confirmed_winner(minimized).number == 1


def test_seed_noise_from_repeated_configurations_without_confirm_runs():
    study = optuna.create_study(direction="maximize")
    assert noise.seed_noise(study) is None
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x, value in [(0.1, 0.5), (0.1, 0.7), (0.2, 0.9)]:
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=value))
    # one repeated configuration (x=0.1): sd of (0.5, 0.7) = 0.141421
    assert noise.seed_noise(study) == pytest.approx((0.1414214, 2, "repeated configurations"))


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
    assert "the confirmed winner" in said[0] and "2 seeds" in said[0]


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
    assert line.endswith("3 seeds)") and line in done.stdout
    shown = run_in_process("best", *FAKE, runs=runs)
    assert line in shown.stdout and f"confirmed winner: trial {best.number}" in shown.stdout
    found = study_runs(cfg)
    parent = found.parents[0].info.run_id
    confirm_runs = [r for r in found.trials if r.info.run_name.startswith("confirm-")]
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
    assert set(stored) == {"0", "1", "2"}
    runs = {r.name: r for r in store.runs_of(study.study_name, "trial")}
    for seed in (1, 2):
        run = runs[f"confirm-trial-{best.number:04d}-seed-{seed}"]
        assert run.status == "FINISHED" and run.params["seed"] == str(seed)
        assert run.metrics["objective"][-1][1] == pytest.approx(stored[str(seed)])
    assert len(set(stored.values())) > 1  # the seed changes a real run


def test_a_stop_rules_normal_end_still_confirms_and_a_timeout_does_not(make_cfg):
    words = [*FAKE, "sweep.confirm_top_k=1", "sweep.confirm_seeds=1", "sweep.n_trials=5"]
    memory = InMemoryStore().tracker
    reached = Sweep(make_cfg(*words, "sweep.target=0.0"), [], tracker_factory=memory)
    study = reached.run()
    assert reached.stop_rule == "sweep.target" and len(study.trials) == 1
    assert set(study.user_attrs[CONFIRM_ATTR]["0"]) == {"0", "1"}
    timed_out = Sweep(make_cfg(*words, "name=timed"), [], tracker_factory=memory)
    timed_out.stop_rule, timed_out.stop_reason = "sweep.timeout_s", "time budget: reached"
    assert timed_out._stopped_short()
