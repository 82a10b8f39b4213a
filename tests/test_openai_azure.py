"""Hosted fine-tuning after OpenAI's cutoff: the OpenAI backend against the loopback fake as
OpenAI and as Azure OpenAI (the fake serves both layouts, through the real SDK's OpenAI and
AzureOpenAI clients): sweeps that prune, fail a job, hit the budget or lose a create's answer;
jobs the provider pauses and resumes (Azure's Developer tier) or pauses too long; a provider that
refuses new jobs stopping the study; Azure's own settings (endpoint, training tier, the
deployment that scores the test split)."""

from __future__ import annotations

import time

import pytest

from harness.backends.hosted import ProviderRefusedError
from harness.backends.openai_refusal import OPENAI_REMAINS
from harness.config import ConfigError, with_params
from harness.data import load_dataset
from harness.fake_openai import RequestClock, Timing
from harness.study import Sweep, load_study, make_backend, plan_study
from tests.helpers import (
    OPENAI_TEST_SETTINGS,
    RecordingReporter,
    run_in_process,
    study_runs,
    trial_spec,
)

QUICK = ("sweep.n_trials=3", "train.batch_size=16", "train.epochs=2", "pruner=none")
CREATE = ("POST", "/v1/fine_tuning/jobs")


def provider_overrides(provider: str, fake) -> list[str]:
    """The overrides that point a hosted study at the fake as ``provider``."""
    if provider == "azure":
        endpoint = fake.base_url.removesuffix("/v1")
        return ["backend=azure_openai", f"backend.azure_endpoint={endpoint}"]
    return [f"backend.base_url={fake.base_url}"]


@pytest.fixture(params=["openai", "azure"])
def provider(request) -> str:
    return request.param


@pytest.fixture
def hosted_cfg(make_cfg, fake_openai, provider):
    """A hosted study's config pointed at the fake as OpenAI or as Azure OpenAI."""

    def make(*overrides: str):
        study = [o for o in overrides if o.startswith("study=")] or ["study=tickets_openai"]
        rest = [o for o in overrides if not o.startswith("study=")]
        where = provider_overrides(provider, fake_openai)
        return make_cfg(study[0], *where, *OPENAI_TEST_SETTINGS, *rest)

    return make


def backend_and_spec(cfg, tmp_path, key="trial-key"):
    backend = make_backend(cfg)
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    return backend, trial_spec(cfg, prepared, tmp_path, key=key)


def price_of(cfg) -> float:
    """USD per training token of the study's model (gpt-4o-mini for OpenAI, gpt-4.1-mini for
    Azure), as the backend prices it."""
    from harness.cost import price_per_token

    return price_per_token(dict(cfg.backend.prices_per_1m_training_tokens), cfg.backend.model)


