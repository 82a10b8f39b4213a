"""A loopback fake of Together's fine-tuning API, for tests and free dry runs.

The real ``together`` SDK (3.x) talks to it over HTTP: ``together.Together(api_key=...,
base_url=server.base_url)``. The SDK's paths carry ``/v1`` themselves (``/v1/fine-tunes``), so the
base URL is the server's root, ``http://127.0.0.1:PORT``, as the SDK's default
``https://api.together.ai`` is; a base URL ending in ``/v1`` doubles it and is answered 404 with a
message saying so. It keeps state like the service: files (the SDK's upload: POST /v1/files
answered 302 to a presigned URL, the PUT of the bytes there, POST /v1/files/{id}/preprocess;
a second upload of the same bytes answered 409 with the first one's id), model limits, price
estimates, fine-tuning jobs (create, list, retrieve, cancel, events, checkpoints, metrics) and
chat completions for the models its jobs produce.

Jobs move through pending -> queued -> running -> compressing -> uploading -> completed on the
server's clock (``TogetherTiming``; ``RequestClock`` makes it move with the requests made). The
job simulation is the OpenAI fake's (``harness.fake_openai``): the same loss curves, mapped from
Together's absolute learning rate (the curve's optimum sits near 1e-4 for LoRA and 1e-5 for full
fine-tuning), with LoRA rank and warmup moving them a little; the same nearest-neighbour chat
answers, wrong as often as the final validation loss says. Evaluations (``n_evals``) are evenly
spaced ``eval/loss`` rows in the metrics; a cancelled job reports the tokens and price of the
steps it trained. Server-side early stopping (``early_stopping_enabled``) ends training once the
evaluations stop improving and keeps the best one's model. DPO jobs train on preference rows and
their models answer with the preferred answer, or as often as their loss says, the
non-preferred one. ``total_price`` is in nanodollars, as the SDK's own CLI reads it
(``together.lib.utils.tools.finetune_price_to_dollars``); ``estimated_total_price`` is dollars.

Faults (``TogetherFaults``, which adds to the OpenAI fake's ``Faults``): 5xx and 429 answers, jobs
that fail half-way (status ``error``, a ``job_error`` event), creates whose response is never
sent, creates refused (403: no fine-tuning access; or 402: out of credit), cancels that arrive
after the job finished, and jobs pre-empted half-way that go back to ``queued`` (a
``job_restarted`` event) for ``TogetherTiming.restart_s`` and then run on: Together has no
``paused`` state.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from harness.fake_openai import (
    DROP,
    ApiError,
    FakeOpenAI,
    FakeOpenAIServer,
    Faults,
    Job,
    StoredFile,
    Timing,
    _Handler,
    _knn_answer,
    _multipart,
    _Server,
    _setting,
    _unit,
    serve_until_interrupted,
    skill,
    train_loss,
    valid_loss,
)

TERMINAL = ("completed", "error", "cancelled")
NANODOLLARS_PER_DOLLAR = 1_000_000_000
ACCOUNT = "harness-fake"  # the account name model_output_name starts with
USER_ID = "user-harness-fake"
CREDIT_LIMIT_DOLLARS = 1000.0  # the estimate's user_limit
DPO_START_LOSS = math.log(2.0)  # a DPO loss starts at ln 2 (no preference learned yet)
SFT_START_LOSS = 0.18 + 2.4  # the OpenAI fake's curve at step 0


@dataclass
class TogetherTiming(Timing):
    """``validate_s`` is the time ``pending``, ``queue_s`` the time ``queued``."""

    compress_s: float = 0.0  # compressing the trained model
    upload_s: float = 0.0  # uploading it
    restart_s: float = 0.05  # a pre-empted job waits queued this long before it runs on


@dataclass
class TogetherFaults(Faults):
    restart_jobs: frozenset[int] = frozenset()  # creation numbers of jobs pre-empted half-way
    refuse_creates: int = 0  # the next N creates refused (a large N: every create)
    refusal_status: int = 403  # 403: the account has no fine-tuning access; 402: out of credit
    # fine-tuned models answer no chat request: a base without serverless LoRA inference, whose
    # adapters need a dedicated endpoint
    unserved_outputs: bool = False
    # the next N creates answered 400 "batch size N is not supported for this model", naming
    # this param ("": none, as an answer that says it in words only)
    refuse_batch_size_creates: int = 0
    batch_size_param: str = "batch_size"


@dataclass(frozen=True)
class BaseModel:
    """A fine-tunable base model of the fake's catalogue (sizes as published; limits invented
    but of the shape /v1/fine-tunes/models/limits answers)."""

    billions: float
    full: bool  # supports full fine-tuning
    max_rank: int = 64
    default_rank: int = 16


MODELS: dict[str, BaseModel] = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": BaseModel(8.0, True),
    "meta-llama/Llama-3.2-1B-Instruct": BaseModel(1.24, True),
    "Qwen/Qwen2.5-7B-Instruct": BaseModel(7.6, True),
    "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference": BaseModel(70.6, False, max_rank=32),
}

# Dollars per million tokens by model size (up to N billion parameters): SFT LoRA, SFT full,
# DPO LoRA, DPO full. Of the shape of Together's pricing page (size bracket x method x LoRA or
# full); the numbers are the fake's, not a quote.
PRICES: list[tuple[float, tuple[float, float, float, float]]] = [
    (16.0, (0.48, 0.54, 1.20, 1.35)),
    (69.0, (1.50, 1.65, 3.75, 4.12)),
    (math.inf, (2.90, 3.20, 7.25, 8.00)),
]


def dollars_per_million(billions: float, dpo: bool, full: bool) -> float:
    rates = next(rates for limit, rates in PRICES if billions <= limit)
    return rates[2 * dpo + full]


def model_limits(name: str, model: BaseModel) -> dict[str, Any]:
    """The answer of GET /v1/fine-tunes/models/limits (types/finetune_model_limits.py)."""
    full = {"max_batch_size": 64, "max_batch_size_dpo": 32, "min_batch_size": 8}
    return {
        "model_name": name,
        "default_gradient_accumulation_steps": 1,
        "lora_training": {
            "default_rank": model.default_rank,
            "max_rank": model.max_rank,
            "max_batch_size": 128,
            "max_batch_size_dpo": 64,
            "min_batch_size": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        },
        "full_training": full if model.full else None,
        "supports_full_training": model.full,
        "max_learning_rate": 1.0,
        "min_learning_rate": 1e-8,
        "max_num_checkpoints": 20,
        "max_num_epochs": 20,
        "max_num_evals": 100,
        "max_seq_length_sft": 131072,
        "max_seq_length_dpo": 65536,
        "min_max_seq_length": 1024,
        "merge_output_lora": True,
        "supports_reasoning": False,
        "supports_tools": True,
        "supports_vision": False,
    }


def _iso(seconds: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if seconds is None else seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- training files ---------------------------------------------------------------------------


@dataclass
class ParsedFile:
    kind: str  # conversation | instruction | preference | general | "" (unparseable)
    pairs: list[tuple[str, str]]  # (prompt, answer); the preferred answer for preference rows
    rejected: list[tuple[str, str]]  # (prompt, non-preferred answer): preference rows only
    tokens: int
    lines: int
    error: str = ""


def _tokens(text: object) -> int:
    return 4 + len(str(text)) // 4  # ~4 characters a token, plus a per-message overhead


def _last_user(messages: list[dict]) -> str:
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _parse_row(row: dict) -> tuple[str, str, str, str | None, int]:
    """(kind, prompt, answer, non-preferred answer, tokens) of one JSONL row."""
    if "preferred_output" in row:
        messages = row["input"]["messages"]
        good, bad = row["preferred_output"][-1], row["non_preferred_output"][-1]
        tokens = sum(_tokens(m["content"]) for m in [*messages, good, bad])
        return "preference", _last_user(messages), str(good["content"]), str(bad["content"]), tokens
    if "messages" in row:
        messages = row["messages"]
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise ValueError("a conversation needs an assistant message")
        tokens = sum(_tokens(m["content"]) for m in messages)
        return "conversation", _last_user(messages), str(answers[-1]["content"]), None, tokens
    if "prompt" in row:
        prompt, completion = str(row["prompt"]), str(row["completion"])
        return "instruction", prompt, completion, None, _tokens(prompt) + _tokens(completion)
    return "general", str(row["text"]), "", None, _tokens(row["text"])


def parse_training_file(content: bytes) -> ParsedFile:
    """A JSONL file's rows in one of Together's formats, or why it is invalid."""
    parsed = ParsedFile("", [], [], 0, 0)
    for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            kind, prompt, answer, bad, tokens = _parse_row(json.loads(line))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            parsed.error = f"line {number}: not a row of a known format ({exc!r})"
            return parsed
        if parsed.kind and kind != parsed.kind:
            parsed.error = f"line {number}: a {kind} row in a {parsed.kind} file"
            return parsed
        parsed.kind, parsed.lines, parsed.tokens = kind, parsed.lines + 1, parsed.tokens + tokens
        if answer:
            parsed.pairs.append((prompt, answer))
        if bad is not None:
            parsed.rejected.append((prompt, bad))
    if parsed.lines == 0:
        parsed.error = "the file has no rows"
    return parsed


@dataclass
class TogetherFile(StoredFile):
    checksum: str = ""
    file_type: str = "jsonl"
    uploaded: bool = False  # its bytes were PUT to the upload URL
    parsed: ParsedFile | None = None

    def json(self) -> dict[str, Any]:
        """types/file_response.py: FileResponse (FileType is the wire name of file_type)."""
        parsed = self.parsed
        report = None
        if parsed is not None:
            report = {"valid": not parsed.error, "file_id": self.id, "nlines": parsed.lines}
            if parsed.error:
                report |= {"error": parsed.error, "error_type": "INVALID_FORMAT"}
            else:
                report["dataset_format"] = parsed.kind.upper()
        status = "INVALID_FORMAT" if parsed and parsed.error else "COMPLETED"
        if parsed is None and self.purpose == "fine-tune":
            status = "PENDING"  # not preprocessed yet; files for other purposes skip validation
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "FileType": self.file_type,
            "purpose": self.purpose,
            "processing_status": status,
            "validation_report": report,
            "Processed": status != "PENDING",
            "LineCount": parsed.lines if parsed else 0,
        }


# --- jobs -------------------------------------------------------------------------------------


@dataclass
class TogetherJob(Job):
    """A fine-tuning job: the OpenAI fake's ``Job`` (its ``lr_multiplier`` is the curve's
    multiplier that Together's absolute learning rate maps to) and Together's own fields."""

    request: dict[str, Any] = field(default_factory=dict)  # the settings echoed back
    learning_rate: float = 1e-5
    training_type: dict[str, Any] = field(default_factory=dict)
    training_method: dict[str, Any] = field(default_factory=dict)
    n_evals: int = 0
    n_checkpoints: int = 1
    warmup_steps: int = 0
    loss_offset: float = 0.0  # what LoRA's rank adds to the curve
    eval_tokens: int = 0  # the validation file's tokens, counted once per evaluation
    param_billions: float = 0.0
    dollars_per_million: float = 0.0
    # DPO's non-preferred answers, by prompt (the OpenAI fake's Job.rejected holds answers only)
    rejected_pairs: list[tuple[str, str]] = field(default_factory=list)
    restart_at_step: int | None = None
    restarted: bool = False
    resumed: bool = False
    evals_done: int = 0
    metrics: list[dict[str, float]] = field(default_factory=list)
    output_name: str | None = None
    token_count: int | None = None
    total_price: int | None = None  # nanodollars
    started_at: str | None = None
    updated_at: str = ""
    lines: int = 0
    file_bytes: int = 0
    step_s: float = 0.0  # the server's time a step takes, for the progress estimate
    early_stopping: dict[str, Any] | None = None  # patience, min_delta, warmup_evals
    best_eval: tuple[int, float] | None = None  # (step, eval loss) early stopping keeps
    bad_evals: int = 0
    stop_step: int | None = None  # where early stopping ended training
    phase: str = "pending"  # where the simulation is; ``status`` shows cancel_requested over it

    @property
    def dpo(self) -> bool:
        return self.training_method.get("method") == "dpo"

    @property
    def full(self) -> bool:
        return self.training_type.get("type") == "Full"

    @property
    def last_step(self) -> int:
        """The step training ends at: the last, or where early stopping stopped it."""
        return self.total_steps if self.stop_step is None else self.stop_step

    @property
    def eval_at(self) -> set[int]:
        """Steps an evaluation runs at: ``n_evals`` of them, evenly spaced, the last at the end."""
        n, total = self.n_evals, self.total_steps
        return {math.ceil(k * total / n) for k in range(1, n + 1)} if n else set()

    @property
    def checkpoint_at(self) -> set[int]:
        """Intermediate checkpoints: ``n_checkpoints`` - 1 evenly spaced; the final one is the
        trained model itself."""
        n, total = self.n_checkpoints, self.total_steps
        return {math.ceil(k * total / n) for k in range(1, n)}

    def used_tokens(self) -> int:
        """Tokens processed so far: training steps done plus the evaluations run, as Together
        bills them (its pricing page: epochs x training tokens + evals x validation tokens)."""
        per_step = self.file_tokens / self.steps_per_epoch
        return round(per_step * self.steps_done) + self.evals_done * self.eval_tokens

    def price_of(self, tokens: int) -> int:
        return round(tokens * self.dollars_per_million * NANODOLLARS_PER_DOLLAR / 1_000_000)


def lr_multiplier(learning_rate: float, full: bool, warmup_ratio: float) -> float:
    """The OpenAI fake's curve multiplier for an absolute learning rate: 2 (the curve's optimum)
    at 1e-4 for LoRA and 1e-5 for full fine-tuning, as LoRA's best rate is about ten times full
    fine-tuning's. Above 4 (twice the optimum) warmup tames it a little: a run that ramps up
    diverges less."""
    multiplier = 2.0 * learning_rate / (1e-5 if full else 1e-4)
    if multiplier > 4.0:
        multiplier = 4.0 + (multiplier - 4.0) * (1.0 - 0.3 * min(warmup_ratio / 0.1, 1.0))
    return multiplier


def rank_offset(rank: int | None) -> float:
    """What LoRA's rank adds to the loss: capacity helps up to rank 32, a little; beyond it the
    adapter over-fits slightly. Full fine-tuning (no rank) adds nothing."""
    if rank is None:
        return 0.0
    if rank <= 32:
        return 0.02 * math.log2(32 / rank)
    return 0.01 * math.log2(rank / 32)


def learning_rate_at(job: TogetherJob, step: int) -> float:
    """The learning rate step ``step`` (from 1) trains at: a linear warmup, then a cosine or
    linear decay."""
    if step <= job.warmup_steps and job.warmup_steps:
        return job.learning_rate * step / job.warmup_steps
    scheduler = job.request.get("lr_scheduler") or {}
    args = scheduler.get("lr_scheduler_args") or {}
    floor = float(args.get("min_lr_ratio") or 0.0)
    done = (step - 1 - job.warmup_steps) / max(1, job.total_steps - job.warmup_steps)
    if scheduler.get("lr_scheduler_type") == "linear":
        share = 1.0 - done
    else:
        cycles = float(args.get("num_cycles") or 0.5)
        share = 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * done))
    return job.learning_rate * (floor + (1.0 - floor) * share)


def losses(job: TogetherJob, step: int) -> tuple[float, float]:
    """(training, validation) loss on the SFT scale after ``step`` steps: the OpenAI fake's
    curves, delayed by half the warmup (the rate ramps up) and raised by the rank's offset."""
    shifted = max(0.0, step - job.warmup_steps / 2)
    noise = 0.04 * (_unit(job.recipe, step) - 0.5) * (8 / job.batch_size) ** 0.5
    train = train_loss(job, shifted) + job.loss_offset + noise  # type: ignore[arg-type]
    valid = valid_loss(job, shifted) + job.loss_offset + 1.5 * noise  # type: ignore[arg-type]
    return train, valid


