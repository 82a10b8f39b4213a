"""The OpenAI backend against the loopback fake, through the real SDK over HTTP: sweeps that prune
by cancelling jobs, failed jobs, the budget, dropped responses, re-attaching after a crash, and
the API key kept out of every record. The contract suite (test_backend_contract) runs it too."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from harness.backends.hosted import UNPARSED, HostedJobError, MissingApiKeyError, parse_label
from harness.backends.openai_ft import OpenAIBackend, decode_result_file
from harness.chat_data import check_chats, to_chats
from harness.config import ConfigError, load_config, with_params
from harness.cost import encoding_for
from harness.data import DataError, load_dataset
from harness.fake_openai import RequestClock, Timing
from harness.report import pruning_savings
from harness.study import Sweep, load_study, make_backend, plan_study
from harness.tracking import tracking_uri
from tests.helpers import (
    OPENAI_TEST_SETTINGS,
    RecordingReporter,
    cli_env,
    run_cli,
    start_cli,
    study_runs,
    trial_spec,
    window_ends,
    write,
)

QUICK = ("sweep.n_trials=3", "train.batch_size=16", "train.epochs=2")


def mlflow_runs(cfg):
    found = study_runs(cfg)
    return found.client, found.by_name


def job_states(fake) -> list[str]:
    return [job.status for job in fake.api.jobs.values()]


class TestSweep:
    def test_sweep_prunes_by_cancelling_jobs(self, openai_cfg, fake_openai):
        fake_openai.api.timing.step_s = 0.01  # slow enough to be cancelled mid-job
        cfg = openai_cfg(
            "sweep.n_trials=6",
            "sampler=random",
            "pruner.n_startup_trials=2",
            "train.batch_size=16",
            "train.epochs=range(3,5)",
        )
        study = Sweep(cfg, []).run()
        states = [t.state.name for t in study.trials]
        assert len(states) == 6 and "COMPLETE" in states and "PRUNED" in states
        # one job per trial, and the pruned ones cancelled while they ran
        assert len(fake_openai.api.jobs) == 6
        assert "cancelled" in job_states(fake_openai)
        client, runs = mlflow_runs(cfg)
        for trial in study.trials:
            run = runs[f"trial-{trial.number:04d}"]
            job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
            assert job.metadata["harness_trial_key"] == trial.user_attrs["harness_trial_key"]
            assert job.metadata["harness_study"] == cfg.name
            hp = job.json()["method"]["supervised"]["hyperparameters"]
            assert hp["n_epochs"] == trial.params["train.epochs"]
            assert hp["learning_rate_multiplier"] == trial.params["train.learning_rate_multiplier"]
            if trial.state.name == "PRUNED":
                assert run.info.status == "FINISHED"
                assert run.data.tags["optuna.trial_state"] == "PRUNED"
            else:
                assert run.info.status == "FINISHED" and job.status == "succeeded"
                assert run.data.tags["openai.fine_tuned_model"] == job.fine_tuned_model
                assert run.data.metrics["eval/loss"] == pytest.approx(trial.value)
                # the whole curve is in MLflow at its steps
                history = client.get_metric_history(run.info.run_id, "train/loss")
                assert sorted(m.step for m in history) == window_ends(job.total_steps)
                assert 0 < run.data.metrics["cost_usd"] < 0.2
        # the files were uploaded once for the study, not once per trial
        uploads = [f for f in fake_openai.api.files.values() if f.purpose == "fine-tune"]
        assert len(uploads) == 2  # train + validation

    def test_completed_trial_records_hosted_model_results_and_scores(self, openai_cfg, fake_openai):
        cfg = openai_cfg(*QUICK, "sweep.n_trials=1", "train.learning_rate_multiplier=2.0")
        study = Sweep(cfg, []).run()
        trial = study.trials[0]
        client, runs = mlflow_runs(cfg)
        run = runs["trial-0000"]
        job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"result.csv", "checkpoints.json", "test_predictions.jsonl"} <= artifacts
        assert "confusion_matrix.png" in artifacts
        checkpoints = json.loads(
            Path(client.download_artifacts(run.info.run_id, "checkpoints.json")).read_text()
        )
        assert [c["step"] for c in checkpoints] == [job.total_steps, job.steps_per_epoch]
        # scored on the test split through chat completions at temperature 0
        n_test = len(load_dataset(cfg.data).test)
        chats = fake_openai.api.chat_requests
        assert len(chats) == n_test and {c["temperature"] for c in chats} == {0}
        assert {c["model"] for c in chats} == {job.fine_tuned_model}
        assert 0.3 < run.data.metrics["test/accuracy"] <= 1.0  # five queues: chance is 0.2
        assert run.data.metrics["trained_tokens"] == job.trained_tokens
        price = 3.0 / 1e6
        assert run.data.metrics["cost_usd"] == pytest.approx(job.trained_tokens * price)
        assert trial.user_attrs["cost_usd"] == pytest.approx(job.trained_tokens * price)
        # an MLflow model entry points at the hosted model, beside local ones
        mlflow.set_tracking_uri(tracking_uri(cfg))
        experiment = client.get_experiment_by_name(cfg.name)
        models = mlflow.search_logged_models(
            experiment_ids=[experiment.experiment_id], output_format="list"
        )
        assert [m.tags["hosted.id"] for m in models] == [job.fine_tuned_model]
        assert models[0].source_run_id == run.info.run_id

    def test_generation_study_scores_text_metrics(self, openai_cfg, fake_openai):
        cfg = openai_cfg("study=faq_openai", "sweep.n_trials=1", "train.epochs=2")
        study = Sweep(cfg, []).run()
        metrics = study.trials[0].user_attrs["metrics"]
        assert study.trials[0].state.name == "COMPLETE"
        assert 0.0 <= metrics["test/exact_match"] <= 1.0
        assert metrics["test/token_f1"] > 0.1  # answers come from the FAQ it was trained on
        assert 0.0 < metrics["test/bleu"] <= 100.0 and 0.0 < metrics["test/rouge_l"] <= 1.0

    def test_failed_job_fails_only_its_trial(self, openai_cfg, fake_openai):
        fake_openai.api.faults.fail_jobs = frozenset({2})
        cfg = openai_cfg(*QUICK, "pruner=none")
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
        failed_job = next(j for j in fake_openai.api.jobs.values() if j.number == 2)
        assert failed_job.status == "failed"
        reason = study.trials[1].user_attrs["fail_reason"]
        assert failed_job.id in reason and "server_error" in reason and "injected" in reason
        _, runs = mlflow_runs(cfg)
        run = runs["trial-0001"]
        assert run.info.status == "FAILED"
        assert "server_error" in run.data.tags["harness.failure_reason"]
        assert run.data.tags["openai.error_code"] == "server_error"
        assert "internal error" in run.data.tags["openai.error_message"]

    def test_budget_stops_the_study_before_a_trial_would_pass_it(self, openai_cfg, fake_openai):
        cfg = openai_cfg(*QUICK, "sweep.n_trials=6", "pruner=none")
        backend = make_backend(cfg)
        prepared = backend.describe(cfg, load_dataset(cfg.data))
        per_trial = backend.estimate_cost_usd(cfg, prepared)
        budget = 2.5 * per_trial  # room for two trials, not three
        cfg = with_params(cfg, {"sweep.budget_usd": budget})
        sweep = Sweep(cfg, [])
        study = sweep.run()
        states = [t.state.name for t in study.trials]
        assert states == ["COMPLETE", "COMPLETE", "FAIL"]
        assert len(fake_openai.api.jobs) == 2  # the third was never launched
        assert "budget" in sweep.stop_reason and "not launched" in sweep.stop_reason
        assert "budget" in study.trials[2].user_attrs["fail_reason"]
        spent = sum(t.user_attrs["cost_usd"] for t in study.trials[:2])
        assert spent <= budget
        _, runs = mlflow_runs(cfg)
        assert "trial-0002" not in runs  # no run for a trial that never started
        assert "budget" in runs[cfg.name].data.tags["harness.stop_reason"]
        assert runs[cfg.name].data.metrics["spend_usd"] == pytest.approx(spent)

    def test_transient_http_errors_are_retried(self, openai_cfg, fake_openai):
        fake_openai.api.faults.error_rate = 0.15
        fake_openai.api.faults.rate_limit_rate = 0.1
        cfg = openai_cfg(*QUICK, "pruner=none", "backend.request_retries=6")
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
        assert len(fake_openai.api.jobs) == 3
        statuses = [status for status in fake_openai.api.responses if status >= 429]
        assert len(statuses) > 10  # the faults really happened

    def test_untunable_key_is_refused_before_any_job(self, openai_cfg, fake_openai):
        cfg = openai_cfg("train.dropout=interval(0.0,0.3)")
        with pytest.raises(ValueError, match=r"cannot tune train\.dropout"):
            plan_study(cfg)
        assert fake_openai.api.jobs == {}

    def test_api_key_in_the_config_is_refused_without_echoing_it(self, openai_cfg):
        with pytest.raises(ConfigError, match="read from the environment") as error:
            plan_study(openai_cfg("+backend.api_key=sk-SECRET-42"))
        assert "unexpected keyword argument 'api_key'" in str(error.value)
        assert "sk-SECRET-42" not in str(error.value)

    def test_objective_must_be_measured_by_the_job(self, openai_cfg, fake_openai):
        cfg = openai_cfg("sweep.metric=eval/f1", "sweep.direction=maximize")
        with pytest.raises(ConfigError, match="eval/loss"):
            Sweep(cfg, []).run()
        assert fake_openai.api.jobs == {} and fake_openai.api.files == {}


class TestJobSafety:
    def backend_and_spec(self, openai_cfg, tmp_path, key="trial-key-1", *overrides):
        cfg = openai_cfg(*QUICK, *overrides)
        backend = make_backend(cfg)
        prepared = backend.prepare(cfg, load_dataset(cfg.data))
        return backend, trial_spec(cfg, prepared, tmp_path, key=key)

    def test_dropped_create_response_makes_no_second_job(self, openai_cfg, fake_openai, tmp_path):
        fake_openai.api.faults.drop_create_responses = 1
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        assert len(fake_openai.api.jobs) == 1  # created once, found again, not re-created
        assert fake_openai.api.requests.count(("POST", "/v1/fine_tuning/jobs")) == 1
        assert reporter.tags["openai.reattached"] == "true"
        assert result.metrics["eval/loss"] > 0

    def test_create_lost_on_the_last_attempt_is_found_not_abandoned(
        self, openai_cfg, fake_openai, tmp_path
    ):
        fake_openai.api.faults.drop_create_responses = 1
        backend, spec = self.backend_and_spec(
            openai_cfg, tmp_path, "k", "backend.create_attempts=1"
        )
        reporter = RecordingReporter("eval/loss")
        backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "succeeded" and reporter.tags["openai.reattached"] == "true"

    def test_keys_are_checked_even_where_the_server_ignores_the_filter(
        self, openai_cfg, fake_openai, tmp_path
    ):
        fake_openai.api.faults.ignore_metadata_filter = True
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path, "key-a")
        backend.run(spec, RecordingReporter("eval/loss"))
        other = trial_spec(spec.config, spec.prepared, tmp_path / "b", key="key-b", number=1)
        reporter = RecordingReporter("eval/loss")
        backend.run(other, reporter)
        assert len(fake_openai.api.jobs) == 2  # key-b did not take key-a's job
        assert reporter.tags["openai.reattached"] == "false"

    def test_a_server_that_keeps_no_metadata_is_warned_about(
        self, openai_cfg, fake_openai, tmp_path, caplog
    ):
        fake_openai.api.faults.drop_metadata = True  # a lost create could not be found again
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path, "key-a")
        with caplog.at_level("WARNING", logger="harness"):
            backend.run(spec, RecordingReporter("eval/loss"))
        assert "kept no metadata on job" in caplog.text
        assert "a retried trial may start a second job" in caplog.text

    def test_a_retry_that_dies_again_has_its_job_cancelled(self, openai_cfg, fake_openai):
        from harness.tracking import MLflowTracker

        fake_openai.api.timing.step_s = 1.0  # a long job
        cfg = openai_cfg(*QUICK)
        sweep = Sweep(cfg, [])
        sweep.plan.prepared = sweep.plan.backend.prepare(sweep.cfg, sweep.plan.dataset)
        job, _ = sweep.plan.backend._find_or_create(sweep.cfg, sweep.plan.prepared, 1, "dead-key")
        study = sweep.create_study()
        trial = study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2**22 + 12345})
        trial.set_user_attr("harness_retry_of", 0)
        trial.set_user_attr("harness_trial_key", "dead-key")
        sweep.tracker = MLflowTracker(sweep.cfg)
        sweep._fail_stale_trials(study)
        assert fake_openai.api.jobs[job.id].status == "cancelled"
        assert study.trials[0].state.name == "FAIL"
        assert len(study.trials) == 1  # not retried a second time

    def test_same_key_reattaches_to_running_job(self, openai_cfg, fake_openai, tmp_path):
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)
        first = backend.run(spec, RecordingReporter("eval/loss"))
        second = backend.run(spec, RecordingReporter("eval/loss"))
        assert len(fake_openai.api.jobs) == 1
        assert first.hosted_model == second.hosted_model

    def test_pruned_job_is_cancelled(self, openai_cfg, fake_openai, tmp_path):
        fake_openai.api.timing.step_s = 0.02
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, RecordingReporter("eval/loss", prune_at_eval=1))
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "cancelled" and job.steps_done < job.total_steps

    def test_persistent_errors_fail_the_trial(self, openai_cfg, fake_openai, tmp_path):
        backend, spec = self.backend_and_spec(
            openai_cfg, tmp_path, "k", "backend.request_retries=1", "backend.poll_failures=3"
        )
        fake_openai.api.faults.error_rate = 1.0
        with pytest.raises(HostedJobError, match="could not create a fine-tuning job"):
            backend.run(spec, RecordingReporter("eval/loss"))
        assert fake_openai.api.jobs == {}

        class BreaksTheServer(RecordingReporter):  # the API goes down once the job runs
            def report(self, step, metrics):
                fake_openai.api.faults.error_rate = 1.0
                super().report(step, metrics)

        fake_openai.api.faults.error_rate = 0.0
        fake_openai.api.timing.step_s = 0.02  # still running when the API goes down
        with pytest.raises(HostedJobError, match=r"lost contact with fine-tuning job .* 3 polls"):
            backend.run(spec, BreaksTheServer("eval/loss"))
        assert len(fake_openai.api.jobs) == 1

    def test_azure_openai_client_runs_a_trial(self, openai_cfg, fake_openai, tmp_path, monkeypatch):
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-123")
        fake_openai.api.api_key = "azure-key-123"
        endpoint = fake_openai.base_url.removesuffix("/v1")
        backend, spec = self.backend_and_spec(
            openai_cfg, tmp_path, "azure-1", "backend.base_url=null",
            f"backend.azure_endpoint={endpoint}", "backend.api_version=2025-04-01-preview",
            "backend.api_key_env=AZURE_OPENAI_API_KEY",
        )  # fmt: skip
        reporter = RecordingReporter("eval/loss")
        result = backend.run(spec, reporter)
        assert type(backend.client).__name__ == "AzureOpenAI"
        assert result.hosted_model["provider"] == "azure-openai"
        assert ("POST", "/v1/fine_tuning/jobs") in fake_openai.api.requests
        # a fine-tuned model must be deployed on Azure before it answers: scoring is skipped,
        # and the run says why, rather than paying for training and then failing
        assert fake_openai.api.chat_requests == []
        assert "deployment" in reporter.tags["harness.test_skipped"]
        assert not any(k.startswith("test/") for k in result.metrics)
        assert result.metrics["eval/loss"] > 0

    def test_result_rows_fill_steps_the_events_missed(self, openai_cfg, fake_openai):
        from harness.backends.openai_follow import Follower

        cfg = openai_cfg()
        backend = make_backend(cfg)
        prepared = backend.describe(cfg, load_dataset(cfg.data))
        reporter = RecordingReporter("eval/loss")
        follower = Follower(backend, "ftjob-x", reporter, cfg, prepared)
        follower.reported_steps = {1}
        follower.report_result_rows(
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
            "1,2.0,0.3,2.1,0.3\n2,1.5,0.5,1.6,0.5\n3,1.0,0.7,,\n"
        )
        assert reporter.calls == [
            (2, {"train/loss": 1.5, "train/token_accuracy": 0.5, "valid/batch_loss": 1.6,
                 "valid/batch_token_accuracy": 0.5}),
            (3, {"train/loss": 1.0, "train/token_accuracy": 0.7}),
        ]  # fmt: skip

    def test_result_file_plain_or_base64(self):
        text = "step,train_loss\n1,2.5\n2,2.1\n"
        assert decode_result_file(text.encode()) == text
        assert decode_result_file(base64.b64encode(text.encode())) == text

    def test_answers_are_parsed_back_to_labels(self):
        labels = ["billing", "bug_report", "data_recovery"]
        assert parse_label("billing", labels) == "billing"
        assert parse_label(" Bug_Report.\n", labels) == "bug_report"
        assert parse_label("This is about data recovery", labels) == "data_recovery"
        assert parse_label("billing or bug_report", labels) == UNPARSED
        assert parse_label("no idea", labels) == UNPARSED


class TestDataAndCost:
    def test_classification_rows_become_chats_naming_the_labels(self, openai_cfg):
        cfg = openai_cfg()
        dataset = load_dataset(cfg.data)
        chats = to_chats(dataset, cfg.backend.system_prompt)
        first = chats["train"][0]
        system, user, assistant = first.messages
        assert system["role"] == "system"
        assert all(label in system["content"] for label in dataset.labels)
        assert user == {"role": "user", "content": dataset.train[0].text}
        assert assistant == {"role": "assistant", "content": dataset.train[0].target}
        assert first.source.startswith(str(Path("studies/data/tickets.jsonl").resolve()))

    def test_chat_rows_pass_through(self, openai_cfg):
        cfg = openai_cfg("study=faq_openai")
        dataset = load_dataset(cfg.data)
        chat = to_chats(dataset, "unused")["test"][0]
        assert chat.messages == dataset.test[0].messages

    def test_too_few_examples_names_the_file(self, openai_cfg, tmp_path):
        rows = [{"text": f"ticket {i}", "label": "ab"[i % 2]} for i in range(12)]
        path = write(tmp_path / "few.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        cfg = openai_cfg(f"data.path={path}", "data.min_rows=2")
        with pytest.raises(DataError, match=r"few\.jsonl.*needs at least 10"):
            make_backend(cfg).describe(cfg, load_dataset(cfg.data))

    def test_example_over_the_token_limit_names_file_and_line(self, openai_cfg, tmp_path):
        rows = [{"text": f"short ticket number {i}", "label": "ab"[i % 2]} for i in range(40)]
        rows[7]["text"] = "a very long ticket " * 40
        path = write(tmp_path / "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        cfg = openai_cfg(
            f"data.path={path}",
            "data.validation_fraction=0.1",
            "data.test_fraction=0.1",
            "+backend.example_token_limits.gpt-4o-mini=100",
        )
        with pytest.raises(
            DataError, match=r"long\.jsonl:8: \d+ tokens .*limit per example is 100"
        ):
            make_backend(cfg).describe(cfg, load_dataset(cfg.data))

    def test_empty_message_is_refused_before_upload(self, tmp_path):
        from harness.chat_data import Chat

        chat = Chat(
            ({"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}), "x.jsonl:3"
        )
        encoding = encoding_for("gpt-4o-mini", str(tmp_path))
        with pytest.raises(DataError, match=r"x\.jsonl:3: message 1 \(assistant\) is empty"):
            check_chats([chat], "validation", encoding, 1000)

    def test_tiktoken_counts_offline_from_bundled_files(self, tmp_path, monkeypatch):
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
        encoding_for.cache_clear()
        encoding = encoding_for("gpt-4o-mini-2024-07-18", str(tmp_path))
        assert encoding.exact and encoding.name == "o200k_base"
        assert encoding.count("hello world") == 2
        assert encoding.count_chat([{"role": "user", "content": "hello world"}]) == 2 + 3 + 3
        assert encoding_for("gpt-3.5-turbo-0125", str(tmp_path)).name == "cl100k_base"
        guessed = encoding_for("llama-3-8b", str(tmp_path))
        assert not guessed.exact and "guessed" in guessed.note
        encoding_for.cache_clear()

    def test_cost_is_epochs_times_file_tokens_times_price(self, openai_cfg):
        cfg = openai_cfg("train.epochs=4")
        backend = make_backend(cfg)
        prepared = backend.describe(cfg, load_dataset(cfg.data))
        assert prepared.file_tokens > 5000
        cost = backend.estimate_cost_usd(cfg, prepared)
        assert cost == pytest.approx(4 * prepared.file_tokens * 3.0 / 1e6)

    def test_model_without_a_price_is_refused(self, openai_cfg):
        cfg = openai_cfg("backend.model=my-provider-model")
        with pytest.raises(ConfigError, match="no training price for model 'my-provider-model'"):
            make_backend(cfg).describe(cfg, load_dataset(cfg.data))

    def test_missing_api_key_says_what_to_do(self, make_cfg, monkeypatch):
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        cfg = make_cfg("study=tickets_openai")
        with pytest.raises(MissingApiKeyError, match="export OPENAI_API_KEY"):
            OpenAIBackend(**{k: v for k, v in cfg.backend.items() if k != "_target_"}).api_key()

    def test_api_key_file(self, make_cfg, tmp_path):
        def backend(key_file):
            return make_backend(make_cfg("backend=openai", f"backend.api_key_file='{key_file}'"))

        path = write(tmp_path / "key", "sk-from-file\n")
        assert backend(path).api_key() == "sk-from-file"
        with pytest.raises(MissingApiKeyError, match="does not exist"):
            backend(tmp_path / "nope").api_key()


PRICE = 3.0 / 1e6  # tickets_openai's model, gpt-4o-mini, at USD 3 per 1M training tokens
# trial 0 learns well; trial 1 (a tiny multiplier) is pruned at its first evaluation
GOOD_THEN_BAD = (
    "sweep.enqueue=[{train.learning_rate_multiplier: 2.0}, {train.learning_rate_multiplier: 0.05}]"
)
PRUNE_SECOND = (
    "train.batch_size=16",
    "train.epochs=3",
    "sweep.n_trials=2",
    "pruner.n_startup_trials=1",
    "pruner.n_warmup_steps=0",
    GOOD_THEN_BAD,
)


def cost_history(client, run) -> list[float]:
    history = client.get_metric_history(run.info.run_id, "cost_usd")
    return [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


class TestBilledSpend:
    """A stopped trial's cost is what the provider billed for its job, read back once the job is
    over, not the estimate of the steps harness saw before it stopped following."""

    @pytest.mark.slow  # a sweep process; the cancelled trial's bill is checked in the fast tier
    def test_pruned_trial_whose_job_finished_records_its_whole_bill(self, fake_openai, runs):
        fake_openai.api.faults.finish_before_cancel = 1  # the cancel lands after the last step
        command = TestCrashAndSecrets().sweep_command(fake_openai, runs, *PRUNE_SECOND)
        result = run_cli(*command, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        cfg = load_config(["study=tickets_openai", f"paths.runs_dir={runs}"])
        study = load_study(cfg)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
        client, mlruns = mlflow_runs(cfg)
        run = mlruns["trial-0001"]
        job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
        # the job finished before the cancel: billed every epoch, as the API reports
        assert job.status == "succeeded" and job.trained_tokens == 3 * job.file_tokens
        billed = job.trained_tokens * PRICE
        pruned = study.trials[1]
        assert round(pruned.user_attrs["cost_usd"], 2) == round(billed, 2)
        assert pruned.user_attrs["cost_usd"] == pytest.approx(billed, rel=1e-12)
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "PRUNED"
        assert run.data.metrics["cost_usd"] == pytest.approx(billed, rel=1e-12)
        assert run.data.metrics["trained_tokens"] == job.trained_tokens
        assert run.data.tags["openai.cost_source"] == "billed"
        assert run.data.tags["openai.final_status"] == "succeeded"
        # what it kept before: the estimate of one epoch, a third of the bill
        first, *_, last = cost_history(client, run)
        assert first < billed / 2 and last == pytest.approx(billed, rel=1e-12)
        # the spend `harness sweep` prints is the provider's bill for both jobs
        total = sum(j.trained_tokens for j in fake_openai.api.jobs.values()) * PRICE
        assert f"spent ${total:.4f} (budget $2.00)" in result.stdout
        # and pruning saved nothing on a job that ran to its end anyway
        savings = pruning_savings(study)
        assert savings.usd_saved == 0.0 and savings.usd_spent == pytest.approx(total)

    def test_budget_stops_the_study_on_billed_spend(self, openai_cfg, fake_openai):
        fake_openai.api.faults.finish_before_cancel = 1
        cfg = openai_cfg(*PRUNE_SECOND, "sweep.n_trials=3")
        backend = make_backend(cfg)
        estimate = backend.estimate_cost_usd(cfg, backend.describe(cfg, load_dataset(cfg.data)))
        # billed: trial 0 and the pruned trial 1 each cost a whole job (the provider counts a
        # few % more tokens than tiktoken), so a third trial would pass 2.8 x an estimate
        budget = 2.8 * estimate
        sweep = Sweep(with_params(cfg, {"sweep.budget_usd": budget}), [])
        study = sweep.run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
        assert len(fake_openai.api.jobs) == 2  # the third job was never created
        billed = [j.trained_tokens * PRICE for j in fake_openai.api.jobs.values()]
        assert [t.user_attrs["cost_usd"] for t in study.trials[:2]] == pytest.approx(billed)
        assert f"has spent ${sum(billed):.4f} of sweep.budget_usd" in sweep.stop_reason
        assert sum(billed) + estimate > budget
        # the partial estimate trial 1 kept before would have launched the third trial
        client, runs = mlflow_runs(sweep.cfg)
        kept_before = cost_history(client, runs["trial-0001"])[0]
        assert billed[0] + kept_before + estimate <= budget

    def test_trial_cancelled_mid_run_records_what_the_job_billed(self, openai_cfg, fake_openai):
        # a job moves one step per request: cancelled mid-run, whatever the machine's load
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1)
        cfg = openai_cfg(*PRUNE_SECOND)
        study = Sweep(cfg, []).run()
        assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
        _, runs = mlflow_runs(cfg)
        run = runs["trial-0001"]
        job = fake_openai.api.jobs[run.data.tags["openai.job_id"]]
        assert job.status == "cancelled" and 0 < job.steps_done < job.total_steps
        assert job.trained_tokens == round(job.file_tokens * job.steps_done / job.steps_per_epoch)
        billed = job.trained_tokens * PRICE
        pruned = study.trials[1]
        assert pruned.user_attrs["cost_usd"] == pytest.approx(billed, rel=1e-12)
        assert run.data.metrics["cost_usd"] == pytest.approx(billed, rel=1e-12)
        assert run.data.tags["openai.cost_source"] == "billed"
        assert run.data.tags["openai.final_status"] == "cancelled"
        # what pruning saved on it: the whole job's estimate less its bill
        saved = pruned.user_attrs["cost_estimate_usd"] - billed
        assert saved > 0 and pruning_savings(study).usd_saved == pytest.approx(saved)

    def backend_and_spec(self, openai_cfg, tmp_path, *overrides):
        cfg = openai_cfg("train.batch_size=16", "train.epochs=3", *overrides)
        backend = make_backend(cfg)
        prepared = backend.prepare(cfg, load_dataset(cfg.data))
        return backend, trial_spec(cfg, prepared, tmp_path, key="billed-key")

    @pytest.mark.parametrize(
        ("cancel_s", "status"),
        [(3, "cancelled"), (10_000, "succeeded")],  # lands in 3 requests / after the job's end
    )
    def test_slow_cancel_is_waited_for(self, openai_cfg, fake_openai, tmp_path, cancel_s, status):
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1, cancel_s=cancel_s)
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)
        reporter = RecordingReporter("eval/loss", prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()
        assert job.status == status
        cancel = fake_openai.api.requests.index(("POST", f"/v1/fine_tuning/jobs/{job.id}/cancel"))
        # the cancel answered "running": harness read the job back until it was over
        assert ("GET", f"/v1/fine_tuning/jobs/{job.id}") in fake_openai.api.requests[cancel:]
        step, metrics = reporter.calls[-1]
        assert metrics == {
            "cost_usd": job.trained_tokens * PRICE,
            "trained_tokens": job.trained_tokens,
        }
        assert reporter.tags["openai.final_status"] == status
        if status == "succeeded":  # logged where the job ended, after the step it was pruned at
            assert job.trained_tokens == 3 * job.file_tokens and step == job.total_steps
        else:
            assert 0 < job.trained_tokens < 3 * job.file_tokens

    def test_a_cancel_that_never_lands_counts_the_whole_job(
        self, openai_cfg, fake_openai, tmp_path
    ):
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1, cancel_s=10**9)
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path, "backend.cancel_wait_s=0.05")
        reporter = RecordingReporter("eval/loss", prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "running"  # still, after backend.cancel_wait_s
        whole = 3 * spec.prepared.file_tokens * PRICE  # it may run to its end: counted so
        assert reporter.calls[-1][1] == {"cost_usd": pytest.approx(whole)}
        assert reporter.tags["openai.cost_source"].startswith("estimate: the job was still running")

    def test_ctrl_c_records_the_bill_and_still_stops(self, openai_cfg, fake_openai, tmp_path):
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1)
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)

        class CtrlC(RecordingReporter):  # the user presses Ctrl-C at the first evaluation
            def report(self, step, metrics):
                super().report(step, metrics)
                if "eval/loss" in metrics:
                    raise KeyboardInterrupt

        reporter = CtrlC("eval/loss")
        with pytest.raises(KeyboardInterrupt):
            backend.run(spec, reporter)
        (job,) = fake_openai.api.jobs.values()
        assert job.status == "cancelled"
        assert reporter.calls[-1][1]["cost_usd"] == job.trained_tokens * PRICE

    def test_abandoned_job_returns_what_it_billed(self, openai_cfg, fake_openai, tmp_path):
        fake_openai.api.clock = RequestClock()
        fake_openai.api.timing = Timing(validate_s=1, queue_s=1, step_s=1)
        backend, spec = self.backend_and_spec(openai_cfg, tmp_path)
        job, _ = backend._find_or_create(spec.config, spec.prepared, 0, "dead-trial")
        for _ in range(10):  # the dead process's job trains on
            backend.client.fine_tuning.jobs.retrieve(job.id)
        assert backend.abandon("dead-trial") == fake_openai.api.jobs[job.id].trained_tokens * PRICE
        assert fake_openai.api.jobs[job.id].status == "cancelled"
        assert fake_openai.api.jobs[job.id].trained_tokens > 0
        assert backend.abandon("no-such-trial") is None


def test_spend_counts_a_crashed_trial_until_its_retry_takes_over():
    from harness.study import study_spend

    study = optuna.create_study()
    crashed = study.ask()
    crashed.set_user_attr("cost_usd", 1.0)
    study.tell(crashed, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={"harness_retry_of": crashed.number})
    assert study_spend(study) == 1.0  # the retry waits: the crashed job's cost stands
    retry = study.ask()
    retry.set_user_attr("cost_estimate_usd", 1.5)
    assert study_spend(study) == 1.5  # the retry follows the same job: counted once
    retry.set_user_attr("cost_usd", 1.4)
    study.tell(retry, 0.5)
    assert study_spend(study) == pytest.approx(1.4)


class TestFakeServer:
    """The fake's curves follow the hyperparameters, so a search over it means something."""

    def final_loss(self, fake, epochs, multiplier, batch=8) -> float:
        from harness.fake_openai import Job, valid_loss

        job = Job(
            "ftjob-x",
            1,
            0,
            0.0,
            "m",
            "file-x",
            None,
            epochs,
            batch,
            multiplier,
            0,
            None,
            {},
            [],
            0,
            steps_per_epoch=20,
        )
        return valid_loss(job, job.total_steps)

    def test_curves_have_an_optimum_and_punish_extremes(self, fake_openai):
        best = self.final_loss(fake_openai, 3, 2.0)
        assert self.final_loss(fake_openai, 3, 0.05) > best + 1.0  # too small: under-fits
        assert self.final_loss(fake_openai, 3, 9.0) > best + 1.0  # too large: diverges
        assert self.final_loss(fake_openai, 1, 2.0) > best + 0.1  # too few epochs
        assert self.final_loss(fake_openai, 8, 2.0) > best + 0.3  # too many: over-fits


