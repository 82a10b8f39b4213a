"""The Together fake through the real ``together`` SDK over HTTP: the upload flow, model limits,
price estimates, jobs (SFT and DPO) from pending to completed with their events, metrics and
checkpoints, cancels that land or come too late, chat answers of the trained models, and every
injected fault (5xx/429, failed jobs, dropped creates, refusals, pre-empted jobs)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import together
from together.lib.resources.files import FileAlreadyExistsError

from harness.fake_openai import RequestClock
from harness.fake_together import (
    NANODOLLARS_PER_DOLLAR,
    FakeTogether,
    FakeTogetherServer,
    TogetherFaults,
    TogetherTiming,
    _api_from_options,
    _serve_options,
    parse_training_file,
)

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
LABELS = ["billing", "shipping", "refund", "account"]
WORDS = {
    "billing": "invoice charge card payment",
    "shipping": "package delivery courier late",
    "refund": "money back return refund",
    "account": "password login email reset",
}
TERMINAL = ("completed", "error", "cancelled")


def _rows(count: int, offset: int = 0) -> list[tuple[str, str]]:
    rows = []
    for i in range(offset, offset + count):
        label = LABELS[i % 4]
        words = WORDS[label].split()
        words = words[i % 4 :] + words[: i % 4]
        rows.append((f"{' '.join(words)} ticket {i}", label))
    return rows


def write_sft(path: Path, count: int = 40, offset: int = 0) -> Path:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "Classify the ticket."},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": label},
            ]
        }
        for prompt, label in _rows(count, offset)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_dpo(path: Path, count: int = 40) -> Path:
    lines = [
        {
            "input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": label}],
            "non_preferred_output": [
                {"role": "assistant", "content": f"not {label}"},
            ],
        }
        for prompt, label in _rows(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


FAST = dict(validate_s=0.02, queue_s=0.02, step_s=0.01, restart_s=0.05)


@contextmanager
def serve(tick: float = 0.01, faults: TogetherFaults | None = None, **timing) -> Iterator:
    """A fake whose clock moves ``tick`` seconds a job read: the same states on any machine."""
    api = FakeTogether(TogetherTiming(**(FAST | timing)), faults, clock=RequestClock(tick))
    with FakeTogetherServer(api) as server:
        yield server


def client(server: FakeTogetherServer, retries: int = 2) -> together.Together:
    return together.Together(api_key="x", base_url=server.base_url, max_retries=retries)


def upload(sdk: together.Together, path: Path) -> str:
    return sdk.files.upload(file=path, purpose="fine-tune", check=True).id


def wait(sdk: together.Together, job_id: str, polls: int = 2000) -> list[str]:
    """Every status a job shows, polled until it ends (the fake's clock moves per poll)."""
    seen: list[str] = []
    for _ in range(polls):
        status = sdk.fine_tuning.retrieve(job_id).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in TERMINAL:
            return seen
    raise AssertionError(f"job {job_id} still {seen[-1]} after {polls} polls")


def create(sdk: together.Together, training: str, **settings):
    defaults = dict(model=MODEL, n_epochs=3, batch_size=8, learning_rate=1e-4, lora=True)
    return sdk.fine_tuning.create(training_file=training, **(defaults | settings))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_sft(tmp_path / "train.jsonl"),
        "valid": write_sft(tmp_path / "valid.jsonl", 8, offset=100),
        "dpo": write_dpo(tmp_path / "dpo.jsonl"),
    }