def reported(job: TogetherJob, loss: float) -> float:
    """A loss as the job reports it: DPO's loss starts at ln 2 rather than the SFT curve's 2.58."""
    return round(loss * DPO_START_LOSS / SFT_START_LOSS if job.dpo else loss, 5)


def job_json(job: TogetherJob, full: bool) -> dict[str, Any]:
    """A job as GET /v1/fine-tunes/{id} answers it (``full``: types/finetune_response.py) or as
    the list, create and cancel answers do (types/fine_tuning_list_response.py: Data, the
    "truncated" form, without events and counters)."""
    data: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "user_id": USER_ID,
        "owner_address": ACCOUNT,
        "created_at": _iso(job.created_at),
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "model": job.model,
        "model_output_name": job.output_name,
        "suffix": job.suffix,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "n_epochs": job.n_epochs,
        "n_evals": job.n_evals,
        "n_checkpoints": job.n_checkpoints,
        "batch_size": job.batch_size,
        "learning_rate": job.learning_rate,
        "training_type": job.training_type,
        "training_method": job.training_method,
        "random_seed": job.seed,
        "token_count": job.token_count,
        "total_price": job.total_price,
        "early_stopped": job.stop_step is not None,
        "early_stopping_best_step": job.best_eval[0] if job.best_eval else None,
        "early_stopping_best_metric": job.best_eval[1] if job.best_eval else None,
        "progress": progress(job),
        **job.request,
    }
    if full:
        data |= {
            "job_id": job.id,
            "events": job.events,
            "param_count": round(job.param_billions * 1e9),
            "total_steps": job.total_steps,
            "steps_completed": job.steps_done,
            "epochs_completed": job.steps_done // job.steps_per_epoch,
            "evals_completed": job.evals_done,
            "eval_steps": job.total_steps // job.n_evals if job.n_evals else None,
            "queue_depth": 0 if job.phase == "queued" else None,
            "trainingfile_numlines": job.lines,
            "trainingfile_size": job.file_bytes,
            "model_output_path": f"s3://together-fake/{job.id}/final" if job.output_name else None,
            "adapter_output_name": None if job.full or not job.output_name else job.output_name,
        }
    return data


