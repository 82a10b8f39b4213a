"""Together fine-tuning jobs: the request a trial sends, one paid job per trial, refusals, and a
stopped job read back until Together says what it billed.

Together jobs carry no metadata, so a trial's job is found by its ``suffix`` (up to 40
characters, part of the fine-tuned model's name): the study's name and a hash of the trial key.
Before every create the account's jobs are listed and each checked for that hash; the SDK's own
retries are off for the create (it sends no idempotency key: a retried create whose first answer
was lost would be a second paid job), and this module's loop retries instead, looking first.
A study resumed after its process died retries the dead trial under the same key, so it finds
the job that process started instead of paying for another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from harness.backends.hosted import (
    HostedJobError,
    JobCalls,
    ProviderRefusedError,
    Waits,
    abandon_jobs,
)
from harness.backends.hosted import cancel_and_read_back as read_back_until_over
from harness.backends.hosted import find_or_create as find_or_create_job

# FinetuneResponse.status (together/types/finetune_response.py)
TERMINAL = ("completed", "error", "cancelled")
WAITING = ("pending", "queued")  # after running: pre-empted, waiting to run again
# a job found under a trial's key that will not be followed: it ended unpaid-for. Not
# cancel_requested: such a job still runs (and bills) until the cancel lands, and may finish
# first, so a retry re-attaches to it rather than paying for a second job
DEAD = ("error", "cancelled")
SUFFIX_MAX = 40  # Together's limit on a job's suffix
# how Together words "this model or account cannot be fine-tuned" in a 400/404 answer
REFUSAL = re.compile(
    r"not (?:available|supported|allowed|enabled|eligible|permitted)|"
    r"(?:cannot|can't|unable to) (?:be )?fine-?tun|no access|does not have access|"
    r"unsupported model|model .{0,120}not found|fine-?tuning is (?:disabled|unavailable)",
    re.IGNORECASE,
)
# the request's settings a trial samples or sends: a refused value of one of these is the
# trial's own (the next trial's may be fine), not a refusal of every job
TRIAL_PARAMS = (
    "n_epochs",
    "batch_size",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "dpo_beta",
    "warmup_ratio",
    "weight_decay",
    "training_file",
    "validation_file",
)
NAMES_TRIAL_PARAM = re.compile(
    r"\b(?:" + "|".join(p.replace("_", "[_ ]") for p in TRIAL_PARAMS) + r")\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Patience:
    """How long and how often a Together backend waits, from conf/backend/together.yaml."""

    poll_interval_s: float
    max_poll_interval_s: float
    poll_failures: int
    cancel_wait_s: float
    request_timeout_s: float
    create_attempts: int
    create_grace_s: float

    def waits(self) -> Waits:
        return Waits(
            self.poll_interval_s,
            self.max_poll_interval_s,
            self.poll_failures,
            self.cancel_wait_s,
            self.create_attempts,
            self.create_grace_s,
        )


def transient_errors() -> tuple[type[Exception], ...]:
    """Errors worth retrying: the connection (timeouts too), the server, rate limits, conflicts."""
    import together

    return (
        together.APIConnectionError,
        together.InternalServerError,
        together.RateLimitError,
        together.ConflictError,
    )


def trial_tag(key: str) -> str:
    """The short, deterministic mark of a trial key that its job's suffix carries."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def suffix_for(study: str, key: str) -> str:
    """The job's suffix: the study's name, shortened, and the trial key's tag (<= 40 chars)."""
    tag = trial_tag(key)
    room = SUFFIX_MAX - len(tag) - 1
    slug = re.sub(r"[^a-zA-Z0-9-]", "-", study)[:room].strip("-")
    return f"{slug}-{tag}" if slug else tag


def carries(job: Any, tag: str) -> bool:
    """Whether a listed job is the one started under this tag: its suffix ends with it (or, from a
    server that lists no suffix, its output model's name holds it)."""
    suffix = getattr(job, "suffix", None)
    if suffix:
        return bool(suffix == tag or suffix.endswith(f"-{tag}"))
    return tag in str(getattr(job, "x_model_output_name", None) or "")


def jobs_carrying(client: Any, key: str) -> list[Any]:
    """Every job started under this trial key. Every job of the account is listed and each one
    checked: Together lists jobs with no filter."""
    tag = trial_tag(key)
    return [job for job in client.fine_tuning.list().data if carries(job, tag)]


def find_job(client: Any, key: str) -> Any | None:
    """A job started under this trial key that runs (cancel_requested too) or completed, or
    None."""
    return next((job for job in jobs_carrying(client, key) if job.status not in DEAD), None)


def job_request(cfg: DictConfig, prepared: Any, model: str, suffix: str, shape: JobShape) -> dict:
    """The keyword arguments of ``client.fine_tuning.create`` for this trial's config."""
    limits = prepared.model_limits
    epochs = int(cfg.train.epochs)
    request: dict[str, Any] = {
        "model": model,
        "training_file": prepared.training_file,
        "validation_file": prepared.validation_file,
        "n_epochs": epochs,
        "n_evals": shape.n_evals(epochs, limits),
        "n_checkpoints": shape.n_checkpoints(limits),
        "batch_size": int(cfg.train.batch_size),
        "learning_rate": float(cfg.train.learning_rate),  # absolute, not a multiplier
        "warmup_ratio": float(cfg.train.warmup_ratio),
        "weight_decay": float(cfg.train.weight_decay),
        "suffix": suffix,
        "random_seed": int(cfg.seed),
        "training_method": prepared.method,
        "model_limits": limits,  # read once per study: the SDK would ask again per job
        **training_type_arguments(cfg, prepared.training_type, shape.lora_modules),
    }
    if prepared.method == "dpo":
        request["dpo_beta"] = float(cfg.train.dpo_beta)
    else:
        request["train_on_inputs"] = "auto"  # the SDK's default, said: it warns otherwise
    return request


