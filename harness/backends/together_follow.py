"""Following one Together job to its end: its metrics to the reporter at their steps, its
pauses, and what it billed.

Each poll reads the job (``fine_tuning.retrieve``), then its events (``list_events``: the
steps' total, a restart, an error's message) and its metrics (``list_metrics``: one row per
logged step, oldest first). A row's training loss is ``train/loss`` at its step; a row with a
validation loss is an evaluation (``eval/loss``, ``eval/perplexity`` and the spend so far as
``cost_usd``): what Optuna may prune on, which cancels the job.

Together has no "paused" status, but a pre-empted job goes back from running to queued or
pending (event ``job_restarted``) and later runs on. Harness follows it through; the time it
waits after it first ran is measured between polls (so to a poll interval), left out of
backend.max_job_hours and of the trial's ``train/seconds``, and recorded as ``paused_seconds``.
One wait longer than backend.max_pause_hours (a job not resumed within it, as on OpenAI and Azure)
cancels the job and fails the trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from harness.backends.base import Reporter
from harness.backends.hosted import Billing, HostedJobError
from harness.backends.together_jobs import TERMINAL, WAITING, Patience, transient_errors

NANODOLLARS_PER_USD = 1_000_000_000  # FinetuneResponse.total_price's unit (see billing)
# where a metrics row (a flat dict) keeps each figure, by the names Together's CLI reads
STEP_KEYS = ("train/global_step", "global_step", "step")
TRAIN_LOSS_KEYS = ("train/loss", "train_loss", "loss")
EVAL_LOSS_KEYS = ("eval/loss", "eval_loss", "valid_loss", "validation/loss")
EVAL_METRICS = ("eval/loss", "eval/perplexity")


@dataclass(frozen=True)
class Limits:
    max_job_s: float  # backend.max_job_hours, pauses left out
    max_pause_s: float  # backend.max_pause_hours: one pause, not resumed within it


class Pauses:
    """Time a job waited (queued or pending) after it had run: pre-empted. A job seen running
    before, or whose events tell of a restart not counted yet, is waiting pre-empted."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.since: float | None = None
        self.restarts = 0  # pauses counted
        self.has_run = False

    def observe(self, status: str, now: float, restarts_seen: int) -> None:
        waiting = status in WAITING
        pre_empted = waiting and (self.has_run or restarts_seen > self.restarts)
        if pre_empted and self.since is None:
            self.since, self.restarts = now, self.restarts + 1
        elif not waiting and self.since is not None:
            self.total_s += now - self.since
            self.since = None
        if not waiting:
            self.has_run = True

    def seconds(self, now: float) -> float:
        return self.total_s + self.current(now)

    def current(self, now: float) -> float:
        """How long the wait going on has lasted (0 when the job is not waiting pre-empted)."""
        return now - self.since if self.since is not None else 0.0


