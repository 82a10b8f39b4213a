"""The Together backend against the loopback fake, through the real `together` SDK over HTTP:
sweeps that prune by cancelling jobs, failed jobs, the budget, lost create answers, pre-empted
jobs, refusals, re-attaching after a crash, and the API key kept out of every record. The
contract suite (test_backend_contract) runs it too."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import optuna
import pytest

from harness.backends.base import UntunableKeyError
from harness.backends.hosted import HostedJobError, MissingApiKeyError, RefusedApiKeyError
from harness.backends.together_ft import TogetherBackend
from harness.backends.together_jobs import carries, suffix_for, trial_tag
from harness.config import ConfigError, with_params
from harness.data import load_dataset
from harness.fake_openai import RequestClock
from harness.fake_together import TogetherTiming
from harness.study import Sweep, load_study, make_backend, plan_study
from tests.helpers import (
    OPENAI_TEST_SETTINGS,
    RecordingReporter,
    cli_env,
    run_cli,
    run_in_process,
    start_cli,
    study_runs,
    trial_spec,
    wait_for,
    write,
)

TOGETHER_TEST_SETTINGS = OPENAI_TEST_SETTINGS  # the same quick waits: both fakes run fast
QUICK = ("sweep.n_trials=3", "train.batch_size=16", "train.epochs=2")
NANO = 1e9  # total_price is in nanodollars
CREATE = ("POST", "/v1/fine-tunes")


@pytest.fixture
def together_cfg(make_cfg, fake_together):
    """A Together study's config pointed at the fake (tickets_together unless study=...)."""

    def make(*overrides: str):
        study = [o for o in overrides if o.startswith("study=")] or ["study=tickets_together"]
        rest = [o for o in overrides if not o.startswith("study=")]
        base = f"backend.base_url={fake_together.base_url}"
        return make_cfg(study[0], base, *TOGETHER_TEST_SETTINGS, *rest)

    return make


def jobs_of(fake) -> list:
    return list(fake.api.jobs.values())


def billed_usd(job) -> float:
    return job.total_price / NANO


def steady(fake) -> None:
    """Jobs that move one step per request: the same states on a loaded machine as on an idle
    one."""
    fake.api.clock = RequestClock()
    fake.api.timing = TogetherTiming(validate_s=1, queue_s=1, step_s=1, restart_s=3)


