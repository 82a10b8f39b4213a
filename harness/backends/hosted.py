"""What every hosted fine-tuning backend shares, whatever the provider: its errors (a refusal of
new jobs stops the study), the API key read from the environment or a file (never the config),
the loops that find or create a trial's one paid job and that cancel a job and read it back
until it says what it billed, what a stopped job billed and how it is recorded, and the
fine-tuned model scored on the test split through chat completions by the same metric code as
the local backend.

Provider modules (``openai_ft``: OpenAI, Azure OpenAI and servers that speak that API;
``together_ft``: Together) hold their own job requests and follow their own job states; they
call these functions rather than share a base class.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from harness.backends.base import Reporter
from harness.chat_data import Chat
from harness.config import ConfigError
from harness.secrets import remember

UNPARSED = "<unparsed>"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
KEY_FILE_MAX_BYTES = 4096  # what is read of backend.api_key_file: its first line at most


class HostedJobError(RuntimeError):
    """A job that failed, was cancelled by someone else, or could not be created or followed."""


class ProviderRefusedError(HostedJobError):
    """The provider refuses to create fine-tuning jobs at all (past OpenAI's cutoff, an
    organisation without access, a model no longer trainable): every next trial would get the
    same answer, so the first one stops the study with this message."""


Job = TypeVar("Job")


@dataclass(frozen=True)
class Waits:
    """How long and how often a hosted backend waits on its jobs (conf/backend/<provider>.yaml)."""

    poll_interval_s: float
    max_poll_interval_s: float
    poll_failures: int
    cancel_wait_s: float
    create_attempts: int
    create_grace_s: float


def find_or_create(
    key: str,
    find: Callable[[str], Job | None],
    create: Callable[[], Job],
    transient: tuple[type[Exception], ...],
    waits: Waits,
    what: str,
) -> tuple[Job, bool]:
    """(job, True) when ``find`` sees a job under this trial key (one that runs or succeeded),
    else (the job ``create`` made, False). Every attempt looks first; the SDKs' own retries are
    off for the create (they send no idempotency key: a retried create whose answer was lost
    would be a second paid job). Any failure of a create (a dropped connection, a timeout, a
    gateway's 5xx) may have made the job all the same, and the provider may list it only a while
    later: every look after one waits at least backend.create_grace_s. Once the attempts are
    spent the loop looks once more, so a job made by a lost create is re-attached to. ``what``
    names the job in the error when none could be made."""
    last_error: Exception | None = None
    create_failed = False
    for attempt in range(waits.create_attempts + 1):
        if last_error is not None:
            wait = min(waits.max_poll_interval_s, waits.poll_interval_s * 2 ** (attempt - 1))
            time.sleep(max(wait, waits.create_grace_s) if create_failed else wait)
        try:
            job = find(key)
        except transient as exc:
            last_error = exc
            continue
        if job is not None:
            return job, True
        if attempt == waits.create_attempts:
            break  # the last round only looks: a create lost before may show up now
        try:
            return create(), False
        except transient as exc:
            last_error, create_failed = exc, True
    raise HostedJobError(
        f"could not create {what} after {waits.create_attempts} attempts: "
        f"{type(last_error).__name__}: {last_error}"
    )


@dataclass(frozen=True)
class JobCalls:
    """One job's calls to its provider, for ``cancel_and_read_back``. ``retrieve`` should not
    retry on its own (the SDK's backoff would outlast backend.cancel_wait_s)."""

    job_id: str
    cancel: Callable[[str], Any]
    retrieve: Callable[[str], Any]
    is_over: Callable[[Any], bool]
    provider: str  # who runs the job, in the warning: "OpenAI", "Together"


def cancel_and_read_back(calls: JobCalls, waits: Waits) -> Any | None:
    """Cancels the job, then reads it back until it is over, for at most
    backend.cancel_wait_s: the job as last read, None if it could not be read. A cancel takes a
    while to land, and a job that finishes first stays finished (its cancel refused): only the
    job's final state says what it billed."""
    job = None
    try:
        job = calls.cancel(calls.job_id)
    except Exception:  # refused for a finished job, or the API is down: read it back anyway
        job = None
    deadline = time.monotonic() + waits.cancel_wait_s
    delay, failures, looked, said = waits.poll_interval_s, 0, False, False
    while job is None or not calls.is_over(job):
        if job is not None or failures:  # looked already: wait before looking again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if looked and not said:  # read back and still going: say why the trial waits
                said = True
                _say_waiting(calls, str(getattr(job, "status", None) or "unread"), waits)
            time.sleep(min(delay, remaining))
            delay = min(waits.max_poll_interval_s, delay * 1.5)
        try:
            job = calls.retrieve(calls.job_id)
            looked = True
        except Exception:  # the API is down or refuses: look again, a few times
            failures += 1
            if failures >= waits.poll_failures:
                break
    return job


def _say_waiting(calls: JobCalls, status: str, waits: Waits) -> None:
    logging.getLogger("harness").warning(
        "%s job %s is still %s after its cancel: waiting up to %g s (backend.cancel_wait_s) "
        "to record what it billed",
        calls.provider,
        calls.job_id,
        status,
        waits.cancel_wait_s,
    )


def abandon_jobs(
    key: str,
    jobs: Sequence[Any],
    read_back: Callable[[Any], Any],
    billed_usd: Callable[[Any], float | None],
    provider: str,
) -> float | None:
    """What every job carrying a dead trial's key billed, in USD, once each is over: ``read_back``
    cancels a live one and returns it as last read; ``billed_usd`` is a job's figure (None: not
    over, or none). None only where no job has a figure: the caller keeps the trial's estimate."""
    total: float | None = None
    for job in jobs:
        job = read_back(job)
        usd = billed_usd(job)
        if usd is None:
            continue
        total = (total or 0.0) + usd
        logging.getLogger("harness").warning(
            "the %s job %s of an abandoned trial (key %s) ended %s: billed $%.4f",
            provider,
            job.id,
            key,
            job.status,
            usd,
        )
    return total


class MissingApiKeyError(ConfigError):
    pass


class RefusedApiKeyError(ConfigError):
    """The provider answered 401 or 403 to the key: wrong, revoked, or without fine-tuning."""


@dataclass(frozen=True)
class ApiKey:
    """Where a provider's key is read from: a file's first line (``backend.api_key_file``) or an
    environment variable (``backend.api_key_env``); never the config, so a key cannot reach a
    logged config. A loopback server (the fakes) is sent a placeholder when neither is set."""

    env: str
    file: str | None
    base_url: str | None

    def source(self) -> str:
        """Where ``read`` reads the key from, in words (never the key)."""
        if self.file:
            return f"the file {Path(self.file).expanduser()} (backend.api_key_file)"
        if os.environ.get(self.env, "").strip():
            return f"the environment variable {self.env} (backend.api_key_env)"
        return (
            f"nowhere: {self.env} is not set (backend.api_key_env), so a placeholder "
            "was sent to the loopback server"
        )

    def read(self) -> str:
        if self.file:
            path = Path(self.file).expanduser()
            if not path.exists():
                raise MissingApiKeyError(f"backend.api_key_file: {path} does not exist")
            if not path.is_file():  # a folder, or a device such as /dev/zero (read forever)
                raise MissingApiKeyError(
                    f"backend.api_key_file: {path} is not a regular file; give the file that "
                    "holds the key on its first line"
                )
            with path.open("rb") as handle:  # a key is short: the first line, bounded
                first = handle.readline(KEY_FILE_MAX_BYTES).decode("utf-8", "replace").strip()
            if first:
                remember(first)  # masked wherever it might show up
                return first
            raise MissingApiKeyError(f"backend.api_key_file: {path} is empty")
        key = os.environ.get(self.env, "").strip()
        if key:
            remember(key)
            return key
        if self.base_url and urlsplit(self.base_url).hostname in LOOPBACK_HOSTS:
            return "harness-loopback"  # a local server (the fakes) needs no real key
        raise MissingApiKeyError(
            f"no API key: set the environment variable {self.env} (export "
            f"{self.env}=...), or put the key in a file and set "
            "backend.api_key_file=PATH. harness never reads a key from the config, so it "
            "cannot end up in logged configs."
        )


@dataclass(frozen=True)
class Billing:
    """What a job cost once it is over: the provider's ``trained_tokens`` x price where it
    reports them, else an estimate, and ``source`` says which."""

    status: str  # the job's last status seen
    tokens: int
    usd: float
    source: str  # "billed" (the provider's trained_tokens), else why the figure is an estimate
    step: int  # the step the job reached, as far as harness knows: where the cost is logged
    provider: str = "openai"  # the prefix of its MLflow tags

    @property
    def billed(self) -> bool:
        return self.source == "billed"

    def tags(self) -> dict[str, str]:
        p = self.provider
        tags = {f"{p}.final_status": self.status, f"{p}.cost_source": self.source}
        return {**tags, f"{p}.trained_tokens": str(self.tokens)} if self.billed else tags


def record_billing(reporter: Reporter, bill: Billing) -> None:
    """Reports what a stopped job billed as its trial's ``cost_usd``, at the step the job
    reached. Never raises but for Ctrl-C: the trial's own ending is what goes on up."""
    metrics = {"cost_usd": bill.usd}
    if bill.billed:
        metrics["trained_tokens"] = float(bill.tokens)
    try:
        reporter.set_tags(bill.tags())
        reporter.report(bill.step, metrics)  # no evaluation in it: nothing to prune on
    except Exception as exc:
        logging.getLogger("harness").warning(
            "could not record what a job billed ($%.4f, %s): %s", bill.usd, bill.source, exc
        )


def parse_label(answer: str, labels: list[str]) -> str:
    """The label an answer names: an exact match (case, spaces and punctuation aside), else the
    only label mentioned in it as a whole word; otherwise UNPARSED, which counts as wrong."""

    def norm(text: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())

    said = norm(answer)
    by_norm = {norm(label): label for label in labels}
    if said in by_norm:
        return by_norm[said]
    mentioned = [label for n, label in by_norm.items() if re.search(rf"\b{re.escape(n)}\b", said)]
    return mentioned[0] if len(mentioned) == 1 else UNPARSED


# what a chat-completions client answers for one prompt: (text, prompt tokens, completion tokens)
Answer = tuple[str, int, int]


def chat_completer(client: Any, model: str, max_tokens: int, seed: int) -> Callable[[Chat], Answer]:
    """Asks ``model`` one prompt at temperature 0 through a provider SDK's
    ``client.chat.completions.create`` (OpenAI's, Azure's and Together's take the same
    arguments and answer the same shape)."""

    def ask(chat: Chat) -> Answer:
        response = client.chat.completions.create(
            model=model,
            messages=chat.prompt,
            temperature=0,
            max_tokens=max_tokens,
            seed=seed,
        )
        usage = response.usage
        return (
            response.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    return ask


@dataclass(frozen=True)
class Scoring:
    """What scoring a fine-tuned model on a split needs to know of the study's data."""

    task: str
    labels: list[str]
    chats: Sequence[Chat]
    concurrency: int


def score_chats(
    ask: Callable[[Chat], Answer], scoring: Scoring
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The model's metrics on ``scoring.chats`` (unprefixed names) and its answers, one row per
    chat: classification answers parsed back to labels, so accuracy and F1 come from the same
    code as the local backend's; generation answers scored by BLEU, ROUGE and exact match;
    a preference pair's answer by which of the pair's two answers it is closer to."""
    with ThreadPoolExecutor(max(1, scoring.concurrency)) as pool:
        answers = list(pool.map(ask, scoring.chats))
    texts = [answer for answer, _, _ in answers]
    predictions = [
        _prediction(chat, text, scoring) for chat, text in zip(scoring.chats, texts, strict=True)
    ]
    scores = _task_scores(scoring, texts, predictions)
    scores["prompt_tokens"] = float(sum(p for _, p, _ in answers))
    scores["completion_tokens"] = float(sum(c for _, _, c in answers))
    return {k: float(v) for k, v in scores.items()}, predictions


def _prediction(chat: Chat, answer: str, scoring: Scoring) -> dict[str, Any]:
    """One row of the predictions file: what was expected (and not wanted), what came back."""
    row: dict[str, Any] = {"source": chat.source, "expected": chat.answer}
    if scoring.task == "preference":
        row["rejected"] = chat.rejected.strip()
    row["answer"] = answer
    if scoring.task == "classification":
        row["label"] = parse_label(answer, scoring.labels)
    return row


def _task_scores(
    scoring: Scoring, answers: list[str], predictions: list[dict[str, Any]]
) -> dict[str, float]:
    from harness.metrics import classification_metrics, generation_metrics, preference_metrics

    expected = [c.answer for c in scoring.chats]
    if scoring.task == "preference":
        return preference_metrics(answers, expected, [c.rejected for c in scoring.chats])
    if scoring.task != "classification":
        return generation_metrics(answers, expected)
    scores = classification_metrics(expected, [p["label"] for p in predictions], scoring.labels)
    scores["unparsed"] = sum(p["label"] == UNPARSED for p in predictions) / len(expected)
    return scores


def score_test_split(
    ask: Callable[[Chat], Answer], scoring: Scoring, workdir: Path, title: str
) -> tuple[dict[str, float], list[Path]]:
    """The fine-tuned model's test/* metrics, and its answers (and for classification the
    confusion matrix) as files in the trial's folder."""
    scores, predictions = score_chats(ask, scoring)
    path = workdir / "test_predictions.jsonl"
    path.write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
        encoding="utf-8",
    )
    artifacts = [path]
    if predictions and scoring.task == "classification":
        from harness.metrics import save_confusion_matrix

        truth = [p["expected"] for p in predictions]
        predicted = [p["label"] for p in predictions]
        labels = scoring.labels + ([UNPARSED] if UNPARSED in predicted else [])
        artifacts.append(
            save_confusion_matrix(
                truth, predicted, labels, workdir / "confusion_matrix.png", f"{title}: test split"
            )
        )
    return {f"test/{k}": v for k, v in scores.items()}, artifacts