class TestFiles:
    def test_upload_goes_by_a_presigned_put_then_preprocess(self, fake_together, files):
        sdk = client(fake_together)
        uploaded = sdk.files.upload(file=files["train"], purpose="fine-tune", check=True)
        assert uploaded.id.startswith("file-")
        assert uploaded.bytes == files["train"].stat().st_size
        assert uploaded.processing_status == "COMPLETED"
        paths = [(m, p.split("?")[0]) for m, p in fake_together.api.requests]
        assert paths == [
            ("POST", "/v1/files"),
            ("PUT", f"/upload/{uploaded.id}"),
            ("POST", f"/v1/files/{uploaded.id}/preprocess"),
        ]
        listed = sdk.files.list().data
        assert [f.id for f in listed] == [uploaded.id]
        assert listed[0].file_type == "jsonl" and listed[0].purpose == "fine-tune"
        assert listed[0].validation_report.valid and listed[0].validation_report.nlines == 40
        assert listed[0].validation_report.dataset_format == "CONVERSATION"
        assert sdk.files.retrieve(uploaded.id).filename == "train.jsonl"
        assert sdk.files.content(uploaded.id).read() == files["train"].read_bytes()
        assert sdk.files.delete(uploaded.id).deleted is True
        with pytest.raises(together.NotFoundError):
            sdk.files.retrieve(uploaded.id)

    def test_the_same_bytes_again_are_answered_409_with_the_first_file(self, fake_together, files):
        sdk = client(fake_together)
        first = upload(sdk, files["train"])
        assert upload(sdk, files["train"]) == first  # the SDK retrieves the existing file
        assert 409 in fake_together.api.responses
        with pytest.raises(FileAlreadyExistsError) as raised:
            sdk.files.upload(file=files["train"], purpose="fine-tune", raise_if_already_exists=True)
        assert raised.value.file_id == first
        assert len(sdk.files.list().data) == 1

    def test_an_invalid_file_is_flagged_and_refused_for_jobs(self, fake_together, tmp_path):
        sdk = client(fake_together)
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
        stored = sdk.files.upload(file=bad, purpose="fine-tune", check=False)
        assert stored.processing_status == "INVALID_FORMAT"
        report = sdk.files.retrieve(stored.id).validation_report
        assert not report.valid and "assistant" in report.error
        estimate = sdk.fine_tuning.estimate_price(training_file=stored.id, model=MODEL)
        assert estimate.estimation_available is False
        assert estimate.unavailable_reason == "train_file_invalid"
        with pytest.raises(together.BadRequestError, match="invalid"):
            create(sdk, stored.id)
        assert fake_together.api.jobs == {}