class TestBothProviders:
    def test_sweep_prunes_by_cancelling_jobs(self, hosted_cfg, fake_openai, provider):
        fake_openai.api.timing.step_s = 0.01  # slow enough to be cancelled mid-job
        cfg = hosted_cfg(
            "sweep.n_trials=5",
            "sampler=random",
            "pruner.n_startup_trials=2",
            "train.batch_size=16",
            "train.epochs=range(3,5)",
        )
        study = Sweep(cfg, []).run()
        states = [t.state.name for t in study.trials]
        assert len(states) == 5 and "COMPLETE" in states and "PRUNED" in states
        assert len(fake_openai.api.jobs) == 5 and fake_openai.api.requests.count(CREATE) == 5
        found = study_runs(cfg)
        for trial in study.trials:
            run = found.by_name[f"trial-{trial.number:04d}"]
            job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
            assert job.metadata["harness_trial_key"] == trial.user_attrs["harness_trial_key"]
            if trial.state.name == "PRUNED":
                assert job.status == "cancelled" and job.steps_done < job.total_steps
            else:
                assert job.status == "succeeded"
                assert run.data.metrics["cost_usd"] == pytest.approx(
                    job.trained_tokens * price_of(cfg)
                )
        # Azure's requests carry the key in api-key, OpenAI's in Authorization: Bearer
        header = "api-key" if provider == "azure" else "authorization"
        assert set(fake_openai.api.key_headers) == {header}

    def test_failed_job_fails_only_its_trial(self, hosted_cfg, fake_openai):
        fake_openai.api.faults.fail_jobs = frozenset({2})
        study = Sweep(hosted_cfg(*QUICK), []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
        failed = next(j for j in fake_openai.api.jobs.values() if j.number == 2)
        reason = study.trials[1].user_attrs["fail_reason"]
        assert failed.status == "failed" and failed.id in reason and "server_error" in reason

    def test_budget_stops_the_study_before_a_trial_would_pass_it(self, hosted_cfg, fake_openai):
        cfg = hosted_cfg(*QUICK, "sweep.n_trials=6")
        backend = make_backend(cfg)
        per_trial = backend.estimate_cost_usd(cfg, backend.describe(cfg, load_dataset(cfg.data)))
        sweep = Sweep(with_params(cfg, {"sweep.budget_usd": 2.5 * per_trial}), [])
        study = sweep.run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
        assert len(fake_openai.api.jobs) == 2  # the third was never launched
        assert "budget" in sweep.stop_reason and "not launched" in sweep.stop_reason

    def test_dropped_create_response_makes_no_second_job(self, hosted_cfg, fake_openai, tmp_path):
        fake_openai.api.faults.drop_create_responses = 1
        backend, spec = backend_and_spec(hosted_cfg(*QUICK), tmp_path)
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        assert len(fake_openai.api.jobs) == 1
        assert fake_openai.api.requests.count(CREATE) == 1  # found again, not re-created
        assert reporter.tags["openai.reattached"] == "true" and result.metrics["eval/loss"] > 0

    def test_paused_job_resumed_completes_its_trial_without_the_pause_in_its_time(
        self, hosted_cfg, fake_openai
    ):
        # the server clock moves a second per request: the job pauses after step 3 for 30
        # requests (~15 polls), whatever the machine's load, then trains on
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1)
        faults = fake_openai.api.faults
        faults.pause_jobs, faults.pause_at_step, faults.pause_s = frozenset({1}), 3, 30
        cfg = hosted_cfg(*QUICK, "sweep.n_trials=1")
        began = time.monotonic()
        study = Sweep(cfg, []).run()
        took = time.monotonic() - began
        (trial,) = study.trials
        assert trial.state.name == "COMPLETE"
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "succeeded" and job.steps_done == job.total_steps
        messages = [e["message"] for e in job.events]
        paused = next(i for i, m in enumerate(messages) if "paused" in m)
        assert "resumed" in messages[paused + 1]  # the pause ended where it began: step 3
        assert "Step 3/" in messages[paused - 1] and "Step 4/" in messages[paused + 2]
        run = study_runs(cfg).by_name["trial-0000"]
        pause = run.data.metrics["paused_seconds"]
        assert pause >= 0.1  # ~15 polls of at least backend.poll_interval_s=0.01 s each
        assert run.data.tags["openai.paused_seconds"] == f"{pause:.1f}"
        seconds = trial.user_attrs["metrics"]["train/seconds"]
        assert seconds > 0 and seconds + pause < took  # the trial's time, less its pause
        assert run.data.metrics["train/seconds"] == pytest.approx(seconds)

    def test_pause_over_the_limit_fails_its_trial_alone_and_cancels_the_job(
        self, hosted_cfg, fake_openai
    ):
        faults = fake_openai.api.faults
        faults.pause_jobs, faults.pause_at_step, faults.pause_s = frozenset({2}), 3, 10**9
        # 0.036 s: polls every 0.01-0.05 s see the pause outlast it
        cfg = hosted_cfg(*QUICK, "backend.max_pause_hours=0.00001")
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
        paused = next(j for j in fake_openai.api.jobs.values() if j.number == 2)
        assert paused.status == "cancelled" and paused.steps_done == 3
        reason = study.trials[1].user_attrs["fail_reason"]
        assert paused.id in reason and "backend.max_pause_hours=1e-05: cancelled" in reason
        run = study_runs(cfg).by_name["trial-0001"]
        assert run.info.status == "FAILED"
        assert float(run.data.tags["openai.paused_seconds"]) > 0.036
        assert run.data.tags["openai.final_status"] == "cancelled"

    @pytest.mark.parametrize("answer", ["403", "400"])
    def test_a_provider_refusing_new_jobs_stops_the_study_saying_so_once(
        self, fake_openai, runs, provider, answer
    ):
        fake_openai.api.faults.refuse_jobs = answer
        where = provider_overrides(provider, fake_openai)
        result = run_in_process(
            "sweep", "study=tickets_openai", *where, *OPENAI_TEST_SETTINGS, *QUICK, runs=runs
        )
        printed = result.stdout + result.stderr
        assert result.returncode == 1, printed
        assert fake_openai.api.requests.count(CREATE) == 1  # no second job request
        assert fake_openai.api.jobs == {}
        cfg = hosted_cfg_of(provider, fake_openai, runs)
        study = load_study(cfg)
        assert [t.state.name for t in study.trials] == ["FAIL"]
        reason = study.trials[0].user_attrs["fail_reason"]
        status, code = (
            ("403", "fine_tuning_not_available")
            if answer == "403"
            else ("400", "model_not_available")
        )
        assert f"(HTTP {status}, code {code}: " in reason
        if provider == "azure":
            assert "Azure OpenAI refused" in reason and "backend.training_type" in reason
            said = "Azure OpenAI trains a model only where"
        else:
            assert "the OpenAI API refused" in reason and OPENAI_REMAINS in reason
            said = OPENAI_REMAINS
        assert printed.count(said) == 1, printed  # one message, printed once
        assert "Run it on a provider that trains" in printed  # not "run the same command"
        assert "Run the same command" not in printed


