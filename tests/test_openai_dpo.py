"""Preference tuning (DPO) through the OpenAI fine-tuning API, on the loopback fake through the
real SDK: a DPO study judged by the tuned model's answers on the validation pairs (not the DPO
loss), its beta searched within the API's (0, 2], and the SFT-then-DPO chain whose base model is
a fine-tuned one."""

from __future__ import annotations

import json

import pytest

from harness.config import ConfigError
from harness.data import load_dataset
from harness.study import Sweep, make_backend, plan_study
from tests.helpers import OPENAI_TEST_SETTINGS, study_runs

QUICK = ("sweep.n_trials=3", "train.batch_size=8", "train.epochs=2", "sampler=random")
PRICE = 5.0 / 1e6  # gpt-4.1-mini, USD per training token (conf/backend/openai.yaml)


@pytest.fixture
def dpo_cfg(make_cfg, fake_openai):
    def make(*overrides: str):
        base = f"backend.base_url={fake_openai.base_url}"
        return make_cfg("study=prefs_openai", base, *OPENAI_TEST_SETTINGS, *QUICK, *overrides)

    return make


def test_a_dpo_study_is_judged_by_the_preferred_rate_on_validation_pairs(dpo_cfg, fake_openai):
    cfg = dpo_cfg()
    study = Sweep(cfg, []).run()
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    dataset = load_dataset(cfg.data)
    n_val, n_test = len(dataset.validation), len(dataset.test)
    # each job: the preference rows, method dpo with the trial's beta and hyperparameters
    uploads = [f for f in fake_openai.api.files.values() if f.purpose == "fine-tune"]
    assert len(uploads) == 2
    for upload in uploads:
        row = json.loads(upload.content.decode().splitlines()[0])
        assert set(row) == {"input", "preferred_output", "non_preferred_output"}
    found = study_runs(cfg)
    client = found.client
    for trial, sent in zip(study.trials, fake_openai.api.job_requests, strict=True):
        assert sent["model"] == "gpt-4.1-mini-2025-04-14"
        hp = sent["method"]["dpo"]["hyperparameters"]
        assert sent["method"]["type"] == "dpo" and hp["beta"] == trial.params["train.dpo_beta"]
        assert hp["n_epochs"] == 2 and hp["batch_size"] == 8  # fixed by QUICK
        metrics = trial.user_attrs["metrics"]
        assert trial.value == metrics["eval/preferred_rate"] and 0.0 <= trial.value <= 1.0
        assert 0.0 <= metrics["test/preferred_rate"] <= 1.0 and metrics["eval/rouge_l"] > 0.0
        run = found.by_name[f"trial-{trial.number:04d}"]
        job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
        history = client.get_metric_history(run.info.run_id, "eval/preferred_rate")
        assert [(m.step, m.value) for m in history] == [(job.total_steps, trial.value)]
        assert run.data.metrics["cost_usd"] == pytest.approx(job.trained_tokens * PRICE)
    # validation and test pairs asked once per trial, of that trial's model
    assert len(fake_openai.api.chat_requests) == 3 * (n_val + n_test)
    # the fake's curves follow beta (and the multiplier): each trial's job ends elsewhere
    assert len({t.user_attrs["metrics"]["eval/loss"] for t in study.trials}) == 3


def test_the_preferred_rate_is_measured_only_when_the_study_optimizes_it(dpo_cfg, fake_openai):
    cfg = dpo_cfg("sweep.n_trials=1", "sweep.metric=eval/loss", "sweep.direction=minimize")
    study = Sweep(cfg, []).run()
    metrics = study.trials[0].user_attrs["metrics"]
    assert "eval/preferred_rate" not in metrics and "test/preferred_rate" in metrics
    n_test = len(load_dataset(cfg.data).test)
    assert len(fake_openai.api.chat_requests) == n_test  # the test split only


def test_sft_then_dpo_starts_from_the_fine_tuned_model_priced_as_its_base(
    make_cfg, dpo_cfg, fake_openai
):
    sft = make_cfg(
        "study=faq_openai", f"backend.base_url={fake_openai.base_url}", *OPENAI_TEST_SETTINGS,
        "backend.model=gpt-4.1-mini-2025-04-14", "sweep.n_trials=1", "train.epochs=1",
    )  # fmt: skip
    (first,) = Sweep(sft, []).run().trials
    tuned = study_runs(sft).by_name["trial-0000"].data.tags["openai.fine_tuned_model"]
    assert tuned.startswith("ft:gpt-4.1-mini-2025-04-14:") and first.state.name == "COMPLETE"
    cfg = dpo_cfg("sweep.n_trials=1", f"backend.model='{tuned}'")
    backend = make_backend(cfg)
    estimate = backend.estimate_cost_usd(cfg, backend.describe(cfg, load_dataset(cfg.data)))
    (trial,) = Sweep(cfg, []).run().trials
    assert trial.state.name == "COMPLETE"
    assert fake_openai.api.job_requests[-1]["model"] == tuned
    job = list(fake_openai.api.jobs.values())[-1]
    assert job.model == tuned and job.method == "dpo"
    assert trial.user_attrs["cost_usd"] == pytest.approx(job.trained_tokens * PRICE)
    assert (
        0
        < estimate
        == pytest.approx(2 * backend.describe(cfg, load_dataset(cfg.data)).file_tokens * PRICE)
    )


@pytest.mark.parametrize("override", ["train.dpo_beta=interval(0.1, 3.0)", "train.dpo_beta=2.5"])
def test_a_beta_beyond_the_apis_limit_is_refused_before_any_job(dpo_cfg, fake_openai, override):
    with pytest.raises(ConfigError, match=r"outside what the fine-tuning API takes .* \(0, 2\]"):
        plan_study(dpo_cfg(override))
    assert fake_openai.api.jobs == {} and fake_openai.api.requests == []


def test_beta_is_tunable_only_under_dpo(make_cfg, fake_openai):
    cfg = make_cfg(
        "study=tickets_openai", f"backend.base_url={fake_openai.base_url}",
        "train.dpo_beta=interval(0.1, 1.0)",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot tune train\.dpo_beta"):
        plan_study(cfg)


def test_azure_cannot_score_preferences_without_a_deployment(dpo_cfg, fake_openai):
    endpoint = fake_openai.base_url.removesuffix("/v1")
    cfg = dpo_cfg("backend=azure_openai", f"backend.azure_endpoint={endpoint}")
    with pytest.raises(ConfigError, match="eval/preferred_rate is measured on the fine-tuned"):
        plan_study(cfg)
    assert fake_openai.api.requests == []
