"""The loops both hosted backends share (harness.backends.hosted), against the loopback fakes
through the real SDKs over HTTP: a create a gateway timed out waits backend.create_grace_s before
it looks again, and is re-attached to even on the last attempt; a job whose cancel has not
landed is still the trial's; abandoning a key sums what all its jobs billed; a completed job's
bill is kept when its results fail; a setting Together refuses fails its trial alone."""

from __future__ import annotations

import optuna
import pytest

from harness.backends.hosted import HostedJobError
from harness.backends.together_jobs import find_or_create as together_find_or_create
from harness.backends.together_jobs import job_request, suffix_for
from harness.data import load_dataset
from harness.fake_openai import RequestClock, Timing
from harness.fake_together import TogetherTiming
from harness.study import Sweep, make_backend
from tests.helpers import RecordingReporter, trial_spec

OPENAI_PRICE = 3.0 / 1e6  # tickets_openai's gpt-4o-mini, USD per training token
NANO = 1e9  # Together's total_price is in nanodollars
TOGETHER_SETTINGS = (
    "backend.poll_interval_s=0.01",
    "backend.max_poll_interval_s=0.05",
    "backend.request_retries=4",
    "backend.create_grace_s=0.05",
)
QUICK = ("train.batch_size=16", "train.epochs=2")
# a gateway that times out a create lists its job this long after: the grace wait outlasts it
LAG_S, GRACE_S = 0.3, 0.6


@pytest.fixture
def together_cfg(make_cfg, fake_together):
    def make(*overrides: str):
        base = f"backend.base_url={fake_together.base_url}"
        return make_cfg("study=tickets_together", base, *TOGETHER_SETTINGS, *overrides)

    return make


def openai_trial(openai_cfg, tmp_path, key: str, *overrides: str):
    cfg = openai_cfg(*QUICK, *overrides)
    backend = make_backend(cfg)
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    return backend, trial_spec(cfg, prepared, tmp_path / key, key=key)


def together_trial(together_cfg, tmp_path, key: str, *overrides: str):
    cfg = together_cfg(*QUICK, *overrides)
    backend = make_backend(cfg)
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    return backend, trial_spec(cfg, prepared, tmp_path / key, key=key)


def together_job(backend, spec, key: str):
    """A job under ``key`` as a trial's first create makes it (a dead process's, say)."""
    request = job_request(spec.config, spec.prepared, backend.model, "s", backend.shape)
    request["suffix"] = suffix_for(spec.config.name, key)
    return together_find_or_create(backend.client, backend.patience, key, request, "m")


def steady_openai(fake) -> None:
    fake.api.clock = RequestClock()
    fake.api.timing = Timing(validate_s=1, queue_s=1, step_s=1)


def steady_together(fake) -> None:
    fake.api.clock = RequestClock()
    fake.api.timing = TogetherTiming(validate_s=1, queue_s=1, step_s=1, restart_s=3)


class NoStepCount(RecordingReporter):
    """Tracking that fails as the trial's length is set: the follower's constructor raises."""

    def set_total_steps(self, total):
        raise RuntimeError("tracking is down")


class TestGatewayTimeout:
    """A gateway's 504 to a create is a lost answer: the job may exist, listed only later."""

    @pytest.mark.parametrize("attempts", [1, 2])
    def test_openai_waits_the_grace_and_reattaches(
        self, openai_cfg, fake_openai, tmp_path, attempts
    ):
        fake_openai.api.faults.gateway_timeout_creates = 1
        fake_openai.api.faults.gateway_lag_s = LAG_S
        backend, spec = openai_trial(
            openai_cfg,
            tmp_path,
            "k",
            f"backend.create_attempts={attempts}",
            f"backend.create_grace_s={GRACE_S}",
        )
        reporter = RecordingReporter("eval/loss")
        backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()  # not a second paid job
        assert fake_openai.api.requests.count(("POST", "/v1/fine_tuning/jobs")) == 1
        assert job.status == "succeeded" and reporter.tags["openai.reattached"] == "true"

    @pytest.mark.parametrize("attempts", [1, 2])
    def test_together_waits_the_grace_and_reattaches(
        self, together_cfg, fake_together, tmp_path, attempts
    ):
        fake_together.api.faults.gateway_timeout_creates = 1
        fake_together.api.faults.gateway_lag_s = LAG_S
        backend, spec = together_trial(
            together_cfg,
            tmp_path,
            "k",
            f"backend.create_attempts={attempts}",
            f"backend.create_grace_s={GRACE_S}",
        )
        reporter = RecordingReporter("eval/loss")
        backend.run(spec, reporter)
        (job,) = fake_together.api.jobs.values()
        assert fake_together.api.requests.count(("POST", "/v1/fine-tunes")) == 1
        assert job.status == "completed" and reporter.tags["together.reattached"] == "true"

    def test_a_job_never_listed_fails_the_trial_after_the_last_look(
        self, together_cfg, fake_together, tmp_path
    ):
        fake_together.api.faults.gateway_timeout_creates = 1
        fake_together.api.faults.gateway_lag_s = 3600.0
        backend, spec = together_trial(together_cfg, tmp_path, "k", "backend.create_attempts=1")
        with pytest.raises(HostedJobError, match="could not create a Together fine-tuning job"):
            backend.run(spec, RecordingReporter("eval/loss"))
        # looked before the create and once more after it: no second create
        assert fake_together.api.requests.count(("POST", "/v1/fine-tunes")) == 1
        assert fake_together.api.requests.count(("GET", "/v1/fine-tunes")) == 2