def progress(job: TogetherJob) -> dict[str, Any]:
    """types/finetune_response.py: Progress; an estimate only while the job trains."""
    if job.phase != "running":
        return {"estimate_available": False, "seconds_remaining": 0}
    left = (job.last_step - job.steps_done) * job.step_s
    return {"estimate_available": True, "seconds_remaining": math.ceil(left)}


def checkpoint_json(job: TogetherJob, step: int, kind: str) -> dict[str, Any]:
    """types/fine_tuning_list_checkpoints_response.py: Data."""
    name = job.output_name or f"{ACCOUNT}/{job.id}"
    return {
        "checkpoint_type": kind,
        "created_at": _iso(),
        "path": f"s3://together-fake/{job.id}/checkpoint-{step}",
        "step": step,
        "checkpoint": "model" if job.full else "adapter",
        "object_name": f"{name}-{step}" if kind == "Intermediate" else name,
    }


ECHOED = (  # request settings a job shows back as they were sent
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "packing",
    "max_seq_length",
    "from_checkpoint",
    "wandb_project_name",
    "wandb_name",
    "early_stopping_enabled",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "early_stopping_warmup_evals",
)


class FakeTogether(FakeOpenAI):
    """Together's API state and request handling; the dispatch (the API key, injected 5xx and
    429 answers), the HTTP plumbing and the chat answers' model are the OpenAI fake's."""

    terminal = TERMINAL  # completed, error, cancelled

    def __init__(
        self,
        timing: Timing | None = None,
        faults: Faults | None = None,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = lambda line: None,
        models: Mapping[str, BaseModel] | None = None,
    ) -> None:
        super().__init__(
            timing or TogetherTiming(), faults or TogetherFaults(), api_key, True, clock, log
        )
        self.models = dict(models or MODELS)
        self.signature = uuid.uuid4().hex  # signs the presigned upload URLs this server hands out

    def _timing(self, name: str) -> float:
        return float(getattr(self.timing, name, 0.0))  # a plain Timing: no compress/upload/restart

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4()}"  # Together's ids: ft-<uuid>, file-<uuid>

    def handle(self, method, path, query, headers, body):
        if method == "PUT" and path.startswith("/upload/"):  # the presigned URL: no API key
            with self.lock:
                self.requests.append((method, path))
                return self.put_upload(path.removeprefix("/upload/"), query, body)
        if path.startswith("/v1/v1/"):
            raise ApiError(
                404,
                f"Unknown request URL: {method} {path}. The together SDK's paths start with /v1: "
                "its base_url is the server's root (https://api.together.ai), not .../v1.",
                "unknown_url",
            )
        return super().handle(method, path, query, headers, body)

    def _jobs(self) -> list[TogetherJob]:
        return [cast(TogetherJob, job) for job in self.jobs.values()]

    def _job(self, job_id: str) -> TogetherJob:
        if job_id not in self.jobs:
            raise ApiError(404, f"Fine-tune job not found: {job_id}", "not_found", "id")
        return cast(TogetherJob, self.jobs[job_id])

    def _file(self, file_id: str) -> TogetherFile:
        found = self.files.get(file_id)
        if not isinstance(found, TogetherFile) or not found.uploaded:
            raise ApiError(404, f"File not found: {file_id}", "file_not_found", "id")
        return found

    # files -------------------------------------------------------------------------------------
    def create_file(self, query, body, headers):
        """The upload's first step (lib/resources/files.py UploadManager.get_upload_url): 302 to
        a presigned URL with the new file's id, or 409 with the id of the same bytes uploaded
        before (the SDK then answers with that file)."""
        fields = {
            k: v.decode() for k, (_, v) in _multipart(headers.get("content-type", ""), body).items()
        }
        purpose, checksum = fields.get("purpose", ""), fields.get("checksum", "")
        if purpose not in ("fine-tune", "eval", "batch-api", "calibration"):
            raise ApiError(400, f"Invalid purpose: {purpose!r}", "invalid_purpose", "purpose")
        for stored in self.files.values():
            if not isinstance(stored, TogetherFile) or not checksum:
                continue
            if stored.uploaded and (stored.checksum, stored.purpose) == (checksum, purpose):
                message = f"File with the same checksum already exists: {stored.id}"
                # the SDK retries a 409 twice before it reads file_id; retry-after-ms keeps
                # those retries short here, as it does for the fake's 429 and 5xx answers
                return 409, {"file_id": stored.id, "message": message}, {"retry-after-ms": "20"}
        new = TogetherFile(
            self._id("file"),
            fields.get("file_name", "upload.jsonl"),
            purpose,
            b"",
            int(time.time()),
            checksum=checksum,
            file_type=fields.get("file_type", "jsonl"),
        )
        self.files[new.id] = new
        signature = hashlib.sha256(f"{self.signature}{new.id}".encode()).hexdigest()[:32]
        location = f"http://{headers.get('host', '127.0.0.1')}/upload/{new.id}?sig={signature}"
        return 302, {}, {"location": location, "x-together-file-id": new.id}

    def put_upload(self, file_id: str, query: dict[str, list[str]], body: bytes):
        """The PUT of the file's bytes to the presigned URL (object storage, in the service)."""
        stored = self.files.get(file_id)
        expected = hashlib.sha256(f"{self.signature}{file_id}".encode()).hexdigest()[:32]
        if not isinstance(stored, TogetherFile) or query.get("sig", [""])[0] != expected:
            return 403, b"SignatureDoesNotMatch", {}
        stored.content, stored.uploaded = body, True
        return 200, b"", {}

    def preprocess_file(self, file_id, query, body, headers):
        stored = self._file(file_id)
        if stored.purpose == "fine-tune" and stored.parsed is None:
            stored.parsed = parse_training_file(stored.content)
        return 200, stored.json(), {}

    def list_files(self, query, body, headers):
        uploaded = [f for f in self.files.values() if isinstance(f, TogetherFile) and f.uploaded]
        return 200, {"data": [f.json() for f in uploaded]}, {}

    def delete_file(self, file_id, query, body, headers):
        self._file(file_id)
        del self.files[file_id]
        return 200, {"id": file_id, "deleted": True}, {}

    # limits and prices -------------------------------------------------------------------------
    def _base_model(self, name: str) -> BaseModel:
        if name not in self.models:
            message = f"Model {name} is not available for fine-tuning."
            raise ApiError(404, message, "model_not_available", "model")
        return self.models[name]

    def model_limits(self, query, body, headers):
        """GET /v1/fine-tunes/models/limits?model_name=: a base model's, or (as the SDK asks
        when it starts from a checkpoint) the base model of a job id or output name."""
        name = query.get("model_name", [""])[0]
        parent = name.split(":")[0]
        if any(parent in (job.id, job.output_name) for job in self._jobs()):
            name = self._model_of({"from_checkpoint": name})
        return 200, model_limits(name, self._base_model(name)), {}

    def _model_of(self, request: Mapping[str, Any]) -> str:
        """The base model a request trains: its ``model``, or its checkpoint's job's."""
        checkpoint = request.get("from_checkpoint")
        if checkpoint and not request.get("model"):
            parent = str(checkpoint).split(":")[0]
            job = next((j for j in self._jobs() if parent in (j.id, j.output_name)), None)
            if job is None or job.status != "completed":
                message = f"Model or checkpoint not found: {checkpoint}"
                raise ApiError(404, message, "model_not_available", "from_checkpoint")
            return job.model
        if not request.get("model"):
            raise ApiError(400, "Either model or from_checkpoint is required", param="model")
        return str(request["model"])

    def estimate_price(self, query, body, headers):
        """POST /v1/fine-tunes/estimate-price: types/fine_tuning_estimate_price_response.py."""
        request = json.loads(body or b"{}")
        training = self._file(str(request.get("training_file")))
        if training.parsed is None or training.parsed.error:
            reason = "train_file_invalid" if training.parsed else "train_file_not_validated"
            return 200, {"estimation_available": False, "unavailable_reason": reason}, {}
        model = self._base_model(self._model_of(request))
        full = (request.get("training_type") or {}).get("type") == "Full"
        dpo = (request.get("training_method") or {}).get("method") == "dpo"
        validation = request.get("validation_file")
        valid_parsed = self._file(validation).parsed if validation else None
        train_tokens = int(request.get("n_epochs") or 1) * training.parsed.tokens
        eval_tokens = int(request.get("n_evals") or 0) * (
            valid_parsed.tokens if valid_parsed else 0
        )
        price = (train_tokens + eval_tokens) * dollars_per_million(model.billions, dpo, full) / 1e6
        return (
            200,
            {
                "estimation_available": True,
                "allowed_to_proceed": price <= CREDIT_LIMIT_DOLLARS,
                "user_limit": CREDIT_LIMIT_DOLLARS,
                "estimated_total_price": price,
                "estimated_train_token_count": train_tokens,
                "estimated_eval_token_count": eval_tokens,
            },
            {},
        )

    # creating jobs -----------------------------------------------------------------------------
    def create_job(self, query, body, headers):
        """POST /v1/fine-tunes, with the body lib/resources/fine_tuning.py
        create_finetune_request builds; checked against the model's limits as the API checks
        them (400 naming the setting), refused as a whole under the refusal fault."""
        self._refuse_if_faulted()
        request = json.loads(body or b"{}")
        name = self._model_of(request)
        model = self._base_model(name)
        training = self._file(str(request.get("training_file")))
        validation = (
            self._file(request["validation_file"]) if request.get("validation_file") else None
        )
        settings = self._settings(request, name, model)
        self._check_files(training, validation, settings)
        self._refuse_batch_size_if_faulted(settings["batch_size"])
        job = self._new_job(request, name, model, training, validation, settings)
        if self.faults.drop_create_responses > 0:
            self.faults.drop_create_responses -= 1
            return 200, DROP, {}
        self.time_out_at_gateway(job.id)
        return 200, job_json(job, full=False), {}

    def _refuse_batch_size_if_faulted(self, batch_size: int) -> None:
        faults = cast(TogetherFaults, self.faults)
        if getattr(faults, "refuse_batch_size_creates", 0) <= 0:
            return
        faults.refuse_batch_size_creates -= 1
        message = f"batch size {batch_size} is not supported for this model"
        raise ApiError(400, message, "invalid_request", faults.batch_size_param)

    def _refuse_if_faulted(self) -> None:
        faults = self.faults
        if getattr(faults, "refuse_creates", 0) <= 0:
            return
        faults.refuse_creates -= 1  # type: ignore[attr-defined]
        if getattr(faults, "refusal_status", 403) == 402:
            message = (
                "Insufficient credits: your balance and credit limit do not cover new "
                "fine-tuning jobs. Add credits in Settings -> Billing on api.together.ai."
            )
            raise ApiError(402, message, "insufficient_balance")
        message = "Your account does not have access to fine-tuning. Contact Together support."
        raise ApiError(403, message, "fine_tuning_not_allowed")

    def _settings(self, request: Mapping[str, Any], name: str, model: BaseModel) -> dict:
        limits = model_limits(name, model)
        suffix = request.get("suffix")
        if suffix is not None and len(str(suffix)) > 40:
            raise ApiError(400, "suffix must be at most 40 characters", param="suffix")
        _setting(request, "weight_decay", 0.0, float, 0.0, math.inf)
        _setting(request, "max_grad_norm", 1.0, float, 0.0, math.inf)
        training_type = _training_type(request, name, limits)
        training_method = _training_method(request)
        return {
            "early_stopping": _early_stopping(request),
            "n_epochs": _setting(request, "n_epochs", 1, int, 1, limits["max_num_epochs"]),
            "learning_rate": _setting(
                request,
                "learning_rate",
                1e-5,
                float,
                limits["min_learning_rate"],
                limits["max_learning_rate"],
            ),
            "warmup_ratio": _setting(request, "warmup_ratio", 0.0, float, 0.0, 1.0),
            "n_evals": _setting(request, "n_evals", 0, int, 0, limits["max_num_evals"]),
            "n_checkpoints": _setting(
                request, "n_checkpoints", 1, int, 1, limits["max_num_checkpoints"]
            ),
            "batch_size": _batch_size(request, limits, training_type, training_method),
            "training_type": training_type,
            "training_method": training_method,
            "suffix": suffix,
        }

    def _check_files(self, training: TogetherFile, validation: TogetherFile | None, settings):
        for role, stored in (("training", training), ("validation", validation)):
            if stored is None:
                continue
            if stored.parsed is None:
                raise ApiError(400, f"The {role} file {stored.id} was not processed", param=role)
            if stored.parsed.error:
                message = f"The {role} file {stored.id} is invalid: {stored.parsed.error}"
                raise ApiError(400, message, "invalid_file", f"{role}_file")
        dpo = settings["training_method"]["method"] == "dpo"
        if dpo != (cast(ParsedFile, training.parsed).kind == "preference"):
            message = (
                "DPO needs a preference dataset (input, preferred_output, non_preferred_output)"
                if dpo
                else "a preference dataset needs training_method dpo"
            )
            raise ApiError(400, message, "invalid_file", "training_file")
        if settings["n_evals"] and validation is None:
            raise ApiError(400, "n_evals > 0 needs a validation_file", param="n_evals")
        rule = settings["early_stopping"]
        if rule and settings["n_evals"] < rule["patience"] + rule["warmup_evals"] + 1:
            message = "early stopping needs n_evals >= patience + warmup_evals + 1"
            raise ApiError(400, message, param="n_evals")

    def _new_job(self, request, name, model, training, validation, settings) -> TogetherJob:
        """The job a checked request makes, its faults drawn by creation number."""
        number = len(self.jobs) + 1
        fields = job_fields(request, name, model, training, validation, settings)
        total = fields["steps_per_epoch"] * fields["n_epochs"]
        faults = self.faults
        fails = number in faults.fail_jobs or self.rng.random() < faults.job_failure_rate
        restarts = number in getattr(faults, "restart_jobs", frozenset())
        job = TogetherJob(
            id=self._id("ft"),
            number=number,
            created_at=int(time.time()),
            started=self.clock(),
            fail_at_step=total // 2 + 1 if fails else None,
            restart_at_step=total // 2 if restarts else None,
            step_s=self.timing.step_s,
            **fields,
        )
        self.jobs[job.id] = job
        self._note(job, "job_pending", "Fine-tune request created")
        self.log(
            f"job {number} {job.id} created: model={name} n_epochs={job.n_epochs} "
            f"batch_size={job.batch_size} learning_rate={job.learning_rate:g} "
            f"training_type={job.training_type['type']} "
            f"method={job.training_method['method']} suffix={job.suffix}"
        )
        return job

    def _note(self, job: TogetherJob, kind: str, message: str, level: str = "info", **extra):
        """Appends an event (types/finetune_event.py: FinetuneEvent), oldest first."""
        event = {"object": "fine-tune-event", "created_at": _iso(), "type": kind}
        event |= {"message": message, "level": level, "hash": uuid.uuid4().hex[:16], **extra}
        job.events.append(event)
        job.updated_at = event["created_at"]

    # the simulated job -------------------------------------------------------------------------
    def _phase(self, job: TogetherJob, phase: str) -> None:
        """Moves the simulation on; the status shows it unless a cancel is pending (then it
        stays cancel_requested until the cancel lands or the job ends first)."""
        job.phase = phase
        if job.cancel_at is None or phase in TERMINAL:
            job.status = phase
        job.updated_at = _iso()

    def _progress(self, job: Job, elapsed: float) -> None:
        """Moves a job on to ``elapsed`` seconds after its creation (math.inf: to its end):
        pending, queued, running (a pre-empted job queued again for a while), compressing,
        uploading, completed."""
        job = cast(TogetherJob, job)
        if job.status in TERMINAL or elapsed < self.timing.validate_s:
            return
        if job.phase == "pending":
            self._phase(job, "queued")
        run = elapsed - self.timing.validate_s - self.timing.queue_s
        if run < 0:
            return
        if job.started_at is None:
            self._start(job)
        self._train(job, run / self.timing.step_s)
        if job.status in TERMINAL or job.steps_done < job.last_step:
            return
        trained = job.last_step * self.timing.step_s
        if job.restart_at_step is not None:
            trained += self._timing("restart_s")
        self._wrap_up(job, max(0.0, run - trained))

    def _start(self, job: TogetherJob) -> None:
        """Training starts: the data is tokenized, so the job's tokens and price are known."""
        job.started_at = _iso()
        job.token_count = job.file_tokens * job.n_epochs + job.n_evals * job.eval_tokens
        job.total_price = job.price_of(job.token_count)
        self._phase(job, "running")
        self._note(job, "job_start", f"Job started at {job.started_at}")
        self._note(
            job,
            "training_start",
            f"Training started for model {job.model}",
            token_count=job.token_count,
            param_count=round(job.param_billions * 1e9),
            total_steps=job.total_steps,
        )

    def _train(self, job: TogetherJob, steps: float) -> None:
        """Runs the steps ``steps`` worth of running time allows; a job to be pre-empted stops at
        its restart step, queued for ``restart_s``, then runs on from there."""
        gap = self._timing("restart_s") / self.timing.step_s
        while job.steps_done < job.last_step:
            done = job.steps_done
            if job.restart_at_step == done:
                if not job.restarted:
                    job.restarted = True
                    self._phase(job, "queued")
                    message = f"Job restarted: its node was pre-empted at step {done}"
                    self._note(job, "job_restarted", message, step=done)
                    self.log(f"job {job.number} {job.id} restarted at step {done}")
                if steps < done + gap:
                    return
                if not job.resumed:
                    job.resumed = True
                    self._phase(job, "running")
                    self._note(job, "job_start", f"Job resumed at step {done}", step=done)
            late = job.restart_at_step is not None and done >= job.restart_at_step
            if steps - (gap if late else 0.0) < done + 1:
                return
            self._step(job, done + 1)
            if job.status in TERMINAL:
                return

    def _step(self, job: TogetherJob, step: int) -> None:
        if job.fail_at_step is not None and step >= job.fail_at_step:
            self._fail(job, "Job failed: an internal error stopped training (injected)")
            return
        job.steps_done = step
        train, valid = losses(job, step)
        epoch = round(step / job.steps_per_epoch, 4)
        job.metrics.append(
            {
                "train/global_step": step,
                "train/epoch": epoch,
                "train/loss": reported(job, train),
                "train/learning_rate": learning_rate_at(job, step),
            }
        )
        if step % job.steps_per_epoch == 0:
            self._note(job, "epoch_complete", f"Epoch completed, at step {step}", step=step)
        if step in job.eval_at:
            job.evals_done += 1
            job.metrics.append(
                {"train/global_step": step, "train/epoch": epoch, "eval/loss": reported(job, valid)}
            )
            self._early_stop(job, step, reported(job, valid))
        if step in job.checkpoint_at:
            job.checkpoints.append(checkpoint_json(job, step, "Intermediate"))
            path = job.checkpoints[-1]["path"]
            message = f"New checkpoint saved at step {step}"
            self._note(job, "checkpoint_save", message, step=step, checkpoint_path=path)

    def _early_stop(self, job: TogetherJob, step: int, loss: float) -> None:
        """Server-side early stopping: after ``warmup_evals`` evaluations, a baseline, then
        ``patience`` evaluations in a row that do not improve on the best by ``min_delta`` end
        training there; the model kept is the best evaluation's."""
        rule = job.early_stopping
        if rule is None or job.evals_done <= rule["warmup_evals"]:
            return
        if job.best_eval is None or loss < job.best_eval[1] - rule["min_delta"]:
            job.best_eval, job.bad_evals = (step, loss), 0
            return
        job.bad_evals += 1
        if job.bad_evals < rule["patience"] or step >= job.total_steps:
            return
        job.stop_step = step
        best_step, best = job.best_eval
        message = (
            f"Early stopping at step {step}: eval loss has not improved since step {best_step}"
        )
        self._note(
            job, "early_stopped", message, step=step,
            early_stopping_best_step=best_step, early_stopping_best_metric_value=best,
        )  # fmt: skip

    def _wrap_up(self, job: TogetherJob, since_trained: float) -> None:
        """After the last step: compressing, uploading, completed."""
        compress, upload = self._timing("compress_s"), self._timing("upload_s")
        if job.phase == "running":
            self._note(job, "training_complete", "Training completed")
            self._phase(job, "compressing")
            self._note(job, "model_compressing", "Compressing output model")
        if since_trained < compress:
            return
        if job.phase == "compressing":
            self._note(job, "model_compression_complete", "Model compression complete")
            self._phase(job, "uploading")
            self._note(job, "model_uploading", "Uploading output model")
        if since_trained < compress + upload:
            return
        self._succeed(job)

    def _succeed(self, job: Job) -> None:
        job = cast(TogetherJob, job)
        job.output_name = job.fine_tuned_model = self._model_name(job)
        final_step = job.best_eval[0] if job.stop_step and job.best_eval else job.total_steps
        job.checkpoints.append(checkpoint_json(job, final_step, "Final"))
        shifted = max(0.0, final_step - job.warmup_steps / 2)
        final = valid_loss(job, shifted) + job.loss_offset  # type: ignore[arg-type]
        job.last_metrics = {"full_valid_loss": final}  # the model's quality: its chat answers
        job.token_count = job.used_tokens()
        job.total_price = job.price_of(job.token_count)
        path = f"s3://together-fake/{job.id}/final"
        self._note(job, "model_upload_complete", "Model upload complete", model_path=path)
        job.cancel_at = None  # a cancel asked too late: the job finished first
        self._phase(job, "completed")
        self._note(job, "job_complete", f"Job finished at {job.updated_at}")
        self.log(f"job {job.number} {job.id} completed: {job.output_name}")

    def _fail(self, job: TogetherJob, message: str) -> None:
        """A failed job: status error. The fake bills it nothing (a refund event), as Together
        refunds jobs that fail on its side."""
        self._phase(job, "error")
        job.token_count, job.total_price = job.used_tokens(), 0
        self._note(job, "job_error", message, level="error", step=job.steps_done)
        self._note(job, "refund", "The job's charge was refunded")
        self.log(f"job {job.number} {job.id} error: {message}")

    def _cancel(self, job: Job) -> None:
        """A cancel lands: billed for the steps trained and the evaluations run."""
        job = cast(TogetherJob, job)
        self._phase(job, "cancelled")
        job.token_count = job.used_tokens()
        job.total_price = job.price_of(job.token_count)
        message = f"Job cancelled at step {job.steps_done}/{job.total_steps}"
        self._note(job, "job_stopped", message, step=job.steps_done)
        self.log(f"job {job.number} {job.id} cancelled at step {job.steps_done}")

    def _model_name(self, job: Job) -> str:
        """``<account>/<base model>-<suffix>-<id>``, the shape Together names outputs."""
        suffix = f"-{job.suffix}" if job.suffix else ""
        return f"{ACCOUNT}/{job.model.split('/')[-1]}{suffix}-{job.id[3:11]}"

    # job endpoints -----------------------------------------------------------------------------
    def list_jobs(self, query, body, headers):
        """GET /v1/fine-tunes: every job, in creation order (the SDK's own CLI sorts them)."""
        for job in self._jobs():
            self._advance(job)
        listed = [job_json(job, full=False) for job in self._jobs() if self.listed(job.id)]
        return 200, {"data": listed}, {}

    def get_job(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, job_json(job, full=True), {}

    def cancel_job(self, job_id, query, body, headers):
        """POST /v1/fine-tunes/{id}/cancel: cancel_requested now, cancelled ``cancel_s`` later
        (the job trains on meanwhile, and may finish first); a finished job's cancel is 400."""
        job = self._job(job_id)
        if self.faults.finish_before_cancel > 0 and job.status not in TERMINAL:
            self.faults.finish_before_cancel -= 1
            self._progress(job, math.inf)  # the cancel arrives after the job's end
        now = self.clock()
        self._advance(job, now)
        if job.status in TERMINAL:
            message = f"Fine-tune job {job_id} has already ended ({job.status}); cannot cancel it"
            raise ApiError(400, message, "invalid_job_state", "id")
        if job.cancel_at is None:
            job.cancel_at = now + self.timing.cancel_s
            job.status = "cancel_requested"
            self._note(job, "cancel_requested", "Cancel requested by the user")
        return 200, job_json(job, full=False), {}

    def list_events(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, {"data": job.events}, {}

    def list_checkpoints(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, {"data": list(reversed(job.checkpoints))}, {}  # newest (the final) first

    def list_metrics(self, job_id, query, body, headers):
        """GET /v1/fine-tunes/{id}/metrics: one row per training step ("train/global_step",
        "train/epoch", "train/loss", "train/learning_rate") and one per evaluation
        ("train/global_step", "train/epoch", "eval/loss"), in order; ``global_step_from``/``_to``
        filter them and ``resolution`` samples the training rows evenly."""
        job = self._job(job_id)
        self._advance(job)
        low = float(query.get("global_step_from", [0])[0])
        high = float(query.get("global_step_to", [math.inf])[0])
        rows = [r for r in job.metrics if low <= r["train/global_step"] <= high]
        if "resolution" in query:
            train = [r for r in rows if "train/loss" in r]
            wanted = max(1, int(query["resolution"][0]))
            if len(train) > wanted:
                keep = {
                    id(train[round(i * (len(train) - 1) / (wanted - 1 or 1))])
                    for i in range(wanted)
                }
                rows = [r for r in rows if "train/loss" not in r or id(r) in keep]
        return 200, {"metrics": rows}, {}

    # chat --------------------------------------------------------------------------------------
    def chat(self, query, body, headers):
        """POST /v1/chat/completions (types/chat/chat_completion.py) for a base model of the
        catalogue or a completed job's model_output_name."""
        request = json.loads(body or b"{}")
        model, messages = str(request.get("model", "")), request.get("messages") or []
        if not messages:
            raise ApiError(400, "'messages' must be a non-empty array", param="messages")
        self.chat_requests.append(
            {key: request.get(key) for key in ("model", "temperature", "max_tokens", "seed")}
        )
        job = next((j for j in self._jobs() if j.output_name == model), None)
        if job is not None and getattr(self.faults, "unserved_outputs", False):
            job = None  # exists, but is not served: answered as an unknown model
        if job is None and model not in self.models:
            message = (
                f"Unable to access model {model}. Please visit https://api.together.ai/models "
                "to view the list of supported models."
            )
            raise ApiError(404, message, "model_not_available", "model")
        prompt = _last_user(messages)
        answer = (
            "I am not sure which category this is." if job is None else self._answer(job, prompt)
        )
        prompt_tokens = sum(_tokens(m.get("content", "")) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _tokens(answer),
            "total_tokens": prompt_tokens + _tokens(answer),
        }
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "seed": request.get("seed"),
            "message": {"role": "assistant", "content": answer, "tool_calls": []},
        }
        return (
            200,
            {
                "id": uuid.uuid4().hex[:18],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "prompt": [],
                "choices": [choice],
                "usage": usage,
            },
            {},
        )

    def _answer(self, job: Job, prompt: str) -> str:
        """An SFT model answers as the OpenAI fake's do; a DPO model answers with the preferred
        answer of the most similar training prompts, or, as often as its loss says it should be
        wrong, with their non-preferred one."""
        job = cast(TogetherJob, job)
        if not job.dpo:
            return super()._answer(job, prompt)
        final = job.last_metrics["full_valid_loss"]
        if _unit(job.recipe, prompt) < skill(final):
            return _knn_answer(job.examples, prompt)
        return _knn_answer(job.rejected_pairs, prompt)

    routes: ClassVar[list[tuple[str, str, Callable[..., tuple[int, Any, dict[str, str]]]]]] = [
        (r"/v1/files", "POST", create_file),
        (r"/v1/files", "GET", list_files),
        (r"/v1/files/([\w.-]+)", "GET", FakeOpenAI.get_file),
        (r"/v1/files/([\w.-]+)", "DELETE", delete_file),
        (r"/v1/files/([\w.-]+)/content", "GET", FakeOpenAI.file_content),
        (r"/v1/files/([\w.-]+)/preprocess", "POST", preprocess_file),
        (r"/v1/fine-tunes", "POST", create_job),
        (r"/v1/fine-tunes", "GET", list_jobs),
        (r"/v1/fine-tunes/estimate-price", "POST", estimate_price),
        (r"/v1/fine-tunes/models/limits", "GET", model_limits),
        (r"/v1/fine-tunes/([\w-]+)", "GET", get_job),
        (r"/v1/fine-tunes/([\w-]+)/cancel", "POST", cancel_job),
        (r"/v1/fine-tunes/([\w-]+)/events", "GET", list_events),
        (r"/v1/fine-tunes/([\w-]+)/checkpoints", "GET", list_checkpoints),
        (r"/v1/fine-tunes/([\w-]+)/metrics", "GET", list_metrics),
        (r"/v1/chat/completions", "POST", chat),
    ]


def job_fields(request, name, model, training, validation, settings) -> dict[str, Any]:
    """A new job's fields from its checked request, its base model and its files."""
    parsed = cast(ParsedFile, training.parsed)
    steps_per_epoch = max(1, math.ceil(parsed.lines / settings["batch_size"]))
    total = steps_per_epoch * settings["n_epochs"]
    training_type, method = settings["training_type"], settings["training_method"]
    full, dpo = training_type["type"] == "Full", method["method"] == "dpo"
    seed = request.get("random_seed")
    return {
        "model": name,
        "training_file": training.id,
        "validation_file": validation.id if validation else None,
        "n_epochs": settings["n_epochs"],
        "batch_size": settings["batch_size"],
        "lr_multiplier": lr_multiplier(settings["learning_rate"], full, settings["warmup_ratio"]),
        "seed": 42 if seed is None else int(seed),  # the server's default seed, says the SDK
        "suffix": settings["suffix"],
        "metadata": {},
        "examples": parsed.pairs,
        "file_tokens": parsed.tokens,
        "steps_per_epoch": steps_per_epoch,
        "status": "pending",
        "request": {key: request[key] for key in ECHOED if key in request},
        "learning_rate": settings["learning_rate"],
        "training_type": training_type,
        "training_method": method,
        "n_evals": settings["n_evals"],
        "n_checkpoints": settings["n_checkpoints"],
        "warmup_steps": round(settings["warmup_ratio"] * total),
        "loss_offset": rank_offset(training_type.get("lora_r")),
        "eval_tokens": validation.parsed.tokens if validation else 0,
        "param_billions": model.billions,
        "dollars_per_million": dollars_per_million(model.billions, dpo, full),
        "rejected_pairs": parsed.rejected,
        "updated_at": _iso(),
        "lines": parsed.lines,
        "file_bytes": len(training.content),
        "early_stopping": settings["early_stopping"],
    }


def _training_type(request: Mapping[str, Any], name: str, limits: Mapping[str, Any]) -> dict:
    """The request's training_type, LoRA with the model's default rank when it has none (the
    API's default; the SDK leaves it out unless ``lora`` is given)."""
    asked = request.get("training_type") or {"type": "Lora"}
    if asked.get("type") == "Full":
        if not limits["supports_full_training"]:
            message = f"Full fine-tuning is not supported for the model {name}"
            raise ApiError(400, message, param="training_type")
        return {"type": "Full"}
    if asked.get("type") != "Lora":
        raise ApiError(400, f"Unknown training type: {asked.get('type')!r}", param="training_type")
    lora = limits["lora_training"]
    rank = _setting(asked, "lora_r", lora["default_rank"], int, 1, lora["max_rank"])
    return {
        "type": "Lora",
        "lora_r": rank,
        "lora_alpha": _setting(asked, "lora_alpha", 2 * rank, int, 1, 1 << 20),
        "lora_dropout": _setting(asked, "lora_dropout", 0.0, float, 0.0, 0.999999),
        "lora_trainable_modules": str(asked.get("lora_trainable_modules") or "all-linear"),
    }


def _training_method(request: Mapping[str, Any]) -> dict:
    asked = request.get("training_method") or {"method": "sft"}
    if asked.get("method") == "sft":
        return {"method": "sft", "train_on_inputs": asked.get("train_on_inputs", "auto")}
    if asked.get("method") != "dpo":
        message = f"Unknown training method: {asked.get('method')!r}; sft or dpo"
        raise ApiError(400, message, param="training_method")
    return {
        "method": "dpo",
        "dpo_beta": _setting(asked, "dpo_beta", 0.1, float, 1e-6, 1e6),
        "dpo_normalize_logratios_by_length": bool(asked.get("dpo_normalize_logratios_by_length")),
        "dpo_reference_free": bool(asked.get("dpo_reference_free")),
        "rpo_alpha": asked.get("rpo_alpha"),
        "simpo_gamma": asked.get("simpo_gamma"),
    }


def _early_stopping(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The early-stopping rule a request asks for, the server's defaults filled in (the SDK's
    docstring: patience 2, min_delta 0.0, warmup_evals 1)."""
    if not request.get("early_stopping_enabled"):
        return None
    if not request.get("validation_file"):
        raise ApiError(400, "early stopping needs a validation_file", param="validation_file")
    return {
        "patience": _setting(request, "early_stopping_patience", 2, int, 1, 1000),
        "min_delta": _setting(request, "early_stopping_min_delta", 0.0, float, 0.0, math.inf),
        "warmup_evals": _setting(request, "early_stopping_warmup_evals", 1, int, 0, 1000),
    }


def _batch_size(request: Mapping[str, Any], limits: Mapping[str, Any], kind: dict, method: dict):
    """An int batch size within the limits of the training type and method; "max" is the most."""
    bounds = limits["full_training"] if kind["type"] == "Full" else limits["lora_training"]
    most = bounds["max_batch_size_dpo" if method["method"] == "dpo" else "max_batch_size"]
    if request.get("batch_size", "max") == "max":
        return most
    return _setting(request, "batch_size", most, int, bounds["min_batch_size"], most)


# --- HTTP -------------------------------------------------------------------------------------


class _TogetherHandler(_Handler):
    do_PUT = _Handler._serve  # the upload of a file's bytes to its presigned URL


class FakeTogetherServer(FakeOpenAIServer):
    """Runs a ``FakeTogether`` on 127.0.0.1 in a background thread; use as a context manager.
    ``base_url`` is what ``together.Together(base_url=...)`` takes: the server's root."""

    def __init__(self, api: FakeTogether | None = None, port: int = 0) -> None:
        self.api: FakeTogether = api or FakeTogether()
        self.httpd = _Server(("127.0.0.1", port), _TogetherHandler)
        self.httpd.api = self.api
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.started = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeTogetherServer:
        self.start()
        return self


def serve_forever(argv: list[str]) -> int:
    """`harness fake-together`: serves until Ctrl-C, printing a line per job event that matters."""
    options = _serve_options(argv)
    api = _api_from_options(options)
    server = FakeTogetherServer(api, port=options.port)
    server.start()
    print(
        f"fake Together API on {server.base_url} (Ctrl-C stops it); point the together SDK at "
        f"it: together.Together(api_key=..., base_url='{server.base_url}')",
        flush=True,
    )
    return serve_until_interrupted(server)


def _serve_options(argv: list[str]) -> argparse.Namespace:
    """The command line of `harness fake-together`: port, timings and injected faults."""
    parser = argparse.ArgumentParser(
        prog="harness fake-together",
        description="A loopback fake of Together's fine-tuning API, for free dry runs.",
    )
    add = parser.add_argument
    add("--port", type=int, default=8788)
    add("--step-seconds", type=float, default=0.05, help="time per training step")
    add("--queue-seconds", type=float, default=0.5, help="time queued (and as long pending)")
    add("--compress-seconds", type=float, default=0.2, help="time compressing, and uploading")
    add("--cancel-seconds", type=float, default=0.0, help="time a cancel takes to land")
    add("--restart-seconds", type=float, default=1.0, help="time a pre-empted job waits queued")
    add("--api-key", default=None, help="accept only this key (default: any)")
    add("--error-rate", type=float, default=0.0, help="share of requests answered 500")
    add("--rate-limit-rate", type=float, default=0.0, help="share of requests answered 429")
    add("--job-failure-rate", type=float, default=0.0, help="share of jobs that fail half-way")
    add("--drop-creates", type=int, default=0, help="job creates left unanswered")
    add("--restart-jobs", default="", help="creation numbers of jobs pre-empted, e.g. 2,5")
    add("--refuse-jobs", type=int, default=0, help="the next N job creates refused")
    add(
        "--refusal-status",
        type=int,
        choices=(402, 403),
        default=403,
        help="403: no fine-tuning access; 402: out of credit",
    )
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _api_from_options(options: argparse.Namespace) -> FakeTogether:
    """The fake API that `harness fake-together` serves, logging each job event to stdout."""
    timing = TogetherTiming(
        validate_s=options.queue_seconds,
        queue_s=options.queue_seconds,
        step_s=options.step_seconds,
        cancel_s=options.cancel_seconds,
        compress_s=options.compress_seconds,
        upload_s=options.compress_seconds,
        restart_s=options.restart_seconds,
    )
    faults = TogetherFaults(
        error_rate=options.error_rate,
        rate_limit_rate=options.rate_limit_rate,
        job_failure_rate=options.job_failure_rate,
        drop_create_responses=options.drop_creates,
        restart_jobs=frozenset(int(n) for n in options.restart_jobs.split(",") if n.strip()),
        refuse_creates=options.refuse_jobs,
        refusal_status=options.refusal_status,
        seed=options.seed,
    )
    return FakeTogether(timing, faults, options.api_key, log=lambda line: print(line, flush=True))