def hosted_cfg_of(provider: str, fake, runs):
    from harness.config import load_config

    where = provider_overrides(provider, fake)
    return load_config(["study=tickets_openai", *where, f"paths.runs_dir={runs}"])


class TestRefusal:
    def test_a_bad_hyperparameter_is_not_a_refusal(self):
        import httpx2
        import openai

        from harness.backends.openai_refusal import refusal_or_none

        def error(status, code, message, param=None):
            body = {"error": {"message": message, "code": code, "param": param}}
            request = httpx2.Request("POST", "http://127.0.0.1/v1/fine_tuning/jobs")
            response = httpx2.Response(status, json=body, request=request)
            cls = {400: openai.BadRequestError, 403: openai.PermissionDeniedError}[status]
            return cls(message, response=response, body=body)

        hyper = error(400, "invalid_value", "n_epochs must be between 1 and 50", "n_epochs")
        assert refusal_or_none(hyper, azure=False) is None
        assert refusal_or_none(error(400, None, "file has too few examples"), False) is None
        model = error(400, None, "Model x is not available for fine-tuning or does not exist.")
        assert isinstance(refusal_or_none(model, azure=False), ProviderRefusedError)
        refused = refusal_or_none(error(403, None, "no"), azure=True)
        assert isinstance(refused, ProviderRefusedError)
        assert str(refused).startswith("Azure OpenAI refused to create a fine-tuning job (HTTP 403")