class TestSweep:
    def test_sweep_prunes_by_cancelling_jobs(self, together_cfg, fake_together):
        fake_together.api.timing.step_s = 0.01  # slow enough to be cancelled mid-job
        cfg = together_cfg(
            "sweep.n_trials=6",
            "sampler=random",
            "pruner.n_startup_trials=2",
            "train.batch_size=16",
            "train.epochs=range(3,5)",
        )
        study = Sweep(cfg, []).run()
        states = [t.state.name for t in study.trials]
        assert len(states) == 6 and "COMPLETE" in states and "PRUNED" in states
        assert len(fake_together.api.jobs) == 6  # one job per trial
        assert "cancelled" in [job.status for job in jobs_of(fake_together)]
        found = study_runs(cfg)
        for trial in study.trials:
            run = found.by_name[f"trial-{trial.number:04d}"]
            job = fake_together.api.jobs[run.data.tags["together.job_id"]]
            assert carries(job, trial_tag(trial.user_attrs["harness_trial_key"]))
            assert job.n_epochs == trial.params["train.epochs"]
            assert job.learning_rate == pytest.approx(trial.params["train.learning_rate"])
            assert job.training_type["lora_r"] == trial.params["lora.r"]
            assert job.n_evals == job.n_epochs  # backend.n_evals_per_epoch=1
            if trial.state.name == "PRUNED":
                assert run.data.tags["optuna.trial_state"] == "PRUNED"
                assert job.status in ("cancelled", "completed")
            else:
                assert job.status == "completed"
                assert run.data.tags["together.output_model"] == job.output_name
                assert run.data.metrics["eval/loss"] == pytest.approx(trial.value)
            assert run.data.metrics["cost_usd"] == pytest.approx(billed_usd(job))
        # the files were uploaded once for the study, not once per trial
        assert len(fake_together.api.files) == 2

    def test_completed_trial_records_the_hosted_model_and_its_scores(
        self, together_cfg, fake_together
    ):
        cfg = together_cfg(*QUICK, "sweep.n_trials=1", "train.learning_rate=1e-4")
        study = Sweep(cfg, []).run()
        run = study_runs(cfg).by_name["trial-0000"]
        (job,) = jobs_of(fake_together)
        chats = fake_together.api.chat_requests
        assert len(chats) == len(load_dataset(cfg.data).test)
        assert {c["model"] for c in chats} == {job.output_name}
        assert {c["temperature"] for c in chats} == {0}
        assert 0.3 < run.data.metrics["test/accuracy"] <= 1.0  # five queues: chance is 0.2
        assert run.data.metrics["cost_usd"] == pytest.approx(billed_usd(job))
        assert run.data.metrics["trained_tokens"] == job.token_count
        assert run.data.tags["together.cost_source"] == "billed"
        assert run.data.metrics["paused_seconds"] == 0.0
        # Together's estimate and harness's arithmetic, both on the run
        ours = float(run.data.tags["together.estimate_usd"])
        theirs = float(run.data.tags["together.provider_estimate_usd"])
        assert ours > 0 and theirs > 0
        assert float(run.data.tags["together.estimate_gap"]) == pytest.approx(
            (theirs - ours) / ours, abs=1e-3
        )
        assert study.trials[0].user_attrs["metrics"]["train/seconds"] > 0

    def test_failed_job_fails_only_its_trial(self, together_cfg, fake_together):
        fake_together.api.faults.fail_jobs = frozenset({2})
        cfg = together_cfg(*QUICK, "pruner=none")
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
        failed = next(j for j in jobs_of(fake_together) if j.number == 2)
        assert failed.status == "error"
        reason = study.trials[1].user_attrs["fail_reason"]
        assert failed.id in reason and "injected" in reason
        run = study_runs(cfg).by_name["trial-0001"]
        assert run.info.status == "FAILED"
        assert "injected" in run.data.tags["together.error_message"]
        assert run.data.tags["together.final_status"] == "error"
        assert run.data.metrics["cost_usd"] == 0.0  # refunded: the job's total_price is 0

    def test_budget_stops_the_study_before_a_trial_would_pass_it(self, together_cfg, fake_together):
        cfg = together_cfg(*QUICK, "sweep.n_trials=6", "pruner=none")
        backend = make_backend(cfg)
        per_trial = backend.estimate_cost_usd(cfg, backend.describe(cfg, load_dataset(cfg.data)))
        sweep = Sweep(with_params(cfg, {"sweep.budget_usd": 2.5 * per_trial}), [])
        study = sweep.run()
        # the jobs bill a little more than the estimate (Together's tokenizer): two fit
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
        assert len(fake_together.api.jobs) == 2  # the third was never launched
        assert "budget" in sweep.stop_reason and "not launched" in sweep.stop_reason
        spent = [t.user_attrs["cost_usd"] for t in study.trials[:2]]
        assert spent == pytest.approx([billed_usd(j) for j in jobs_of(fake_together)])

    def test_refusal_stops_the_study_with_its_message(self, fake_together, runs):
        fake_together.api.faults.refuse_creates = 1000  # the account cannot fine-tune
        result = run_in_process(
            "sweep", "study=tickets_together", f"backend.base_url={fake_together.base_url}",
            *TOGETHER_TEST_SETTINGS, *QUICK, runs=runs,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert fake_together.api.requests.count(CREATE) == 1  # no second create
        assert fake_together.api.jobs == {}
        printed = " ".join((result.stdout + result.stderr).split())
        assert "does not have access to fine-tuning" in printed  # what Together answered
        assert "backend=openai" in printed and "2027-01-06" in printed
        assert "backend=azure_openai" in printed and "backend.model" in printed
        study = load_study(together_cfg_for(runs, fake_together))
        assert [t.state.name for t in study.trials] == ["FAIL"]
        assert "HTTP 403" in study.trials[0].user_attrs["fail_reason"]

    def test_out_of_credit_stops_the_study_too(self, together_cfg, fake_together):
        fake_together.api.faults.refuse_creates = 1000
        fake_together.api.faults.refusal_status = 402
        sweep = Sweep(together_cfg(*QUICK), [])
        study = sweep.run()
        assert [t.state.name for t in study.trials] == ["FAIL"]
        assert "HTTP 402" in sweep.stop_reason and "Insufficient credits" in sweep.stop_reason

    def test_a_model_together_does_not_fine_tune_is_refused_before_any_job(
        self, together_cfg, fake_together
    ):
        with pytest.raises(ConfigError, match=r"not available for fine-tuning.*backend=openai"):
            Sweep(together_cfg("backend.model=meta-llama/Meta-Llama-3.1-8B-Unknown"), []).run()
        assert fake_together.api.jobs == {}
        assert fake_together.api.files == {}  # refused before the data were uploaded


def together_cfg_for(runs: Path, fake):
    from harness.config import load_config

    return load_config(
        ["study=tickets_together", f"backend.base_url={fake.base_url}", f"paths.runs_dir={runs}"]
    )


class TestKnobs:
    def test_keys_together_cannot_take_are_refused_before_any_job(
        self, together_cfg, fake_together
    ):
        for key in (
            "train.dropout=interval(0.0,0.3)",
            "train.learning_rate_multiplier=choice(1,2)",
        ):
            with pytest.raises(UntunableKeyError, match="cannot tune"):
                plan_study(together_cfg(key))
        # full fine-tuning has no LoRA rank to search
        with pytest.raises(UntunableKeyError, match=r"cannot tune lora\.alpha, lora\.dropout"):
            plan_study(together_cfg("adapter=none"))
        with pytest.raises(UntunableKeyError, match=r"cannot tune train\.dpo_beta"):
            plan_study(together_cfg("train.dpo_beta=interval(0.05,0.5)"))
        assert fake_together.api.jobs == {} and fake_together.api.requests == []

    def test_qlora_and_lora_variants_together_lacks_are_refused(self, together_cfg):
        with pytest.raises(ConfigError, match="adapter=qlora: Together trains LoRA"):
            plan_study(together_cfg("adapter=qlora"))
        with pytest.raises(ConfigError, match=r"lora\.dora=true"):
            plan_study(together_cfg("lora.dora=true"))
        with pytest.raises(ConfigError, match="integer alpha"):
            plan_study(together_cfg("lora.alpha=interval(8.0,64.0)"))

    def test_tunable_keys_follow_adapter_and_method(self, together_cfg):
        cfg = together_cfg()
        backend = make_backend(cfg)
        assert backend.tunable_keys(cfg) == {
            "train.learning_rate", "train.epochs", "train.batch_size", "train.warmup_ratio",
            "train.weight_decay", "lora.r", "lora.alpha", "lora.dropout",
        }  # fmt: skip
        full = together_cfg("adapter=none", "search=none")
        assert not {k for k in backend.tunable_keys(full) if k.startswith("lora.")}
        assert backend.hard_limits()["lora.r"] == (1.0, 64.0)

    def test_job_carries_the_trials_knobs(self, together_cfg, fake_together, tmp_path):
        cfg = together_cfg(
            "train.epochs=2", "train.batch_size=16", "train.learning_rate=3e-4",
            "train.warmup_ratio=0.05", "train.weight_decay=0.01", "lora.r=32", "lora.alpha=64",
            "lora.dropout=0.1", "seed=7",
        )  # fmt: skip
        backend = make_backend(cfg)
        prepared = backend.prepare(cfg, load_dataset(cfg.data))
        backend.run(trial_spec(cfg, prepared, tmp_path, key="knobs"), RecordingReporter("x"))
        (job,) = jobs_of(fake_together)
        assert (job.n_epochs, job.batch_size, job.learning_rate, job.seed) == (2, 16, 3e-4, 7)
        assert (job.request["warmup_ratio"], job.request["weight_decay"]) == (0.05, 0.01)
        assert job.training_type == {
            "type": "Lora", "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.1,
            "lora_trainable_modules": "all-linear",
        }  # fmt: skip
        assert job.training_method["method"] == "sft"
        assert job.suffix == suffix_for(cfg.name, "knobs") and len(job.suffix) <= 40

    def test_search_space_outside_the_models_limits_is_refused_before_any_job(
        self, together_cfg, fake_together
    ):
        cfg = together_cfg("lora.r=choice(8,128)")
        with pytest.raises(ConfigError, match=r"lora\.r=128: Together takes 1 to 64"):
            Sweep(cfg, []).run()
        assert fake_together.api.jobs == {}
        assert fake_together.api.files == {}  # refused before the data were uploaded


class TestJobSafety:
    def backend_and_spec(self, together_cfg, tmp_path, key="trial-key-1", *overrides):
        cfg = together_cfg("train.batch_size=16", "train.epochs=2", *overrides)
        backend = make_backend(cfg)
        prepared = backend.prepare(cfg, load_dataset(cfg.data))
        return backend, trial_spec(cfg, prepared, tmp_path, key=key)

    def test_lost_create_answer_makes_no_second_job(self, together_cfg, fake_together, tmp_path):
        fake_together.api.faults.drop_create_responses = 1
        backend, spec = self.backend_and_spec(together_cfg, tmp_path)
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        assert len(fake_together.api.jobs) == 1  # created once, found again, not re-created
        assert fake_together.api.requests.count(CREATE) == 1
        assert reporter.tags["together.reattached"] == "true"
        assert result.metrics["eval/loss"] > 0

    def test_same_key_reattaches_and_another_key_does_not(
        self, together_cfg, fake_together, tmp_path
    ):
        backend, spec = self.backend_and_spec(together_cfg, tmp_path, "key-a")
        first = backend.run(spec, RecordingReporter("eval/loss"))
        second = backend.run(spec, RecordingReporter("eval/loss"))
        assert len(fake_together.api.jobs) == 1 and first.hosted_model == second.hosted_model
        assert first.hosted_model["provider"] == "together"
        other = trial_spec(spec.config, spec.prepared, tmp_path / "b", key="key-b", number=1)
        reporter = RecordingReporter("eval/loss")
        backend.run(other, reporter)
        assert len(fake_together.api.jobs) == 2 and reporter.tags["together.reattached"] == "false"

    def test_pruned_job_is_cancelled_and_its_bill_recorded(
        self, together_cfg, fake_together, tmp_path
    ):
        steady(fake_together)
        backend, spec = self.backend_and_spec(together_cfg, tmp_path, "k", "train.epochs=3")
        reporter = RecordingReporter("eval/loss", prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, reporter)
        (job,) = jobs_of(fake_together)
        assert job.status == "cancelled" and 0 < job.steps_done < job.total_steps
        assert reporter.calls[-1][1] == {
            "cost_usd": pytest.approx(billed_usd(job)),
            "trained_tokens": job.token_count,
        }
        assert reporter.tags["together.final_status"] == "cancelled"
        assert reporter.tags["together.cost_source"] == "billed"

    def test_pruned_job_that_finished_first_records_its_whole_bill(
        self, together_cfg, fake_together, tmp_path
    ):
        steady(fake_together)
        fake_together.api.faults.finish_before_cancel = 1  # the cancel lands after the end
        backend, spec = self.backend_and_spec(together_cfg, tmp_path, "k", "train.epochs=3")
        reporter = RecordingReporter("eval/loss", prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, reporter)
        (job,) = jobs_of(fake_together)
        assert job.status == "completed" and job.steps_done == job.total_steps
        step, metrics = reporter.calls[-1]
        assert metrics == {
            "cost_usd": pytest.approx(billed_usd(job)),
            "trained_tokens": job.token_count,
        }
        assert step == job.total_steps  # logged where the job ended, past the prune
        assert reporter.tags["together.final_status"] == "completed"

    def test_a_cancel_that_never_lands_counts_the_whole_job(
        self, together_cfg, fake_together, tmp_path
    ):
        steady(fake_together)
        fake_together.api.timing.cancel_s = 10**9
        backend, spec = self.backend_and_spec(
            together_cfg, tmp_path, "k", "backend.cancel_wait_s=0.05"
        )
        reporter = RecordingReporter("eval/loss", prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, reporter)
        (job,) = jobs_of(fake_together)
        assert job.status == "cancel_requested"
        whole = backend.estimate_cost_usd(spec.config, spec.prepared)
        assert reporter.calls[-1][1] == {"cost_usd": pytest.approx(whole)}
        assert reporter.tags["together.cost_source"].startswith("estimate: the job was still")

    def test_abandoned_job_returns_what_it_billed(self, together_cfg, fake_together, tmp_path):
        from harness.backends.together_jobs import find_or_create, job_request

        steady(fake_together)
        backend, spec = self.backend_and_spec(together_cfg, tmp_path)
        request = job_request(spec.config, spec.prepared, backend.model, "s-dead", backend.shape)
        request["suffix"] = suffix_for(spec.config.name, "dead-trial")
        job, _ = find_or_create(backend.client, backend.patience, "dead-trial", request, "m")
        for _ in range(12):  # the dead process's job trains on
            backend.client.fine_tuning.retrieve(job.id)
        billed = backend.abandon("dead-trial")
        stored = fake_together.api.jobs[job.id]
        assert stored.status == "cancelled" and stored.steps_done > 0
        assert billed == pytest.approx(billed_usd(stored))
        assert backend.abandon("no-such-trial") is None

    def test_persistent_errors_fail_the_trial(self, together_cfg, fake_together, tmp_path):
        backend, spec = self.backend_and_spec(
            together_cfg, tmp_path, "k", "backend.request_retries=1", "backend.poll_failures=3",
            "backend.create_attempts=2",
        )  # fmt: skip
        fake_together.api.faults.error_rate = 1.0
        with pytest.raises(HostedJobError, match="could not create a Together fine-tuning job"):
            backend.run(spec, RecordingReporter("eval/loss"))
        assert fake_together.api.jobs == {}


class TestPreemption:
    """Together has no paused status: a pre-empted job goes back to queued, then runs on."""

    def test_restarted_job_is_followed_to_its_end_with_its_wait_left_out(
        self, together_cfg, fake_together, tmp_path
    ):
        fake_together.api.faults.restart_jobs = frozenset({1})
        fake_together.api.timing.restart_s = 1.0  # queued this long, half-way through
        cfg = together_cfg(*QUICK, "sweep.n_trials=1")
        started = time.monotonic()
        study = Sweep(cfg, []).run()
        took = time.monotonic() - started
        (job,) = jobs_of(fake_together)
        assert job.status == "completed" and job.restarted
        assert [e["type"] for e in job.events].count("job_restarted") == 1
        metrics = study.trials[0].user_attrs["metrics"]
        # measured between polls: within a poll interval (and a loaded machine's lag) of 1 s
        assert 0.5 <= metrics["paused_seconds"] <= took
        assert metrics["train/seconds"] + metrics["paused_seconds"] <= took
        run = study_runs(cfg).by_name["trial-0000"]
        assert run.data.metrics["train/seconds"] == pytest.approx(metrics["train/seconds"])
        assert run.data.metrics["paused_seconds"] == pytest.approx(metrics["paused_seconds"])
        assert study.trials[0].state.name == "COMPLETE"

    def test_a_job_paused_past_the_limit_is_cancelled_and_fails(
        self, together_cfg, fake_together, tmp_path
    ):
        fake_together.api.faults.restart_jobs = frozenset({1})
        fake_together.api.timing.restart_s = 600.0
        cfg = together_cfg("train.batch_size=16", "train.epochs=2", "backend.max_pause_hours=1e-4")
        backend = make_backend(cfg)
        prepared = backend.prepare(cfg, load_dataset(cfg.data))
        reporter = RecordingReporter("eval/loss")
        with pytest.raises(HostedJobError, match=r"past backend\.max_pause_hours"):
            backend.run(trial_spec(cfg, prepared, tmp_path, key="paused"), reporter)
        (job,) = jobs_of(fake_together)
        assert job.status == "cancelled"
        assert reporter.tags["together.restarts"] == "1"
        assert float(reporter.tags["together.paused_seconds"]) >= 0.36


class TestDataAndCost:
    def test_tokens_are_counted_and_said_to_be_an_estimate(self, together_cfg):
        cfg = together_cfg("train.epochs=3")
        backend = make_backend(cfg)
        prepared = backend.describe(cfg, load_dataset(cfg.data))
        assert prepared.file_tokens > 5000 and prepared.validation_tokens > 500
        assert "Together counts with the model's own tokenizer" in prepared.tokens_note
        price = 0.48 / 1e6  # LoRA SFT of an 8B model
        expected = (3 * prepared.file_tokens + 3 * prepared.validation_tokens) * price
        assert backend.estimate_cost_usd(cfg, prepared) == pytest.approx(expected)
        full = together_cfg("adapter=none", "search=none")
        assert make_backend(full).describe(full, load_dataset(full.data)).usd_per_token == (
            pytest.approx(0.54 / 1e6)
        )

    def test_estimates_far_apart_are_warned_about(self, together_cfg, fake_together, caplog):
        cfg = together_cfg("backend.estimate_tolerance=0.001")
        backend = make_backend(cfg)
        with caplog.at_level(logging.WARNING, logger="harness"):
            prepared = backend.prepare(cfg, load_dataset(cfg.data))
        assert "Together estimates" in caplog.text and "estimate_tolerance=0.001" in caplog.text
        assert prepared.estimate_tags["together.provider_estimate_usd"]
        asked = [r for r in fake_together.api.requests if r[1].endswith("/estimate-price")]
        assert len(asked) == 1  # once per study

    def test_uploads_are_found_again_not_repeated(self, together_cfg, fake_together):
        cfg = together_cfg()
        backend = make_backend(cfg)
        dataset = load_dataset(cfg.data)
        first = backend.prepare(cfg, dataset)
        again = make_backend(cfg).prepare(cfg, dataset)  # a resumed study, another process
        assert (first.training_file, first.validation_file) == (
            again.training_file,
            again.validation_file,
        )
        assert len(fake_together.api.files) == 2

    def test_data_too_small_names_the_file_before_any_upload(
        self, together_cfg, fake_together, tmp_path
    ):
        import json

        rows = [{"text": f"ticket {i}", "label": "ab"[i % 2]} for i in range(12)]
        path = write(tmp_path / "few.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        cfg = together_cfg(f"data.path={path}", "data.min_rows=2")
        from harness.data import DataError

        with pytest.raises(DataError, match=r"few\.jsonl.*needs at least 10"):
            make_backend(cfg).prepare(cfg, load_dataset(cfg.data))
        assert fake_together.api.files == {}

    def test_model_without_a_price_is_refused(self, together_cfg):
        cfg = together_cfg("backend.model=someone/another-model")
        with pytest.raises(ConfigError, match=r"prices_per_1m_training_tokens\.lora\.sft"):
            make_backend(cfg).describe(cfg, load_dataset(cfg.data))

    def test_prices_must_be_by_training_type_and_method(self, together_cfg):
        with pytest.raises(ConfigError, match="must map a training type"):
            make_backend(together_cfg("backend.prices_per_1m_training_tokens={lora: 0.48}"))

    def test_missing_or_refused_api_key_says_where_it_was_read(
        self, make_cfg, fake_together, monkeypatch
    ):
        monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
        cfg = make_cfg("study=tickets_together")
        with pytest.raises(MissingApiKeyError, match="export TOGETHER_API_KEY"):
            make_backend(cfg).check_credentials()
        fake_together.api.api_key = "the-right-key"
        monkeypatch.setenv("TOGETHER_API_KEY", "a-wrong-key")
        cfg = make_cfg("study=tickets_together", f"backend.base_url={fake_together.base_url}")
        with pytest.raises(RefusedApiKeyError, match="TOGETHER_API_KEY") as error:
            make_backend(cfg).check_credentials()
        assert "a-wrong-key" not in str(error.value)
        assert fake_together.api.requests == [("GET", "/v1/fine-tunes")]  # one request

    def test_constructor_takes_every_argument_from_the_yaml(self, make_cfg):
        cfg = make_cfg("study=tickets_together")
        args = {k: v for k, v in cfg.backend.items() if k != "_target_"}
        assert isinstance(TogetherBackend(**args), TogetherBackend)
        with pytest.raises(ConfigError, match="n_evals_per_epoch=0"):
            TogetherBackend(**{**args, "n_evals_per_epoch": 0})


@pytest.mark.slow  # kill -9 and secrets: sweeps in processes of their own
class TestCrashAndSecrets:
    def sweep_command(self, fake, runs: Path, *extra: str) -> list[str]:
        return [
            "sweep", "study=tickets_together",
            f"backend.base_url={fake.base_url}", f"paths.runs_dir={runs}",
            *TOGETHER_TEST_SETTINGS, *extra,
        ]  # fmt: skip

    def test_resumed_study_reattaches_to_its_running_job(self, fake_together, runs, make_cfg):
        fake_together.api.timing.step_s = 0.02  # ~1 s per job: time to kill the sweep mid-job
        command = self.sweep_command(fake_together, runs, *QUICK, "sweep.n_trials=2", "pruner=none")
        process = start_cli(*command)
        try:

            def job_running() -> bool:
                assert process.poll() is None, process.stdout.read()
                jobs = jobs_of(fake_together)
                return bool(jobs) and jobs[0].steps_done > 3

            wait_for(job_running, 60, "the first job ran 4 steps", interval=0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        (crashed_job,) = jobs_of(fake_together)
        assert crashed_job.status == "running"  # kill -9 cancels nothing: the job runs on

        fake_together.api.timing.step_s = 0.001
        result = run_cli(*command, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(fake_together.api.jobs) == 2  # the crashed trial's job + the second trial's
        cfg = make_cfg("study=tickets_together")
        study = load_study(cfg)
        assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
        retry = study.trials[1]
        assert retry.user_attrs["harness_retry_of"] == 0
        key = study.trials[0].user_attrs["harness_trial_key"]
        assert retry.user_attrs["harness_trial_key"] == key
        runs_by_name = study_runs(cfg).by_name
        assert runs_by_name["trial-0000"].info.status == "FAILED"
        assert runs_by_name["trial-0001"].data.tags["together.job_id"] == crashed_job.id
        assert runs_by_name["trial-0001"].data.tags["together.reattached"] == "true"
        assert crashed_job.status == "completed"

    def test_api_key_appears_in_no_record_or_output(self, fake_together, runs, make_cfg):
        secret = "tgp_v1_DoNotLeak-7f3a9c1e5b"
        fake_together.api.api_key = secret  # the fake refuses any other key: it was really sent
        fake_together.api.faults.fail_jobs = frozenset({2})  # error paths print too
        env = cli_env(TOGETHER_API_KEY=secret)
        command = self.sweep_command(fake_together, runs, *QUICK)
        result = run_cli(*command, env=env, timeout=240)
        assert result.returncode == 1, result.stdout + result.stderr  # a failed trial
        assert "COMPLETE" in result.stdout and "FAIL" in result.stdout
        validated = run_cli("validate", "study=tickets_together", runs=runs, env=env, timeout=60)
        assert validated.returncode == 0, validated.stderr
        for output in (result, validated):
            assert secret not in output.stdout + output.stderr
        stored = [p for p in runs.rglob("*") if p.is_file()]
        assert any(p.name == "mlflow.db" for p in stored) and len(stored) > 10
        for path in stored:  # the MLflow store, its artifacts, the Optuna journal, caches
            assert secret.encode() not in path.read_bytes(), path
        for run in study_runs(make_cfg("study=tickets_together")).by_name.values():
            assert not any(
                secret in v for v in [*run.data.params.values(), *run.data.tags.values()]
            )


class TestPreferenceTuning:
    def test_a_model_together_does_not_serve_stops_a_study_it_cannot_score(
        self, together_cfg, fake_together
    ):
        fake_together.api.faults.unserved_outputs = True
        cfg = together_cfg("study=prefs_together", "sweep.n_trials=3", "train.epochs=1")
        sweep = Sweep(cfg, [])
        study = sweep.run()
        # one paid job, its bill kept; no second job for an objective nobody can measure
        assert [t.state.name for t in study.trials] == ["FAIL"]
        assert len(fake_together.api.jobs) == 1
        assert "Together does not answer with the fine-tuned model" in sweep.stop_reason
        assert "eval/preferred_rate" in sweep.stop_reason
        (job,) = fake_together.api.jobs.values()
        assert study.trials[0].user_attrs["cost_usd"] == pytest.approx(billed_usd(job))

    def test_dpo_study_end_to_end_is_judged_by_a_held_out_task_metric(
        self, together_cfg, fake_together
    ):
        cfg = together_cfg(
            "study=prefs_together", "sweep.n_trials=2", "train.epochs=2",
            "sweep.enqueue=[{train.learning_rate: 1e-4, train.dpo_beta: 0.2, lora.r: 16}]",
        )  # fmt: skip
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        found = study_runs(cfg)
        for trial in study.trials:
            run = found.by_name[f"trial-{trial.number:04d}"]
            job = fake_together.api.jobs[run.data.tags["together.job_id"]]
            assert job.training_method["method"] == "dpo"
            assert job.training_method["dpo_beta"] == pytest.approx(trial.params["train.dpo_beta"])
            metrics = trial.user_attrs["metrics"]
            # the objective: the tuned model's answers to the validation prompts, after the job
            assert trial.value == metrics["eval/preferred_rate"]
            assert 0.0 <= metrics["eval/preferred_rate"] <= 1.0
            assert 0.0 <= metrics["test/preferred_rate"] <= 1.0
            assert "eval/perplexity" not in metrics  # exp(DPO loss) means nothing
            assert run.data.metrics["cost_usd"] == pytest.approx(billed_usd(job))
        # the preference rows were uploaded, in the DPO shape
        uploaded = [f for f in fake_together.api.files.values()]
        assert {f.parsed.kind for f in uploaded} == {"preference"}
        n_validation = len(load_dataset(cfg.data).validation)
        n_test = len(load_dataset(cfg.data).test)
        assert len(fake_together.api.chat_requests) == 2 * (n_validation + n_test)
        assert study.trials[0].params["train.dpo_beta"] == 0.2  # the enqueued settings
