"""`harness train +from_best=true`: the study's best, retrained and registered as NAME@champion."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.champion import champion_overrides, train_champion
from harness.config import ConfigError, load_config
from harness.storage import storage_for
from harness.study import Sweep, best_trial, load_study
from harness.tracking import tracking_uri
from tests.helpers import OPENAI_TEST_SETTINGS


def test_champion_overrides_replay_the_best_trials_command_then_this_ones(make_cfg):
    cfg = make_cfg("backend=fake", "tracking.log_best_model=false", "sweep.n_trials=3")
    sweep_overrides = [
        "backend=fake",
        "train.max_length=48",
        "sweep.n_trials=3",  # means nothing to one run
        "train.learning_rate=tag(log, interval(1e-4, 1e-2))",  # a search: the params replace it
        "storage.url=postgresql://u:***@db/x",  # redacted: the environment has the real one
    ]
    study = Sweep(cfg, sweep_overrides).run()
    best = best_trial(study)
    lines = champion_overrides(["study=sentiment_tiny", "train.epochs=2"], best)
    assert lines[:2] == ["backend=fake", "train.max_length=48"]
    assert f"train.learning_rate={best.params['train.learning_rate']!r}" in lines
    assert lines[-1] == "train.epochs=2"  # this command's own overrides win
    assert not any("n_trials" in line or "***" in line for line in lines)


def test_a_study_without_a_completed_trial_has_no_champion(runs):
    overrides = ["backend=fake", f"paths.runs_dir={runs}"]
    with pytest.raises(ConfigError, match="no study named"):
        train_champion([*overrides, "+from_best=true"], print)
    study = optuna.create_study(
        study_name="sentiment_tiny", storage=storage_for(load_config(overrides))
    )
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ConfigError, match="has no completed trial: nothing to retrain"):
        train_champion([*overrides, "+from_best=true"], print)


def test_hosted_champion_is_the_best_fine_tuned_model_and_costs_nothing(fake_openai, runs):
    overrides = [
        "study=tickets_openai",
        f"backend.base_url={fake_openai.base_url}",
        *OPENAI_TEST_SETTINGS,
        f"paths.runs_dir={runs}",
        "train.batch_size=16",
        "train.epochs=2",
    ]
    Sweep(load_config([*overrides, "sweep.n_trials=2"]), overrides).run()
    jobs = len(fake_openai.api.jobs)
    said: list[str] = []
    assert train_champion([*overrides, "+from_best=true"], said.append) == 0
    assert len(fake_openai.api.jobs) == jobs  # no new paid job
    cfg = load_config(overrides)
    best = best_trial(load_study(cfg))
    client = MlflowClient(tracking_uri(cfg))
    version = client.get_model_version_by_alias("tickets_openai", "champion")
    model_id = client.get_run(best.user_attrs["mlflow_run_id"]).data.tags["harness.hosted_model"]
    assert model_id.startswith("ft:")
    assert version.tags["hosted_model"] == model_id
    assert version.tags["from_trial"] == str(best.number)
    assert any(model_id in line and "no new job" in line for line in said)


@pytest.mark.slow
def test_local_champion_is_retrained_registered_and_loads_by_alias(runs):
    import mlflow

    overrides = [
        f"paths.runs_dir={runs}",
        "train.epochs=1",
        "train.batch_size=32",
        "tracking.log_best_model=false",
    ]
    Sweep(load_config([*overrides, "sweep.n_trials=2"]), overrides).run()
    said: list[str] = []
    code = train_champion([*overrides, "+from_best=true", "+with_validation=true"], said.append)
    assert code == 0
    cfg = load_config(overrides)
    client = MlflowClient(tracking_uri(cfg))
    version = client.get_model_version_by_alias("sentiment_tiny", "champion")
    run = client.get_run(version.run_id)
    assert run.info.run_name.startswith("champion-")
    assert run.data.tags["harness.trained_on"] == "train+validation"
    best = best_trial(load_study(cfg))
    assert run.data.tags["harness.from_trial"] == str(best.number)
    assert run.data.params["train.learning_rate"] == str(best.params["train.learning_rate"])
    assert any("models:/sentiment_tiny@champion" in line for line in said)
    # loaded the way the printed instructions say
    mlflow.set_tracking_uri(tracking_uri(cfg))
    model = mlflow.transformers.load_model("models:/sentiment_tiny@champion")
    labels = {"negative", "neutral", "positive"}
    assert model("the soup was cold and the waiter rude")[0]["label"] in labels