class TestAzure:
    def azure_cfg(self, make_cfg, fake, *overrides):
        endpoint = fake.base_url.removesuffix("/v1")
        return make_cfg(
            "study=tickets_openai", "backend=azure_openai", f"backend.azure_endpoint={endpoint}",
            *OPENAI_TEST_SETTINGS, *QUICK, *overrides,
        )  # fmt: skip

    def test_null_endpoint_is_refused_before_any_request(self, make_cfg, fake_openai):
        cfg = make_cfg("study=tickets_openai", "backend=azure_openai")
        with pytest.raises(ConfigError, match=r"^backend\.azure_endpoint is null: backend=azure"):
            plan_study(cfg)
        with pytest.raises(ConfigError, match="azure_endpoint is null"):
            make_backend(cfg).check_credentials()
        assert fake_openai.api.requests == []

    def test_azure_settings_on_openai_are_refused(self, make_cfg, fake_openai):
        cfg = make_cfg(
            "study=tickets_openai", f"backend.base_url={fake_openai.base_url}",
            "backend.training_type=Developer",
        )  # fmt: skip
        with pytest.raises(ConfigError, match=r"backend\.training_type='Developer' is Azure"):
            plan_study(cfg)

    def test_training_tier_is_sent_as_azures_training_type(self, make_cfg, fake_openai, tmp_path):
        cfg = self.azure_cfg(make_cfg, fake_openai, "backend.training_type=Developer")
        backend, spec = backend_and_spec(cfg, tmp_path)
        result = backend.run(spec, RecordingReporter("eval/loss"))
        (sent,) = fake_openai.api.job_requests
        assert sent["trainingType"] == "Developer" and sent["model"] == "gpt-4.1-mini-2025-04-14"
        assert sent["method"]["type"] == "supervised"
        assert type(backend.client).__name__ == "AzureOpenAI"
        assert result.hosted_model["provider"] == "azure-openai"
        assert "test/accuracy" not in result.metrics  # no deployment: not scored

    def test_test_split_is_scored_through_the_deployment_serving_the_trials_model(
        self, make_cfg, fake_openai, tmp_path
    ):
        fake_openai.api.auto_deploy = "ft-tickets"  # each new model deployed under this name
        cfg = self.azure_cfg(make_cfg, fake_openai, "backend.azure_deployment=ft-tickets")
        backend, spec = backend_and_spec(cfg, tmp_path)
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        job = next(iter(fake_openai.api.jobs.values()))
        n_test = len(load_dataset(cfg.data).test)
        chats = fake_openai.api.chat_requests
        assert len(chats) == n_test + 1  # the check of what the deployment serves, then the test
        assert {c["model"] for c in chats} == {job.fine_tuned_model}
        assert ("POST", "/v1/chat/completions") in fake_openai.api.requests
        assert 0.3 < result.metrics["test/accuracy"] <= 1.0
        assert "harness.test_skipped" not in reporter.tags

    def test_a_deployment_serving_another_model_is_not_scored(
        self, make_cfg, fake_openai, tmp_path
    ):
        fake_openai.api.deployments["ft-tickets"] = "gpt-4.1-mini-2025-04-14"  # the base model
        cfg = self.azure_cfg(make_cfg, fake_openai, "backend.azure_deployment=ft-tickets")
        backend, spec = backend_and_spec(cfg, tmp_path)
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        assert not any(k.startswith("test/") for k in result.metrics)
        assert len(fake_openai.api.chat_requests) == 1  # only the check
        skipped = reporter.tags["harness.test_skipped"]
        assert "serves gpt-4.1-mini-2025-04-14, not this trial's model ft:gpt-4.1-mini" in skipped


def test_the_fake_server_takes_refusal_and_pause_faults_on_its_command_line():
    from harness.fake_openai import _api_from_options, _serve_options

    options = _serve_options(
        ["--refuse-jobs", "400", "--pause-jobs", "1,3", "--pause-at-step", "5",
         "--pause-seconds", "2.5"]
    )  # fmt: skip
    faults = _api_from_options(options).faults
    assert faults.refuse_jobs == "400" and faults.pause_jobs == frozenset({1, 3})
    assert faults.pause_at_step == 5 and faults.pause_s == 2.5
    assert _api_from_options(_serve_options([])).faults.refuse_jobs == ""


def test_time_paused_does_not_count_toward_max_job_hours(openai_cfg):
    from harness.backends.hosted import HostedJobError
    from harness.backends.openai_follow import Follower

    cfg = openai_cfg("backend.max_job_hours=0.01", "backend.max_pause_hours=0.02")  # 36 s, 72 s
    backend = make_backend(cfg)
    prepared = backend.describe(cfg, load_dataset(cfg.data))
    follower = Follower(backend, "ftjob-x", RecordingReporter("eval/loss"), cfg, prepared)
    follower.started, follower.status = 0.0, "paused"
    follower._check_time(10.0)  # paused from second 10 ...
    follower.status = "running"
    follower._check_time(70.0)  # ... to second 70: 60 s paused, within max_pause_hours
    assert follower.paused_seconds(70.0) == 60.0
    follower._check_time(95.0)  # 35 s of training: within max_job_hours, though 95 s passed
    with pytest.raises(HostedJobError, match=r"after 0.01 h of training \(backend.max_job_hours"):
        follower._check_time(97.0)