def training_type_arguments(cfg: DictConfig, training_type: str, modules: str) -> dict[str, Any]:
    if training_type != "Lora":
        return {"lora": False}
    return {
        "lora": True,
        "lora_r": int(cfg.lora.r),
        "lora_alpha": int(cfg.lora.alpha),  # Together takes an integer (check_config says so)
        "lora_dropout": float(cfg.lora.dropout),
        "lora_trainable_modules": modules,
    }


@dataclass(frozen=True)
class JobShape:
    """What every job of a study asks beyond the trial's knobs (conf/backend/together.yaml)."""

    n_evals_per_epoch: int
    checkpoints: int
    lora_modules: str

    def n_evals(self, epochs: int, limits: Any) -> int:
        return evaluations(epochs, self.n_evals_per_epoch, limits)

    def n_checkpoints(self, limits: Any) -> int:
        most = int(limits.max_num_checkpoints) if limits is not None else self.checkpoints
        return max(1, min(self.checkpoints, most))


def evaluations(epochs: int, per_epoch: int, limits: Any) -> int:
    """A job's evaluations of the validation file: so many per epoch, within the model's
    maximum (``limits``: its FinetuneModelLimits; None before they are read). Pruning compares
    trials at the same evaluation number, so each falls at the same share of an epoch whatever
    a trial's epochs."""
    wanted = epochs * per_epoch
    return min(wanted, int(limits.max_num_evals)) if limits is not None else wanted


def is_refusal(exc: Exception) -> bool:
    """Whether Together's answer refuses fine-tuning itself (the account, the key, the model),
    which every next job would get too, rather than this job's settings."""
    import together

    if isinstance(exc, together.PermissionDeniedError | together.AuthenticationError):
        return True
    if getattr(exc, "status_code", None) == 402:  # out of credit: so is every next job
        return True
    if isinstance(exc, together.BadRequestError | together.NotFoundError):
        text = answer_text(exc)
        if error_param(exc) in TRIAL_PARAMS or NAMES_TRIAL_PARAM.search(text):
            return False  # the sampled value is refused: that trial fails alone
        return bool(REFUSAL.search(text))
    return False


def error_param(exc: Exception) -> str:
    """The request setting an error answer names (its ``param``), or ""."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    return str(param or getattr(exc, "param", None) or "")


def answer_text(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:500]
    return str(getattr(exc, "message", None) or exc)[:500]


def refusal_message(model: str, exc: Exception) -> str:
    """One message: what Together answered, and what remains to fine-tune with."""
    status = getattr(exc, "status_code", None) or "no status"
    return (
        f"Together refused to fine-tune {model} (HTTP {status}: {answer_text(exc)}). Every "
        "next trial would get the same answer, so the study stops. What remains: another "
        "Together base model (backend.model=...; Together lists the models it fine-tunes), "
        "backend=openai (OpenAI takes new fine-tuning jobs until 2027-01-06, from "
        "organisations it has not closed them to yet) or backend=azure_openai (the same API "
        "on Azure)."
    )


def find_or_create(
    client: Any, patience: Patience, key: str, request: dict, model: str
) -> tuple[Any, bool]:
    """(job, True) when a job under this trial key already runs or completed, else (a new job,
    False): hosted.find_or_create's loop, with Together's calls."""
    return find_or_create_job(
        key,
        lambda k: find_job(client, k),
        lambda: create(client, request, model),
        transient_errors(),
        patience.waits(),
        "a Together fine-tuning job",
    )


def create(client: Any, request: dict, model: str) -> Any:
    """One create, not retried by the SDK (the SDK first asks the price estimate, then posts
    the job: both without retries). A refusal of fine-tuning itself stops the study."""
    import together

    try:
        return client.with_options(max_retries=0).fine_tuning.create(**request)
    except ValueError as exc:  # the SDK's own check of the settings, before any request
        raise HostedJobError(f"Together's SDK refused the job's settings: {exc}") from None
    except together.APIStatusError as exc:
        if is_refusal(exc):
            raise ProviderRefusedError(refusal_message(model, exc)) from None
        if isinstance(exc, transient_errors()):
            raise  # the caller's loop looks for the job, then tries again
        raise HostedJobError(
            f"Together refused the job (HTTP {exc.status_code}): {answer_text(exc)}"
        ) from None


def cancel_and_read_back(client: Any, patience: Patience, job_id: str) -> Any | None:
    """Cancels the job, then reads it back until it is over (completed, error or cancelled), for
    at most backend.cancel_wait_s (hosted.cancel_and_read_back): a cancel takes a while to land
    (cancel_requested), and a job that finishes first stays completed."""
    reader = client.with_options(  # no SDK retries with their own backoff: the loop's wait bounds
        max_retries=0, timeout=max(1.0, min(patience.request_timeout_s, patience.cancel_wait_s))
    )
    calls = JobCalls(
        job_id,
        client.fine_tuning.cancel,
        reader.fine_tuning.retrieve,
        lambda job: job.status in TERMINAL,
        "Together",
    )
    return read_back_until_over(calls, patience.waits())


def abandon_trial_jobs(
    client: Any, patience: Patience, key: str, billed_usd: Callable[[Any], float | None]
) -> float | None:
    """Cancels every live job carrying a dead trial's key (cancel_requested included: it runs
    on until the cancel lands) and returns the sum of what they all billed, in USD, once over
    (None: no job has a figure)."""

    def read_back(job: Any) -> Any:
        if job.status in TERMINAL:
            return job
        return cancel_and_read_back(client, patience, str(job.id)) or job

    return abandon_jobs(key, jobs_carrying(client, key), read_back, billed_usd, "Together")
