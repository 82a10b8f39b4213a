"""Stop rules (harness/study/stop_rules.py): sweep.target, stagnation, sweep.budget_steps and
sweep.timeout_s end a study early as a normal end, say which rule did, and hold on resume.

The fake backend's eval/f1 depends on train.epochs alone here (the other keys fixed), so each
trial's value is known: epochs 1..6 give 0.4222, 0.6390, 0.7503, 0.8074, 0.8367, 0.8518.
"""

from __future__ import annotations

import optuna
import pytest

from harness.backends.fake import FakeBackend
from harness.config import ConfigError
from harness.noise import CONFIRM_ATTR, SeedNoise
from harness.report import Objective, gather, rules_to_unset, summary_markdown
from harness.study import FINISHED_STATES, Sweep, ranked_trials
from harness.study.stop_rules import margin, stop_rule_met
from harness.tracking import InMemoryStore
from tests.helpers import OPENAI_TEST_SETTINGS, run_in_process

FAST = ("backend=fake", "tracking.log_best_model=false", "search=none", "pruner=none")
EPOCHS = "train.epochs=choice(1,2,3,4,5,6)"


def enqueue(*epochs: int) -> str:
    """Trials run first, with these train.epochs."""
    return "sweep.enqueue=[" + ", ".join(f"{{train.epochs: {e}}}" for e in epochs) + "]"


ONE_TO_SIX = enqueue(1, 2, 3, 4, 5, 6)
ONE_TWO_SIX = enqueue(1, 2, 6, 3)
SAME_SCORE = "train.trainable_blocks=choice(-1,0,1)"  # searched, but the fake ignores it


def sweep_of(make_cfg, store: InMemoryStore, *overrides: str) -> Sweep:
    return Sweep(make_cfg(*FAST, *overrides), list(overrides), tracker_factory=store.tracker)


