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