def first(row: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


class Follower:
    """Polls one job to its end, passing its metrics to the reporter in step order."""

    def __init__(
        self,
        client: Any,
        patience: Patience,
        job_id: str,
        reporter: Reporter,
        cfg: DictConfig,
        prepared: Any,
    ) -> None:
        self.client, self.patience, self.job_id, self.reporter = client, patience, job_id, reporter
        self.prepared = prepared
        self.estimated_tokens = prepared.billed_tokens(int(cfg.train.epochs))
        # until the job says otherwise (packing changes it): examples / batch, per epoch
        self.total_steps = int(cfg.train.epochs) * -(-prepared.n_train // int(cfg.train.batch_size))
        reporter.set_total_steps(self.total_steps)
        self.seen_rows: set[tuple[int, str]] = set()
        self.seen_events: set[tuple[str, str, str]] = set()
        self.last_step = 0
        self.final_eval: dict[str, float] = {}
        self.perplexity = prepared.method != "dpo"  # exp(DPO loss) means nothing
        self.error_message = ""
        self.restarts_seen = 0  # job_restarted events
        self.pauses = Pauses()

    def follow(self, limits: Limits) -> Any:
        """The job once it is over (completed, error or cancelled); HostedJobError when contact
        is lost, the job overruns backend.max_job_hours (pauses aside) or waits past
        backend.max_pause_hours."""
        transient, patience = transient_errors(), self.patience
        delay, failures, status = patience.poll_interval_s, 0, "unknown"
        started = time.monotonic()
        while True:
            try:  # status first, then metrics: a finished job's rows are all there by then
                job = self.client.fine_tuning.retrieve(self.job_id)
                self._read_events()
                progressed = self._read_metrics()
                failures, status = 0, job.status
            except transient as exc:
                failures += 1
                if failures >= patience.poll_failures:
                    raise HostedJobError(
                        f"lost contact with Together job {self.job_id}: {failures} polls failed "
                        f"in a row, the last with {type(exc).__name__}: {exc}"
                    ) from exc
                progressed = False
            else:
                self.pauses.observe(status, time.monotonic(), self.restarts_seen)
                if status in TERMINAL:
                    return job
            self._check_time(limits, status, time.monotonic() - started)
            time.sleep(delay)
            delay = (
                patience.poll_interval_s
                if progressed
                else min(patience.max_poll_interval_s, delay * 1.5)
            )

    def _check_time(self, limits: Limits, status: str, elapsed: float) -> None:
        now = time.monotonic()
        waiting, paused = self.pauses.current(now), self.pauses.seconds(now)
        if waiting > limits.max_pause_s:
            raise HostedJobError(
                f"Together job {self.job_id} has waited {waiting / 3600:.2f} h since it was "
                f"pre-empted (restart {self.pauses.restarts}), past backend.max_pause_hours="
                f"{limits.max_pause_s / 3600:g}: cancelled"
            )
        if elapsed - paused > limits.max_job_s:
            raise HostedJobError(
                f"Together job {self.job_id} still {status} after "
                f"{limits.max_job_s / 3600:g} h (backend.max_job_hours, pauses aside): cancelled"
            )

    def _read_events(self) -> None:
        """The job's total steps, and an error's message, from events not seen before."""
        for event in self.client.fine_tuning.list_events(self.job_id).data:
            mark = (str(event.created_at), str(event.type), str(event.message))
            if mark in self.seen_events:
                continue
            self.seen_events.add(mark)
            if event.total_steps and int(event.total_steps) != self.total_steps:
                self.total_steps = int(event.total_steps)
                self.reporter.set_total_steps(self.total_steps)  # the job's own count
            if event.type == "job_restarted":
                self.restarts_seen += 1
            if event.type == "job_error":
                self.error_message = str(event.message)

    def _read_metrics(self) -> bool:
        """Reports metrics rows not seen before, in step order; True if there were any."""
        since = {"global_step_from": self.last_step} if self.last_step else {}
        rows = self.client.fine_tuning.list_metrics(self.job_id, **since).metrics or []
        fresh = []
        for row in rows:
            step = first(row, STEP_KEYS)
            if step is None or step < 1:
                continue
            kind = "eval" if first(row, EVAL_LOSS_KEYS) is not None else "train"
            if (int(step), kind) not in self.seen_rows:
                self.seen_rows.add((int(step), kind))
                fresh.append((int(step), kind == "train", row))
        for step, _, row in sorted(fresh, key=lambda f: (f[0], not f[1])):  # train, then eval
            self._report(step, row)
        return bool(fresh)

    def _report(self, step: int, row: Mapping[str, Any]) -> None:
        self.last_step = max(self.last_step, step)
        metrics: dict[str, float] = {}
        loss = first(row, TRAIN_LOSS_KEYS)
        if loss is not None:
            metrics["train/loss"] = loss
        eval_loss = first(row, EVAL_LOSS_KEYS)
        if eval_loss is not None:  # an evaluation: the whole validation file
            self.final_eval = {"eval/loss": eval_loss}
            if self.perplexity:
                self.final_eval["eval/perplexity"] = math.exp(min(eval_loss, 50.0))
            metrics.update(self.final_eval)
            # the spend so far, once an evaluation (not per step: it is stored with the trial)
            metrics["cost_usd"] = self.tokens_so_far() * self.prepared.usd_per_token
        if metrics:
            self.reporter.report(step, metrics)  # may raise TrialPruned: the caller cancels

    def finish_steps(self) -> None:
        """A completed job's length is the steps it reported: the progress bar's last word."""
        if self.last_step and self.last_step != self.total_steps:
            self.total_steps = self.last_step
            self.reporter.set_total_steps(self.total_steps)

    def tokens_so_far(self) -> int:
        return round(self.estimated_tokens * min(1.0, self.last_step / max(1, self.total_steps)))

    def billing(self, job: Any | None) -> Billing:
        """What the job cost, once over: its ``total_price``, which Together reports in
        nanodollars (its CLI divides it by 1e9 to print dollars), with its ``token_count``.
        Without a price, its token count x backend price, and without that an estimate that
        says so; a job not seen to end may run on to its end, so it counts whole."""
        status = str(getattr(job, "status", None) or "unknown")
        price = getattr(job, "total_price", None)
        counted = getattr(job, "token_count", None)
        step = self.total_steps if status == "completed" else 0
        step = max(step, self.last_step)
        if status in TERMINAL and price is not None:
            tokens = int(counted) if counted is not None else self.estimated_tokens
            return Billing(status, tokens, price / NANODOLLARS_PER_USD, "billed", step, "together")
        tokens, source = self._unpriced(job, status, counted)
        return Billing(
            status, tokens, tokens * self.prepared.usd_per_token, source, step, "together"
        )

    def _unpriced(self, job: Any | None, status: str, counted: Any) -> tuple[int, str]:
        unpriced = "estimate: Together reported no total_price"
        if status in TERMINAL and counted is not None:
            return int(counted), f"{unpriced}; its token_count x backend price"
        if status in ("error", "cancelled"):
            return self.tokens_so_far(), f"{unpriced}; the steps seen"
        if status == "completed":
            return self.estimated_tokens, f"{unpriced}; every epoch"
        if job is None:
            return self.estimated_tokens, "estimate: the job could not be read back; counted whole"
        return self.estimated_tokens, (
            f"estimate: the job was still {status} when harness stopped waiting "
            "(backend.cancel_wait_s); counted whole, as it may run to its end"
        )