class TestSftJob:
    def test_a_job_goes_from_pending_to_completed_with_all_it_reports(self, files):
        with serve(compress_s=0.03, upload_s=0.03) as server:
            sdk = client(server)
            train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
            job = create(
                sdk, train, validation_file=valid, n_evals=4, n_checkpoints=3,
                suffix="harness-t0001", lora_r=16, warmup_ratio=0.1,
            )  # fmt: skip
            assert job.status == "pending" and job.suffix == "harness-t0001"
            asked = [(m, p) for m, p in server.api.requests if "fine-tunes" in p]
            assert asked == [
                ("GET", "/v1/fine-tunes/models/limits"),
                ("POST", "/v1/fine-tunes/estimate-price"),
                ("POST", "/v1/fine-tunes"),
            ]
            seen = wait(sdk, job.id)
            assert seen == ["pending", "queued", "running", "compressing", "uploading", "completed"]
            done = sdk.fine_tuning.retrieve(job.id)
            stored = server.api.jobs[job.id]
            assert stored.status == "completed" and stored.number == 1
        steps = math.ceil(40 / 8) * 3
        assert done.total_steps == done.steps_completed == steps
        assert done.epochs_completed == 3 and done.evals_completed == 4
        assert (
            done.x_model_output_name
            == f"harness-fake/Meta-Llama-3.1-8B-Instruct-Reference-harness-t0001-{job.id[3:11]}"
        )
        train_tokens = parse_training_file(files["train"].read_bytes()).tokens
        valid_tokens = parse_training_file(files["valid"].read_bytes()).tokens
        assert done.token_count == 3 * train_tokens + 4 * valid_tokens
        assert done.total_price == round(done.token_count * 0.48e-6 * NANODOLLARS_PER_DOLLAR)
        assert done.learning_rate == 1e-4 and done.batch_size == 8 and done.n_epochs == 3
        assert done.training_type.type == "Lora" and done.training_type.lora_r == 16
        assert done.training_type.lora_alpha == 32
        assert done.training_method.method == "sft" and done.warmup_ratio == 0.1
        assert done.lr_scheduler.lr_scheduler_type == "cosine"
        kinds = [e.type for e in done.events]
        assert kinds[:3] == ["job_pending", "job_start", "training_start"]
        assert kinds.count("epoch_complete") == 3 and kinds.count("checkpoint_save") == 2
        assert kinds[-6:] == [
            "training_complete", "model_compressing", "model_compression_complete",
            "model_uploading", "model_upload_complete", "job_complete",
        ]  # fmt: skip
        assert [e.type for e in sdk.fine_tuning.list_events(job.id).data] == kinds

    def test_metrics_have_a_row_per_step_and_evenly_spaced_evaluations(self, files):
        with serve() as server:
            sdk = client(server)
            train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
            job = create(sdk, train, validation_file=valid, n_evals=3, n_epochs=3)
            wait(sdk, job.id)
            rows = sdk.fine_tuning.list_metrics(job.id).metrics
            sampled = sdk.fine_tuning.list_metrics(job.id, resolution=5, global_step_from=2)
            checkpoints = sdk.fine_tuning.list_checkpoints(job.id).data
        train_rows = [r for r in rows if "train/loss" in r]
        evals = [r for r in rows if "eval/loss" in r]
        assert [r["train/global_step"] for r in train_rows] == list(range(1, 16))
        assert [r["train/global_step"] for r in evals] == [5, 10, 15]
        assert evals[0]["eval/loss"] > evals[1]["eval/loss"] > evals[2]["eval/loss"]
        assert train_rows[0]["train/loss"] > 1.5 > train_rows[-1]["train/loss"]
        assert train_rows[0]["train/learning_rate"] == 1e-4  # no warmup, then a cosine decay
        assert train_rows[-1]["train/learning_rate"] < 2e-6
        assert all(set(r) == {"train/global_step", "train/epoch", "eval/loss"} for r in evals)
        kept = sampled.metrics
        assert len([r for r in kept if "train/loss" in r]) == 5
        assert min(r["train/global_step"] for r in kept) == 2
        assert len([r for r in kept if "eval/loss" in r]) == 3  # evaluations are all kept
        assert [(c.checkpoint_type, c.step) for c in checkpoints] == [("Final", 15)]

    def test_the_list_shows_every_job_with_its_suffix(self, fake_together, files):
        sdk = client(fake_together)
        train = upload(sdk, files["train"])
        made = [create(sdk, train, suffix=f"trial-{n}").id for n in range(3)]
        listed = sdk.fine_tuning.list().data
        assert [(j.id, j.suffix) for j in listed] == [(i, f"trial-{n}") for n, i in enumerate(made)]
        assert {j.model for j in listed} == {MODEL}
        assert [fake_together.api.jobs[i].number for i in made] == [1, 2, 3]


class TestCancel:
    def test_a_cancel_is_requested_then_lands_billing_the_steps_trained(self, files):
        with serve(cancel_s=0.05) as server:
            sdk = client(server)
            train = upload(sdk, files["train"])
            job = create(sdk, train, n_epochs=10)
            while sdk.fine_tuning.retrieve(job.id).steps_completed < 3:
                pass
            answered = sdk.fine_tuning.cancel(job.id)
            assert answered.status == "cancel_requested"
            seen = wait(sdk, job.id)
            done = sdk.fine_tuning.retrieve(job.id)
        assert seen == ["cancel_requested", "cancelled"]
        assert 3 <= done.steps_completed < done.total_steps == 50
        per_step = parse_training_file(files["train"].read_bytes()).tokens / 5
        assert done.token_count == round(per_step * done.steps_completed)
        assert done.total_price == round(done.token_count * 0.48e-6 * NANODOLLARS_PER_DOLLAR)
        assert done.x_model_output_name is None
        kinds = [e.type for e in done.events]
        assert "cancel_requested" in kinds and kinds[-1] == "job_stopped"

    def test_a_pending_job_cancelled_costs_nothing(self, files):
        with serve(validate_s=10.0) as server:
            sdk = client(server)
            job = create(sdk, upload(sdk, files["train"]))
            sdk.fine_tuning.cancel(job.id)
            assert wait(sdk, job.id) == ["cancelled"]
            done = sdk.fine_tuning.retrieve(job.id)
        assert (done.steps_completed, done.token_count, done.total_price) == (0, 0, 0)

    def test_a_finished_jobs_cancel_is_refused(self, fake_together, files):
        sdk = client(fake_together)
        job = create(sdk, upload(sdk, files["train"]))
        fake_together.api._progress(fake_together.api.jobs[job.id], math.inf)
        with pytest.raises(together.BadRequestError, match="already ended"):
            sdk.fine_tuning.cancel(job.id)
        assert sdk.fine_tuning.retrieve(job.id).status == "completed"

    def test_a_cancel_arriving_after_the_end_is_refused_and_billed_in_full(self, files):
        with serve(faults=TogetherFaults(finish_before_cancel=1)) as server:
            sdk = client(server)
            job = create(sdk, upload(sdk, files["train"]))
            with pytest.raises(together.BadRequestError, match="completed"):
                sdk.fine_tuning.cancel(job.id)
            done = sdk.fine_tuning.retrieve(job.id)
        assert done.status == "completed" and done.steps_completed == done.total_steps
        assert done.token_count == 3 * parse_training_file(files["train"].read_bytes()).tokens