class TestFollowerInsideTheCancel:
    def test_openai_job_is_cancelled_when_the_follower_cannot_start(
        self, openai_cfg, fake_openai, tmp_path
    ):
        steady_openai(fake_openai)
        backend, spec = openai_trial(openai_cfg, tmp_path, "k")
        with pytest.raises(RuntimeError, match="tracking is down"):
            backend.run(spec, NoStepCount("eval/loss"))
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "cancelled"

    def test_together_job_is_cancelled_when_the_follower_cannot_start(
        self, together_cfg, fake_together, tmp_path
    ):
        steady_together(fake_together)
        backend, spec = together_trial(together_cfg, tmp_path, "k")
        with pytest.raises(RuntimeError, match="tracking is down"):
            backend.run(spec, NoStepCount("eval/loss"))
        (job,) = fake_together.api.jobs.values()
        assert job.status == "cancelled"


class TestCancelRequested:
    def test_a_job_whose_cancel_has_not_landed_is_reattached_to(
        self, together_cfg, fake_together, tmp_path
    ):
        steady_together(fake_together)
        fake_together.api.timing.cancel_s = 10**9  # the cancel never lands
        backend, spec = together_trial(together_cfg, tmp_path, "k")
        job, _ = together_job(backend, spec, "k")
        backend.client.fine_tuning.cancel(job.id)  # the process died right after
        assert fake_together.api.jobs[job.id].status == "cancel_requested"
        again, reattached = together_job(backend, spec, "k")
        assert reattached and again.id == job.id and len(fake_together.api.jobs) == 1


class TestAbandon:
    def test_openai_sums_every_job_carrying_the_key(self, openai_cfg, fake_openai, tmp_path):
        steady_openai(fake_openai)
        backend, spec = openai_trial(openai_cfg, tmp_path, "dead")
        first, _ = backend._find_or_create(spec.config, spec.prepared, 0, "dead")
        for _ in range(6):
            backend.client.fine_tuning.jobs.retrieve(first.id)
        assert backend._cancel_and_read_back(first.id).status == "cancelled"
        second, reattached = backend._find_or_create(spec.config, spec.prepared, 0, "dead")
        assert not reattached and second.id != first.id
        for _ in range(8):
            backend.client.fine_tuning.jobs.retrieve(second.id)
        billed = backend.abandon("dead")
        jobs = fake_openai.api.jobs
        assert jobs[second.id].status == "cancelled"
        both = jobs[first.id].trained_tokens + jobs[second.id].trained_tokens
        assert jobs[first.id].trained_tokens > 0 and jobs[second.id].trained_tokens > 0
        assert billed == pytest.approx(both * OPENAI_PRICE)

    def test_together_sums_every_job_and_cancels_one_cancel_requested(
        self, together_cfg, fake_together, tmp_path
    ):
        steady_together(fake_together)
        backend, spec = together_trial(together_cfg, tmp_path, "dead")
        fake_together.api.timing.cancel_s = 2  # lands within a few reads
        first, _ = together_job(backend, spec, "dead")
        for _ in range(6):
            backend.client.fine_tuning.retrieve(first.id)
        backend.client.fine_tuning.cancel(first.id)
        for _ in range(4):
            backend.client.fine_tuning.retrieve(first.id)
        assert fake_together.api.jobs[first.id].status == "cancelled"
        second, reattached = together_job(backend, spec, "dead")
        assert not reattached
        for _ in range(8):
            backend.client.fine_tuning.retrieve(second.id)
        backend.client.fine_tuning.cancel(second.id)  # a kill -9 while it was cancelling
        assert fake_together.api.jobs[second.id].status == "cancel_requested"
        billed = backend.abandon("dead")
        jobs = fake_together.api.jobs
        assert jobs[second.id].status == "cancelled"
        assert jobs[first.id].total_price > 0 and jobs[second.id].total_price > 0
        total = (jobs[first.id].total_price + jobs[second.id].total_price) / NANO
        assert billed == pytest.approx(total)


class TestResultsThatFail:
    """The job completed and billed; its trial's folder cannot be made (a file is in the way)."""

    def test_openai_records_the_bill(self, openai_cfg, fake_openai, tmp_path):
        backend, spec = openai_trial(openai_cfg, tmp_path, "k")
        spec.workdir.parent.mkdir(parents=True, exist_ok=True)
        spec.workdir.write_text("in the way")
        reporter = RecordingReporter("eval/loss")
        with pytest.raises(FileExistsError):
            backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "succeeded"
        assert reporter.calls[-1][1]["cost_usd"] == pytest.approx(job.trained_tokens * OPENAI_PRICE)
        assert reporter.tags["openai.final_status"] == "succeeded"

    def test_together_records_the_bill(self, together_cfg, fake_together, tmp_path):
        backend, spec = together_trial(together_cfg, tmp_path, "k")
        spec.workdir.parent.mkdir(parents=True, exist_ok=True)
        spec.workdir.write_text("in the way")
        reporter = RecordingReporter("eval/loss")
        with pytest.raises(FileExistsError):
            backend.run(spec, reporter)
        (job,) = fake_together.api.jobs.values()
        assert job.status == "completed"
        assert reporter.calls[-1][1]["cost_usd"] == pytest.approx(job.total_price / NANO)
        assert reporter.tags["together.final_status"] == "completed"


class TestTrialSettingRefused:
    @pytest.mark.parametrize("param", ["batch_size", ""])  # "": said in the message only
    def test_a_refused_batch_size_fails_its_trial_and_the_study_goes_on(
        self, together_cfg, fake_together, param
    ):
        fake_together.api.faults.refuse_batch_size_creates = 1
        fake_together.api.faults.batch_size_param = param
        cfg = together_cfg("sweep.n_trials=2", "train.batch_size=96", "train.epochs=2")
        study = Sweep(cfg, []).run()
        states = [t.state for t in study.trials]
        assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
        (job,) = fake_together.api.jobs.values()
        assert job.batch_size == 96 and job.status == "completed"