def done(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials (an enqueued trial a stop rule kept from starting stays WAITING)."""
    return study.get_trials(states=FINISHED_STATES)


def report_summary(study: optuna.Study, sweep: Sweep) -> str:
    """summary.md of `harness report`, without its plots."""
    objectives = [Objective(m, d) for m, d in sweep.plan.objectives]
    facts = gather(study, sweep.cfg, objectives, ranked_trials(study))
    return summary_markdown(facts, [], sweep.cfg)


def parent_tags(store: InMemoryStore, sweep: Sweep) -> dict[str, str]:
    (parent,) = store.runs_of(sweep.cfg.name, "study")
    return parent.tags


@pytest.mark.parametrize(
    ("metric", "target", "said"),
    [
        ("sweep.metric=eval/f1", 0.8, "trial 2's eval/f1 0.8518 >= sweep.target 0.8"),
        ("sweep.metric=eval/loss", 0.3, "trial 2's eval/loss 0.2482 <= sweep.target 0.3"),
    ],
)
def test_target_stops_the_study_once_a_trial_reaches_it(make_cfg, metric, target, said):
    store = InMemoryStore()
    direction = "sweep.direction=" + ("maximize" if "f1" in metric else "minimize")
    rule = (EPOCHS, ONE_TWO_SIX, metric, direction, f"sweep.target={target}")
    sweep = sweep_of(make_cfg, store, *rule, "sweep.n_trials=10")
    study = sweep.run()
    assert [t.params["train.epochs"] for t in done(study)] == [1, 2, 6]  # no 4th trial
    assert sweep.stop_rule == "sweep.target"
    assert sweep.stop_reason == f"target reached: {said}"
    assert parent_tags(store, sweep)["harness.stop_reason"] == sweep.stop_reason
    assert f"\n- Stopped: {sweep.stop_reason}\n" in report_summary(study, sweep)
    ending = sweep.ending(study)
    assert ending.shortfall == (
        "3 of 10 trials finished; stopped by sweep.target; raise or unset sweep.target to go on."
    )

    # a run that starts no trial (as `harness confirm` runs) keeps the reason for the report
    sweep_of(make_cfg, store, *rule, "sweep.n_trials=3").run()
    assert study.user_attrs["stop_reason"] == sweep.stop_reason
    resumed = sweep_of(make_cfg, store, *rule, "sweep.n_trials=10")
    assert len(done(resumed.run())) == 3  # met already: no trial starts
    assert resumed.stop_reason == f"target reached: {said} (before this sweep: no trial started)"

    raised = sweep_of(make_cfg, store, *rule[:-1], "sweep.target=null", "sweep.n_trials=5")
    assert len(done(raised.run())) == 5 and raised.stop_reason == ""  # unset: it goes on
    assert raised.ending(study).shortfall == ""
    assert "Stopped" not in report_summary(study, raised)


def test_stagnation_stops_when_no_trial_beats_the_best(make_cfg):
    """Every trial scores the same: the first sets the best, three more improve nothing."""
    store = InMemoryStore()
    sweep = sweep_of(make_cfg, store, SAME_SCORE, "sweep.stagnation_trials=3", "sweep.n_trials=20")
    study = sweep.run()
    assert len(done(study)) == 4
    assert sweep.stop_rule == "sweep.stagnation_trials"
    # a repeated configuration ran with the same seed: no noise estimate, any gain counts
    assert sweep.stop_reason == (
        "stagnation: the best eval/f1 (0.7503, trial 0) has not improved by more than 0 "
        "(no noise estimate: no confirm runs) in the last 3 trials"
    )
    assert "stopped by sweep.stagnation_trials" in sweep.ending(study).shortfall


def test_stagnation_counts_only_gains_above_the_noise_and_holds_on_resume(make_cfg):
    """Epochs 1..6: gains 0.22, 0.11, 0.057, 0.029, 0.015. Over the last 2 trials the best
    gains 0.33, 0.17, 0.087, then 0.044 <= sweep.min_improvement=0.05 after the 6th trial."""
    store = InMemoryStore()
    rule = (EPOCHS, ONE_TO_SIX, "sweep.stagnation_trials=2", "sweep.min_improvement=0.05")
    sweep = sweep_of(make_cfg, store, *rule, "sweep.n_trials=20")
    study = sweep.run()
    assert [t.params["train.epochs"] for t in done(study)] == [1, 2, 3, 4, 5, 6]
    message = (
        "stagnation: the best eval/f1 (0.8518, trial 5) has not improved by more than 0.05 "
        "(the noise: sweep.min_improvement) in the last 2 trials"
    )
    assert sweep.stop_reason == message

    resumed = sweep_of(make_cfg, store, *rule, "sweep.n_trials=20")
    assert len(done(resumed.run())) == 6
    assert resumed.stop_reason == f"{message} (before this sweep: no trial started)"


def test_step_budget_stops_once_the_trials_took_it_and_holds_on_resume(make_cfg):
    store = InMemoryStore()
    fixed = (SAME_SCORE, "train.epochs=2")  # every trial takes the same steps
    first = sweep_of(make_cfg, store, *fixed, "sweep.n_trials=1").run()
    steps = first.trials[0].user_attrs["steps"]
    budget = 2 * steps + 1  # two trials take less, three more
    rule = (*fixed, f"sweep.budget_steps={budget}", "sweep.n_trials=10")
    sweep = sweep_of(make_cfg, store, *rule)
    study = sweep.run()
    assert len(done(study)) == 3
    assert sweep.stop_rule == "sweep.budget_steps"
    assert sweep.stop_reason == (
        f"step budget: the study's trials took {3 * steps} optimizer steps of "
        f"sweep.budget_steps={budget}"
    )
    assert parent_tags(store, sweep)["harness.stop_reason"] == sweep.stop_reason
    resumed = sweep_of(make_cfg, store, *rule)
    assert len(done(resumed.run())) == 3
    assert resumed.stop_reason.endswith("(before this sweep: no trial started)")


def test_the_time_budget_is_a_stated_stop_not_a_failure(make_cfg):
    store = InMemoryStore()
    sweep_of(make_cfg, store, SAME_SCORE, "sweep.n_trials=2").run()
    sweep = sweep_of(make_cfg, store, SAME_SCORE, "sweep.timeout_s=1e-9", "sweep.n_trials=6")
    study = sweep.run()
    # Optuna checks the time before each trial; its clock (microseconds) may still read the
    # start at the first check, letting one trial in, never a second
    assert len(done(study)) in (2, 3)
    assert sweep.stop_rule == "sweep.timeout_s"
    assert sweep.stop_reason == "time budget: sweep.timeout_s=1e-09 reached"
    shortfall = sweep.ending(study).shortfall
    assert shortfall.endswith(
        "stopped by sweep.timeout_s; run the same command to go on: it runs only the missing "
        "trials."
    )
    assert parent_tags(store, sweep)["harness.stop_reason"] == sweep.stop_reason


def test_the_cli_names_the_rule_and_exits_0(tmp_path):
    done = run_in_process(
        "sweep", *FAST, EPOCHS, ONE_TWO_SIX, "sweep.target=0.8", "sweep.n_trials=10", runs=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())  # rich wraps long lines
    assert "stopped: target reached: trial 2's eval/f1 0.8518 >= sweep.target 0.8" in out
    assert "3 of 10 trials finished; stopped by sweep.target; raise or unset" in out
    assert "short of sweep.n_trials" not in out and "try again" not in out


def file_requests(fake) -> list[tuple[str, str]]:
    """The requests a hosted backend's preparation makes: it lists the uploaded files, then
    uploads what is missing."""
    return [(method, path) for method, path in fake.api.requests if path.startswith("/v1/files")]


def test_a_resumed_study_that_met_its_target_prepares_no_upload(fake_openai, runs):
    """A resumed sweep that a stop rule ends already starts no trial: it asks the provider
    nothing about its files (a request that can fail, for nothing) and exits 0."""
    hosted = ("study=tickets_openai", f"backend.base_url={fake_openai.base_url}")
    quick = ("sweep.n_trials=3", "train.batch_size=16", "train.epochs=2", "pruner=none")
    command = ("sweep", *hosted, *OPENAI_TEST_SETTINGS, *quick, "sweep.target=10")
    first = run_in_process(*command, runs=runs)
    assert first.returncode == 0, first.stdout + first.stderr
    before = file_requests(fake_openai)
    assert before.count(("POST", "/v1/files")) == 2  # train and validation
    assert len(fake_openai.api.jobs) == 1  # any eval/loss meets the target: 1 trial

    again = run_in_process(*command, runs=runs)
    assert again.returncode == 0, again.stdout + again.stderr
    assert file_requests(fake_openai) == before  # not even a listing
    assert len(fake_openai.api.jobs) == 1
    out = " ".join(again.stdout.split())
    assert "(before this sweep: no trial started)" in out
    assert "1 of 3 trials finished; stopped by sweep.target; raise or unset" in out


def test_a_continuation_whose_carried_trials_meet_a_rule_prepares_nothing(tmp_path, monkeypatch):
    prepared: list[str] = []
    prepare = FakeBackend.prepare

    def counted(self, cfg, dataset):
        prepared.append(cfg.name)
        return prepare(self, cfg, dataset)

    monkeypatch.setattr(FakeBackend, "prepare", counted)
    rule = (*FAST, EPOCHS, ONE_TWO_SIX, "sweep.target=0.8", "sweep.n_trials=10")
    first = run_in_process("sweep", *rule, runs=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert prepared == ["sentiment_tiny"]
    continued = ("name=sentiment_tiny-2", "sweep.continue_from=sentiment_tiny")
    again = run_in_process("sweep", *rule, *continued, runs=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert prepared == ["sentiment_tiny"]  # the carried trials met sweep.target already
    out = " ".join(again.stdout.split())
    assert "trial 2's eval/f1 0.8518 >= sweep.target 0.8 (before this sweep" in out
    assert "3 of 10 trials finished; stopped by sweep.target" in out


def test_a_failed_trial_in_a_study_a_rule_stopped_exits_1(tmp_path):
    """A rule's stop is a normal end only where no trial of the sweep failed: a failure is
    not, so the exit code is 1 and the failed trial is named."""
    flaky = "backend._target_=tests.helpers.FlakyBackend"  # fails at batch size 8
    batches = (
        "train.batch_size=choice(8,16)",
        "sweep.enqueue=[{train.batch_size: 8}, {train.batch_size: 16}]",
    )
    done = run_in_process(
        "sweep", *FAST, flaky, *batches, "sweep.target=0.1", "sweep.n_trials=10", runs=tmp_path
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    assert "trial 0 FAIL" in out and "trial 1 COMPLETE" in out
    assert "stopped: target reached: trial 1's eval/f1 0.7503 >= sweep.target 0.1" in out
    assert (
        "short of sweep.n_trials: 1 of 10 trials finished; 1 failed (trial 0: RuntimeError: "
        "out of memory (simulated for batch size 8)); the study stopped (see above). The same "
        "command would start no trial: raise or unset sweep.target to go on."
    ) in out  # not "run the same command to try again": the rule holds on a rerun


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.budget_steps=-5"], "sweep.budget_steps must be at least 1 (or null), not -5"),
        (["sweep.stagnation_trials=0"], "sweep.stagnation_trials must be at least 1 (or null)"),
        (["sweep.min_improvement=-0.1"], "sweep.min_improvement must be at least 0 (or null)"),
        (["sweep.min_improvement=0.01"], "set sweep.stagnation_trials too"),
        (
            ["sweep.target=0.8", "sweep.objectives={eval/f1: maximize, train/steps: minimize}"],
            "sweep.target=0.8 needs one objective; this study has 2 (sweep.objectives)",
        ),
        (
            [
                "sweep.stagnation_trials=5",
                "sweep.objectives={eval/f1: maximize, train/steps: minimize}",
            ],
            "sweep.stagnation_trials=5 needs one objective",
        ),
    ],
)
def test_bad_stop_rules_are_refused_before_anything_is_written(
    make_cfg, tmp_path, overrides, message
):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Sweep(make_cfg(*FAST, *overrides), overrides, tracker_factory=InMemoryStore().tracker)
    assert not any(tmp_path.rglob("*.log"))  # no Optuna journal: no study was created


def test_the_margin_is_the_setting_else_one_seed_noise_sd_else_zero():
    noise = SeedNoise(0.02, 3, "confirm runs")
    assert margin(None, noise) == (0.02, "the noise: seed noise, sd 0.02, from 3 confirm runs")
    assert margin(0.05, noise) == (0.05, "the noise: sweep.min_improvement")  # set: it wins
    assert margin(None, None) == (0.0, "no noise estimate: no confirm runs")


@pytest.mark.parametrize(("last", "stops"), [(0.515, True), (0.53, False)])
def test_stagnation_reads_the_confirm_runs_seed_noise(make_cfg, last, stops):
    """Confirm runs of sd 0.02 (harness.noise.seed_noise): a gain of 0.015 over the last two
    trials is within it, 0.03 is not."""
    study = optuna.create_study(direction="maximize")
    for value in (0.5, 0.51, last):
        study.add_trial(optuna.trial.create_trial(value=value))
    study.set_user_attr(CONFIRM_ATTR, {"0": {"1": 0.80, "2": 0.82, "3": 0.84}})
    cfg = make_cfg(*FAST, "sweep.stagnation_trials=2")
    stop = stop_rule_met(cfg, study, ("eval/f1", "maximize"))
    if not stops:
        assert stop is None
        return
    assert stop is not None and stop.message == (
        f"stagnation: the best eval/f1 ({last:.4g}, trial 2) has not improved by more than 0.02 "
        "(the noise: seed noise, sd 0.02, from 3 confirm runs) in the last 2 trials"
    )


@pytest.mark.parametrize(
    ("rules", "unset"),
    [
        (
            ["sweep.target=0.4", "sweep.stagnation_trials=2", "sweep.min_improvement=0.01"],
            ["sweep.target", "sweep.stagnation_trials", "sweep.min_improvement"],
        ),
        (["sweep.target=0.9", "sweep.budget_steps=30"], ["sweep.budget_steps"]),
        (["sweep.target=0.9", "sweep.budget_steps=31", "sweep.stagnation_trials=3"], []),
    ],
)
def test_the_advice_unsets_the_rules_the_study_meets_as_its_overrides_set_them(
    make_cfg, rules, unset
):
    """Three trials of 0.5, 10 steps each. The rules are read from the study's own overrides
    (what the advice's command runs with), not from the report's config, which has none."""
    study = optuna.create_study(direction="maximize")
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"steps": 10}))
    objective = Objective("eval/f1", "maximize")
    assert rules_to_unset(study, make_cfg(*FAST), [*FAST, *rules], objective) == unset


def test_a_met_rule_with_a_confirm_step_still_prepares_before_any_write(tmp_path, monkeypatch):
    """The confirm step runs after a stop rule's end and trains: its backend is prepared in
    preflight as before, so a preparation that fails refuses the command with nothing
    written (the study's recorded overrides stay the first command's)."""
    rule = (*FAST, EPOCHS, ONE_TWO_SIX, "sweep.target=0.8", "sweep.n_trials=10")
    first = run_in_process("sweep", *rule, runs=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    journal = next((tmp_path / "optuna").glob("*.log"))
    written = journal.read_bytes()

    def refused(self, cfg, dataset):
        raise ConfigError("upload refused")

    monkeypatch.setattr(FakeBackend, "prepare", refused)
    confirm = ("sweep.confirm_top_k=1", "sweep.confirm_seeds=2")
    again = run_in_process("sweep", *rule, *confirm, runs=tmp_path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "upload refused" in again.stdout + again.stderr
    assert journal.read_bytes() == written  # refused before the first write


def test_the_advice_reads_the_rules_from_the_overrides_where_they_do_not_compose_here(
    make_cfg, monkeypatch
):
    """A study's overrides may not compose on the host that reports (sweep.devices it lacks):
    the rules they set still count, on the report's config, which has none."""

    def refused(overrides):
        raise ConfigError("sweep.devices: GPU 1 is not on this machine")

    monkeypatch.setattr("harness.report.load_config", refused)
    study = optuna.create_study(direction="maximize")
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"steps": 10}))
    rules = ["sweep.target=0.4", "sweep.budget_steps=31", "sweep.devices=[0,1]"]
    objective = Objective("eval/f1", "maximize")
    assert rules_to_unset(study, make_cfg(*FAST), [*FAST, *rules], objective) == ["sweep.target"]