class TestChat:
    def test_a_trained_model_answers_as_well_as_its_loss_says(self, files):
        with serve() as server:
            sdk = client(server)
            train = upload(sdk, files["train"])
            good = create(sdk, train, learning_rate=1e-4, suffix="good")
            poor = create(sdk, train, learning_rate=2e-6, n_epochs=1, suffix="poor")
            for job in (good, poor):
                assert wait(sdk, job.id)[-1] == "completed"
            models = [sdk.fine_tuning.retrieve(j.id).x_model_output_name for j in (good, poor)]
            tests = _rows(40, offset=200)
            scores = []
            for model in models:
                right = 0
                for prompt, label in tests:
                    answer = sdk.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], temperature=0
                    )
                    right += answer.choices[0].message.content == label
                scores.append(right / len(tests))
            base = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}]
            )
            with pytest.raises(together.NotFoundError, match="Unable to access model"):
                sdk.chat.completions.create(
                    model="harness-fake/nothing", messages=[{"role": "user", "content": "hi"}]
                )
            assert server.api.chat_requests[0]["model"] == models[0]
        assert scores[0] >= 0.8 and scores[1] <= 0.5, scores
        assert base.choices[0].message.content not in LABELS
        assert base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens


class TestDpo:
    def test_a_dpo_job_trains_on_preferences_and_answers_the_preferred(self, files):
        with serve() as server:
            sdk = client(server)
            dpo = upload(sdk, files["dpo"])
            assert sdk.files.list().data[0].validation_report.dataset_format == "PREFERENCE"
            job = create(sdk, dpo, training_method="dpo", dpo_beta=0.2, batch_size=8)
            assert wait(sdk, job.id)[-1] == "completed"
            done = sdk.fine_tuning.retrieve(job.id)
            rows = sdk.fine_tuning.list_metrics(job.id).metrics
            answers = [
                sdk.chat.completions.create(
                    model=done.x_model_output_name,
                    messages=[{"role": "user", "content": prompt}],
                )
                .choices[0]
                .message.content
                for prompt, _ in _rows(40, offset=300)
            ]
        assert done.training_method.method == "dpo" and done.training_method.dpo_beta == 0.2
        tokens = parse_training_file(files["dpo"].read_bytes()).tokens
        assert done.token_count == 3 * tokens
        assert done.total_price == round(3 * tokens * 1.20e-6 * NANODOLLARS_PER_DOLLAR)
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert math.log(2) > losses[0] > losses[-1] > 0  # DPO's loss starts below ln 2
        expected = [label for _, label in _rows(40, offset=300)]
        preferred = sum(a == e for a, e in zip(answers, expected, strict=True))
        rejected = sum(a == f"not {e}" for a, e in zip(answers, expected, strict=True))
        assert preferred + rejected == 40 and preferred >= 32

    def test_the_method_and_the_file_format_must_agree(self, fake_together, files):
        sdk = client(fake_together)
        sft, dpo = upload(sdk, files["train"]), upload(sdk, files["dpo"])
        with pytest.raises(together.BadRequestError, match="preference dataset"):
            create(sdk, sft, training_method="dpo")
        with pytest.raises(together.BadRequestError, match="training_method dpo"):
            create(sdk, dpo)
        assert fake_together.api.jobs == {}