@pytest.mark.slow  # kill -9 and secrets: sweeps in processes of their own
class TestCrashAndSecrets:
    def sweep_command(self, fake, runs: Path, *extra: str) -> list[str]:
        """The words of a hosted `harness sweep` on ``fake``, after `harness`."""
        return [
            "sweep", "study=tickets_openai",
            f"backend.base_url={fake.base_url}", f"paths.runs_dir={runs}",
            *OPENAI_TEST_SETTINGS, *extra,
        ]  # fmt: skip

    def test_resumed_study_reattaches_to_its_running_job(self, fake_openai, runs, make_cfg):
        fake_openai.api.timing.step_s = 0.02  # ~3 s per job: time to kill the sweep mid-job
        command = self.sweep_command(fake_openai, runs, *QUICK, "sweep.n_trials=2", "pruner=none")
        process = start_cli(*command)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = list(fake_openai.api.jobs.values())
                if jobs and jobs[0].steps_done > 5:
                    break
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.05)
            else:
                pytest.fail("no job started running")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        (crashed_job,) = fake_openai.api.jobs.values()
        assert crashed_job.status == "running"  # kill -9 cancels nothing: the job runs on

        fake_openai.api.timing.step_s = 0.001
        result = run_cli(*command, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(fake_openai.api.jobs) == 2  # the crashed trial's job + the second trial's
        cfg = make_cfg("study=tickets_openai")
        study = load_study(cfg)
        states = [t.state.name for t in study.trials]
        assert states == ["FAIL", "COMPLETE", "COMPLETE"]
        retry = study.trials[1]
        assert retry.user_attrs["harness_retry_of"] == 0
        assert retry.params == study.trials[0].params
        assert (
            retry.user_attrs["harness_trial_key"] == study.trials[0].user_attrs["harness_trial_key"]
        )
        _, mlruns = mlflow_runs(cfg)
        assert mlruns["trial-0000"].info.status == "FAILED"  # never left RUNNING
        assert mlruns["trial-0001"].data.tags["openai.job_id"] == crashed_job.id
        assert mlruns["trial-0001"].data.tags["openai.reattached"] == "true"
        assert crashed_job.status == "succeeded"

    @pytest.mark.parametrize("provider", ["openai", "azure"])
    def test_api_key_appears_in_no_record_or_output(self, fake_openai, runs, make_cfg, provider):
        secret = "sk-test-DoNotLeak-7f3a9c1e5b"
        fake_openai.api.api_key = secret  # the fake refuses any other key: it was really sent
        fake_openai.api.faults.fail_jobs = frozenset({2})  # error paths print too
        azure = provider == "azure"
        endpoint = fake_openai.base_url.removesuffix("/v1")
        where = ["backend=azure_openai", f"backend.azure_endpoint={endpoint}"] if azure else []
        env = cli_env(**{"AZURE_OPENAI_API_KEY" if azure else "OPENAI_API_KEY": secret})
        command = self.sweep_command(fake_openai, runs, *QUICK, *where)
        result = run_cli(*command, env=env, timeout=240)
        assert result.returncode == 1, result.stdout + result.stderr  # a failed trial: short
        assert "COMPLETE" in result.stdout and "FAIL" in result.stdout
        # Azure takes its key in the api-key header, OpenAI in Authorization: Bearer
        assert set(fake_openai.api.key_headers) == {"api-key" if azure else "authorization"}
        printed = run_cli(*command, "--cfg", "job", env=env, timeout=60)
        validated = run_cli(
            "validate", "study=tickets_openai", *where, runs=runs, env=env, timeout=60
        )
        assert validated.returncode == 0, validated.stderr
        assert "cost per trial shape" in validated.stdout and "budget $2.00" in validated.stdout
        for output in (result, printed, validated):
            assert secret not in output.stdout + output.stderr
        stored = [p for p in runs.rglob("*") if p.is_file()]
        assert any(p.name == "mlflow.db" for p in stored) and len(stored) > 10
        for path in stored:  # the MLflow store, its artifacts, the Optuna journal, caches
            assert secret.encode() not in path.read_bytes(), path
        cfg = make_cfg("study=tickets_openai", *where)
        _, mlruns = mlflow_runs(cfg)
        for run in mlruns.values():
            values = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(secret in v for v in values)


def test_keys_quoted_in_provider_errors_are_redacted():
    from harness.secrets import redact_text

    message = "Incorrect API key provided: sk-proj-****abcd. See docs"
    assert redact_text(message) == "Incorrect API key provided: sk-***. See docs"
    assert redact_text("task-sk-free text, disk-full") == "task-sk-free text, disk-full"


def test_an_abandoned_jobs_bill_replaces_its_trials_estimate_in_the_spend():
    """A dead trial's job cancelled by a later run: what it billed (a study attr, as the
    failed trial takes no new attrs) is what the budget counts."""
    import optuna

    from harness.study import billed_key, study_spend

    study = optuna.create_study()
    for cost in (0.25, 0.9):
        trial = study.ask()
        trial.set_user_attr("cost_usd", cost)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert study_spend(study) == pytest.approx(1.15)
    study.set_user_attr(billed_key(1), 0.4)
    assert study_spend(study) == pytest.approx(0.65)


def test_an_objective_the_hosted_backend_never_reports_is_refused_before_any_job(openai_cfg):
    """The hosted backend's evaluations report its own metrics, not the task's usual ones: an
    objective outside them would fail every paid trial at its end."""
    cfg = openai_cfg("sweep.objectives={eval/accuracy: maximize, cost_usd: minimize}")
    with pytest.raises(ConfigError, match="'eval/accuracy' is not a metric trials report"):
        plan_study(cfg)


@pytest.mark.parametrize("key", ["example_token_limits", "prices_per_1m_training_tokens"])
def test_null_for_a_mapping_setting_is_refused_naming_the_key(openai_cfg, key):
    with pytest.raises(ConfigError, match=f"^backend.{key} must be a mapping of model names"):
        make_backend(openai_cfg(f"backend.{key}=null"))
