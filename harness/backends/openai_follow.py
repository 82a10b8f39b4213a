"""Following one hosted job of the OpenAI fine-tuning API (OpenAI, Azure OpenAI, servers that
speak it) to its end: its status polled with backoff, its metrics events passed to the reporter in
step order, what it billed once over.

A paused job is not over: OpenAI and Azure pause a job on request, and Azure's Developer training
tier pauses jobs itself when its pre-emptible capacity is taken, then resumes them. The follower
keeps following a paused job; time paused counts neither toward backend.max_job_hours nor toward
the trial's ``train/seconds``, and a pause longer than backend.max_pause_hours fails the trial
(its job is then cancelled, as any trial that stops following its job cancels it).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from harness.backends.base import Reporter
from harness.backends.hosted import Billing, HostedJobError

if TYPE_CHECKING:
    from harness.backends.openai_ft import OpenAIBackend, Prepared

TERMINAL = ("succeeded", "failed", "cancelled")
MAX_EVENT_PAGES = 1000  # x 100 events: more than any job's steps
# a job's per-step metrics (events' data, or the result CSV's columns) -> our metric names
STEP_METRICS = {
    "train_loss": "train/loss",
    "train_mean_token_accuracy": "train/token_accuracy",
    "train_accuracy": "train/token_accuracy",  # the result CSV's name for it
    "valid_loss": "valid/batch_loss",
    "valid_mean_token_accuracy": "valid/batch_token_accuracy",
}


def transient_errors() -> tuple[type[Exception], ...]:
    """Errors worth retrying: the connection (timeouts too), the server, rate limits, conflicts."""
    import openai

    return (
        openai.APIConnectionError,  # includes APITimeoutError
        openai.InternalServerError,
        openai.RateLimitError,
        openai.ConflictError,
    )


class Follower:
    """Polls one job to its end, passing its metrics events to the reporter in step order."""

    def __init__(
        self,
        backend: OpenAIBackend,
        job_id: str,
        reporter: Reporter,
        cfg: DictConfig,
        prepared: Prepared,
    ) -> None:
        self.backend, self.job_id, self.reporter = backend, job_id, reporter
        self.prepared = prepared
        self.estimated_tokens = int(cfg.train.epochs) * prepared.file_tokens
        # until an event says otherwise: what the API's own arithmetic gives
        batches = -(-prepared.n_train // int(cfg.train.batch_size))
        self.expected_steps = int(cfg.train.epochs) * batches
        reporter.set_total_steps(self.expected_steps)
        self.seen: set[str] = set()
        self.reported_steps: set[int] = set()
        self.last_step = 0
        self.total_steps = 0
        self.final_eval: dict[str, float] = {}
        self.status = "unknown"  # the job's status as last read
        self.started = time.monotonic()  # when following began (again at follow)
        self.paused_s = 0.0  # time the job was seen paused, pauses that ended
        self.paused_since: float | None = None  # when the pause going on was first seen

    def follow(self) -> Any:
        """Polls the job until it is over (succeeded, failed or cancelled) and returns it as
        last read. Raises HostedJobError when contact is lost, the job runs past
        backend.max_job_hours (time paused aside) or stays paused past backend.max_pause_hours:
        the caller cancels it."""
        transient = transient_errors()
        backend = self.backend
        delay = backend.poll_interval_s
        self.started = time.monotonic()
        failures = 0
        while True:
            try:
                # status first, then events: a finished job's events are all there by then
                job = backend.client.fine_tuning.jobs.retrieve(self.job_id)
                progressed = self._read_events()
                failures, self.status = 0, str(job.status)
            except transient as exc:
                failures += 1
                if failures >= backend.poll_failures:
                    raise HostedJobError(
                        f"lost contact with fine-tuning job {self.job_id}: {failures} polls "
                        f"failed in a row, the last with {type(exc).__name__}: {exc}"
                    ) from exc
                progressed = False
            else:
                if self.status in TERMINAL:
                    self._note_pause(time.monotonic())
                    return job
            self._check_time(time.monotonic())
            time.sleep(delay)
            delay = (
                backend.poll_interval_s
                if progressed
                else min(backend.max_poll_interval_s, delay * 1.5)
            )

    def _note_pause(self, now: float) -> None:
        """Counts the time the job is seen paused, from the first poll that saw it paused to
        the first that did not."""
        if self.status == "paused" and self.paused_since is None:
            self.paused_since = now
            self.reporter.set_tags({"openai.paused": "true"})
        elif self.status != "paused" and self.paused_since is not None:
            self.paused_s += now - self.paused_since
            self.paused_since = None

    def paused_seconds(self, now: float | None = None) -> float:
        """The time the job was seen paused so far (a pause still going on counts to now)."""
        now = time.monotonic() if now is None else now
        return self.paused_s + (0.0 if self.paused_since is None else now - self.paused_since)

    def _check_time(self, now: float) -> None:
        backend = self.backend
        self._note_pause(now)
        if self.paused_since is not None and now - self.paused_since > backend.max_pause_s:
            raise HostedJobError(
                f"fine-tuning job {self.job_id} stayed paused for "
                f"{(now - self.paused_since) / 3600:.3g} h, longer than "
                f"backend.max_pause_hours={backend.max_pause_s / 3600:g}: cancelled (the "
                "provider paused it, as Azure's Developer tier does when its capacity is "
                "taken, and did not resume it; raise backend.max_pause_hours to wait longer, "
                "or train on a tier that is not pre-empted)"
            )
        if now - self.started - self.paused_seconds(now) > backend.max_job_s:
            raise HostedJobError(
                f"fine-tuning job {self.job_id} still {self.status} after "
                f"{backend.max_job_s / 3600:g} h of training (backend.max_job_hours; time "
                "paused not counted): cancelled"
            )

    def _read_events(self) -> bool:
        """Reports metrics events not seen before, oldest first. Events come newest first, a
        page at a time: read pages until one holds an event already seen."""
        fresh = []
        page = self.backend.client.fine_tuning.jobs.list_events(self.job_id, limit=100)
        for _ in range(MAX_EVENT_PAGES):  # bounded, should a server repeat a page
            for event in page.data:
                if event.id in self.seen:
                    break
                fresh.append(event)
            else:
                if page.has_more and page.data:
                    page = self.backend.client.fine_tuning.jobs.list_events(
                        self.job_id, limit=100, after=page.data[-1].id
                    )
                    continue
            break
        metrics = [e.data for e in fresh if e.type == "metrics" and isinstance(e.data, dict)]
        for data in sorted(metrics, key=lambda d: int(d.get("step", 0))):
            self._report(data)
        self.seen.update(e.id for e in fresh)
        return bool(fresh)

    def _report(self, data: Mapping[str, Any]) -> None:
        step = int(data["step"])
        total = int(data.get("total_steps") or self.total_steps)
        if total and total != (self.total_steps or self.expected_steps):
            self.reporter.set_total_steps(total)  # the job's own count replaces our estimate
        self.total_steps = total
        self.last_step = max(self.last_step, step)
        self.reported_steps.add(step)
        known = {k: v for k, v in data.items() if k in STEP_METRICS and v is not None}
        metrics = {STEP_METRICS[k]: float(v) for k, v in known.items()}
        if data.get("full_valid_loss") is not None:  # an epoch end: the whole validation file
            # the spend so far, once an epoch (not per step: it is stored with the trial)
            metrics["cost_usd"] = self.tokens_so_far() * self.prepared.usd_per_token
            loss = float(data["full_valid_loss"])
            self.final_eval = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
            accuracy = data.get("full_valid_mean_token_accuracy")
            if accuracy is not None:
                self.final_eval["eval/token_accuracy"] = float(accuracy)
            metrics.update(self.final_eval)
        self.reporter.report(step, metrics)  # may raise TrialPruned: the caller cancels

    def tokens_so_far(self) -> int:
        total = self.total_steps or self.expected_steps
        return round(self.estimated_tokens * min(1.0, self.last_step / max(1, total)))

    def billing(self, job: Any | None) -> Billing:
        """What the job cost, once over: its ``trained_tokens``, which the API reports as the
        billable tokens it processed (a job that finished despite a cancel: every epoch;
        one cancelled mid-run: the steps it did, by OpenAI's account; Azure says it charges
        nothing for cancelled jobs, and harness records what the job reports). Without that
        figure, an estimate that says so; a job not seen to end may run on to the end, so it
        counts whole."""
        status = str(getattr(job, "status", None) or "unknown")
        reported = getattr(job, "trained_tokens", None)
        unreported = "estimate: the provider reported no trained_tokens"
        if status in TERMINAL and reported is not None:
            tokens, source = int(reported), "billed"
        elif status in ("failed", "cancelled"):
            tokens, source = self.tokens_so_far(), f"{unreported}; the steps seen"
        elif status == "succeeded":
            tokens, source = self.estimated_tokens, f"{unreported}; every epoch"
        elif job is None:
            tokens = self.estimated_tokens
            source = "estimate: the job could not be read back; counted whole"
        else:
            tokens = self.estimated_tokens
            source = (
                f"estimate: the job was still {status} when harness stopped waiting "
                "(backend.cancel_wait_s); counted whole, as it may run to its end"
            )
        step = (self.total_steps or self.expected_steps) if status == "succeeded" else 0
        return Billing(
            status, tokens, tokens * self.prepared.usd_per_token, source, max(step, self.last_step)
        )

    def report_result_rows(self, text: str) -> None:
        """The result file's rows for steps no event reported (events can be missed)."""
        for row in csv.DictReader(io.StringIO(text)):
            try:
                step = int(float(row["step"]))
            except (KeyError, ValueError):
                continue
            if step in self.reported_steps:
                continue
            metrics = {}
            for column, name in STEP_METRICS.items():
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    metrics[name] = float(row[column])
            if metrics:
                self.reporter.report(step, metrics)
                self.reported_steps.add(step)


def decode_result_file(raw: bytes) -> str:
    """A result CSV, served plain or base64-encoded."""
    text = raw.decode("utf-8", errors="replace").strip()
    if text.startswith("step"):
        return text + "\n"
    try:
        decoded = base64.b64decode(raw.strip(), validate=True).decode("utf-8").strip()
    except ValueError:
        return text + "\n"
    return decoded + "\n"