def final_eval(sdk: together.Together, training: str, valid: str, **settings) -> float:
    job = create(sdk, training, validation_file=valid, n_evals=1, **settings)
    assert wait(sdk, job.id)[-1] == "completed"
    return sdk.fine_tuning.list_metrics(job.id).metrics[-1]["eval/loss"]


class TestHyperparameters:
    def test_losses_follow_the_learning_rate_rank_and_epochs(self, files):
        with serve(step_s=0.001, tick=0.05) as server:
            sdk = client(server)
            train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
            lora = {
                lr: final_eval(sdk, train, valid, learning_rate=lr) for lr in (2e-6, 1e-4, 3e-3)
            }
            full = {
                lr: final_eval(sdk, train, valid, learning_rate=lr, lora=False)
                for lr in (1e-5, 3e-4)
            }
            ranks = {r: final_eval(sdk, train, valid, lora_r=r) for r in (4, 16, 32)}
            epochs = {n: final_eval(sdk, train, valid, n_epochs=n) for n in (1, 3, 12)}
            again = final_eval(sdk, train, valid, learning_rate=1e-4)
        assert lora[1e-4] < lora[2e-6] and lora[1e-4] < lora[3e-3]  # under-fit, diverged
        assert full[1e-5] < full[3e-4]  # full fine-tuning's optimum is ten times lower
        assert abs(full[1e-5] - lora[1e-4]) < 0.1
        assert ranks[32] < ranks[16] < ranks[4]
        assert epochs[3] < epochs[1] and epochs[3] < epochs[12]  # under- and over-fitting
        assert again == lora[1e-4]  # the same data, settings and seed: the same curve

    def test_limits_are_served_and_requests_outside_them_answered_400(self, fake_together, files):
        sdk = client(fake_together)
        limits = sdk.fine_tuning.model_limits(model_name=MODEL)
        assert limits.max_num_epochs == 20 and limits.max_learning_rate == 1.0
        assert limits.lora_training.max_rank == 64 and limits.full_training.min_batch_size == 8
        train = upload(sdk, files["train"])
        cases = {
            "n_epochs": dict(n_epochs=21),
            "learning_rate": dict(learning_rate=2.0),
            "lora_r": dict(lora_r=128),
            "suffix": dict(suffix="x" * 41),
            "n_evals": dict(n_evals=2),  # without a validation file
        }
        for setting, asked in cases.items():
            with pytest.raises(together.BadRequestError) as raised:
                create(sdk, train, **asked)
            assert raised.value.body["error"]["param"] == setting, setting
        body = {"training_file": train, "model": MODEL, "batch_size": 512, "n_epochs": 1}
        with pytest.raises(together.BadRequestError, match="batch_size must be between 8 and 128"):
            sdk.post("/v1/fine-tunes", body=body, cast_to=httpx.Response)
        big = "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference"
        body = {"training_file": train, "model": big, "training_type": {"type": "Full"}}
        with pytest.raises(together.BadRequestError, match="Full fine-tuning is not supported"):
            sdk.post("/v1/fine-tunes", body=body, cast_to=httpx.Response)
        with pytest.raises(together.NotFoundError, match="not available for fine-tuning"):
            create(sdk, train, model="gpt2")
        assert fake_together.api.jobs == {}

    def test_the_estimate_counts_epochs_and_evaluations(self, fake_together, files):
        sdk = client(fake_together)
        train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
        estimate = sdk.fine_tuning.estimate_price(
            training_file=train, validation_file=valid, model=MODEL, n_epochs=4, n_evals=2,
            training_type={"type": "Full"}, training_method={"method": "sft"},
        )  # fmt: skip
        train_tokens = parse_training_file(files["train"].read_bytes()).tokens
        valid_tokens = parse_training_file(files["valid"].read_bytes()).tokens
        assert estimate.estimated_train_token_count == 4 * train_tokens
        assert estimate.estimated_eval_token_count == 2 * valid_tokens
        total = (4 * train_tokens + 2 * valid_tokens) * 0.54e-6
        assert estimate.estimated_total_price == pytest.approx(total)
        assert estimate.allowed_to_proceed is True and estimate.user_limit == 1000.0


class TestFaults:
    def test_5xx_and_429_answers_are_retried_by_the_sdk(self, files):
        faults = TogetherFaults(error_rate=0.15, rate_limit_rate=0.15, seed=3)
        with serve(faults=faults) as server:
            sdk = client(server, retries=8)
            job = create(sdk, upload(sdk, files["train"]))
            assert wait(sdk, job.id)[-1] == "completed"
            answered = server.api.responses
        assert 500 in answered and 429 in answered
        assert len(server.api.jobs) >= 1

    def test_a_failed_job_ends_in_error_with_its_message_and_no_charge(self, files):
        with serve(faults=TogetherFaults(fail_jobs=frozenset({2}))) as server:
            sdk = client(server)
            train = upload(sdk, files["train"])
            ok, failing = create(sdk, train), create(sdk, train)
            assert wait(sdk, failing.id)[-1] == "error"
            assert wait(sdk, ok.id)[-1] == "completed"
            done = sdk.fine_tuning.retrieve(failing.id)
        assert done.steps_completed == done.total_steps // 2 == 7
        assert done.total_price == 0 and done.x_model_output_name is None
        errors = [e for e in done.events if e.type == "job_error"]
        assert len(errors) == 1 and errors[0].level == "error"
        assert "internal error" in errors[0].message
        assert done.events[-1].type == "refund"

    def test_a_dropped_create_leaves_a_job_the_list_finds_by_suffix(self, files):
        with serve(faults=TogetherFaults(drop_create_responses=1)) as server:
            sdk = client(server, retries=0)
            train = upload(sdk, files["train"])
            with pytest.raises(together.APIConnectionError):
                create(sdk, train, suffix="harness-trial-0007")
            listed = sdk.fine_tuning.list().data
            assert [j.suffix for j in listed] == ["harness-trial-0007"]
            assert wait(sdk, listed[0].id)[-1] == "completed"
            again = create(sdk, train, suffix="harness-trial-0008")  # the next create answers
        assert again.status == "pending" and len(server.api.jobs) == 2

    @pytest.mark.parametrize(
        ("status", "error", "words"),
        [
            (403, together.PermissionDeniedError, "does not have access to fine-tuning"),
            (402, together.APIStatusError, "Insufficient credits"),
        ],
    )
    def test_refused_creates_make_no_job(self, files, status, error, words):
        faults = TogetherFaults(refuse_creates=2, refusal_status=status)
        with serve(faults=faults) as server:
            sdk = client(server)
            train = upload(sdk, files["train"])
            for _ in range(2):
                with pytest.raises(error, match=words) as raised:
                    create(sdk, train)
                assert raised.value.status_code == status
            assert server.api.jobs == {}
            assert create(sdk, train).status == "pending"  # the refusal was for two creates

    def test_a_preempted_job_goes_back_to_queued_then_runs_on(self, files):
        with serve(faults=TogetherFaults(restart_jobs=frozenset({1})), restart_s=0.2) as server:
            sdk = client(server)
            job = create(sdk, upload(sdk, files["train"]))
            seen = wait(sdk, job.id)
            done = sdk.fine_tuning.retrieve(job.id)
            steps = [r["train/global_step"] for r in sdk.fine_tuning.list_metrics(job.id).metrics]
        assert seen == ["pending", "queued", "running", "queued", "running", "completed"]
        restarts = [e for e in done.events if e.type == "job_restarted"]
        assert len(restarts) == 1 and restarts[0].step == 7
        assert steps == list(range(1, 16))  # it ran on from where it stopped
        assert done.token_count == 3 * parse_training_file(files["train"].read_bytes()).tokens


class TestServing:
    def test_a_base_url_ending_in_v1_is_answered_with_what_to_do(self, fake_together):
        sdk = together.Together(api_key="x", base_url=fake_together.base_url + "/v1")
        with pytest.raises(together.NotFoundError, match="base_url is the server's root"):
            sdk.fine_tuning.list()
        assert fake_together.base_url == f"http://127.0.0.1:{fake_together.port}"

    def test_only_the_configured_key_is_accepted(self, files):
        api = FakeTogether(TogetherTiming(**FAST), api_key="right")
        with FakeTogetherServer(api) as server:
            with pytest.raises(together.AuthenticationError):
                client(server).fine_tuning.list()
            sdk = together.Together(api_key="right", base_url=server.base_url)
            assert sdk.fine_tuning.list().data == []
            assert upload(sdk, files["train"]).startswith("file-")  # the PUT needs no key

    def test_the_command_line_sets_timings_and_faults(self):
        options = _serve_options(
            ["--port", "9999", "--step-seconds", "0.2", "--restart-jobs", "2,5",
             "--refuse-jobs", "3", "--refusal-status", "402", "--drop-creates", "1"]
        )  # fmt: skip
        api = _api_from_options(options)
        assert options.port == 9999 and api.timing.step_s == 0.2
        assert api.faults.restart_jobs == frozenset({2, 5})
        assert (api.faults.refuse_creates, api.faults.refusal_status) == (3, 402)
        assert api.faults.drop_create_responses == 1


class TestEarlyStopping:
    def test_training_stops_when_eval_loss_stops_improving_and_keeps_the_best(self, files):
        with serve(step_s=0.001, tick=0.05) as server:
            sdk = client(server)
            train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
            job = create(
                sdk, train, validation_file=valid, n_epochs=12, n_evals=12,
                early_stopping_enabled=True, early_stopping_patience=2,
            )  # fmt: skip
            assert wait(sdk, job.id)[-1] == "completed"
            done = sdk.fine_tuning.retrieve(job.id)
            rows = sdk.fine_tuning.list_metrics(job.id).metrics
            final = sdk.fine_tuning.list_checkpoints(job.id).data[0]
        evals = [(r["train/global_step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        best_step, best = min(evals, key=lambda e: e[1])
        assert done.early_stopped is True
        assert (done.early_stopping_best_step, done.early_stopping_best_metric) == (best_step, best)
        assert done.steps_completed == evals[-1][0] == best_step + 2 * 5 < done.total_steps
        assert all(loss >= best for _, loss in evals[-2:])  # two evaluations without improvement
        assert (final.checkpoint_type, final.step) == ("Final", best_step)
        tokens = parse_training_file(files["train"].read_bytes()).tokens
        valid_tokens = parse_training_file(files["valid"].read_bytes()).tokens
        assert (
            done.token_count == round(tokens * done.steps_completed / 5) + len(evals) * valid_tokens
        )
        stopped = [e for e in done.events if e.type == "early_stopped"]
        assert len(stopped) == 1 and stopped[0].early_stopping_best_step == best_step

    def test_early_stopping_needs_enough_evaluations(self, fake_together, files):
        sdk = client(fake_together)
        train, valid = upload(sdk, files["train"]), upload(sdk, files["valid"])
        body = {
            "training_file": train, "validation_file": valid, "model": MODEL, "n_evals": 2,
            "early_stopping_enabled": True,
        }  # fmt: skip
        with pytest.raises(together.BadRequestError, match="patience \\+ warmup_evals \\+ 1"):
            sdk.post("/v1/fine-tunes", body=body, cast_to=httpx.Response)


def test_a_job_can_start_from_a_finished_jobs_checkpoint(fake_together, files):
    sdk = client(fake_together)
    train = upload(sdk, files["train"])
    parent = create(sdk, train, suffix="parent")
    fake_together.api._progress(fake_together.api.jobs[parent.id], math.inf)
    child = sdk.fine_tuning.create(training_file=train, from_checkpoint=parent.id, n_epochs=1)
    shown = sdk.fine_tuning.retrieve(child.id)
    assert shown.model == MODEL and shown.from_checkpoint == parent.id
    with pytest.raises(together.NotFoundError, match="not available for fine-tuning"):
        sdk.fine_tuning.create(training_file=train, from_checkpoint="ft-nothing", n_epochs=1)
