"""One trial's run: the backend trains, a TrialReporter passes its metrics on (MLflow, Optuna's
pruner, the live display), and the trial's MLflow run is closed in the state it ended in."""

from __future__ import annotations

import contextlib
import errno
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from harness import pareto_pruner
from harness.backends.base import TrialResult, TrialSpec
from harness.config import with_params
from harness.secrets import redact_text
from harness.study.plan import Plan
from harness.tracking import TrackedRun, Tracker
from harness.tracking.records import TAG_LIMIT

# (trial number, step, total steps or 0 if unknown, the metrics of this step): live progress
ProgressCallback = Callable[[int, int, int, Mapping[str, float]], None]


class TrialReporter:
    """Sends metrics to MLflow and the objective metric to Optuna, which may prune; passes the
    trial's spend (``cost_usd``) on to ``on_cost`` and each step to ``on_progress``."""

    def __init__(
        self,
        run: TrackedRun,
        metric: str,
        trial: optuna.Trial | None = None,
        on_cost: Callable[[float], None] | None = None,
        prune: bool = True,
        on_progress: ProgressCallback | None = None,
        number: int = -1,
    ) -> None:
        self.run, self.metric, self.trial, self.on_cost = run, metric, trial, on_cost
        # False in multi-objective studies: Optuna's pruners judge one objective; there a
        # ParetoPruner ranks the objective vectors this reporter stores (harness.pareto_pruner)
        self.prune = prune
        pruner = trial.study.pruner if trial is not None else None
        self.pareto = pruner if isinstance(pruner, pareto_pruner.ParetoPruner) else None
        self.started = time.monotonic()  # train/seconds so far, midway
        self.on_progress, self.number = on_progress, number
        self.evaluations = 0
        self.step = 0  # the last step reported: a pruned trial's compute
        self.total_steps = 0
        self.cost_usd: float | None = None

    def set_total_steps(self, total: int) -> None:
        self.total_steps = int(total)
        if self.on_progress is not None:
            self.on_progress(self.number, self.step, self.total_steps, {})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.run.set_tags(tags)

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        is_eval = self.metric in metrics
        self.step = max(self.step, step)
        self.run.log_metrics(step, metrics, buffered=True)  # Optuna hears at once, MLflow soon
        if self.on_progress is not None:
            self.on_progress(self.number, step, self.total_steps, metrics)
        cost = metrics.get("cost_usd")
        if cost is not None and cost != self.cost_usd:
            self.cost_usd = float(cost)
            if self.on_cost is not None:
                self.on_cost(self.cost_usd)
        if is_eval and self.trial is not None and self.prune:
            # Optuna's step is the evaluation index, so trials with different batch sizes
            # (different step counts per epoch) are compared at the same point.
            self.evaluations += 1
            self.trial.report(float(metrics[self.metric]), self.evaluations)
            if self.trial.should_prune():
                self.trial.set_user_attr("steps", self.step)  # what it cost: the report sums it
                raise optuna.TrialPruned(f"pruned at evaluation {self.evaluations} (step {step})")
        if is_eval and self.trial is not None and self.pareto is not None:
            self._report_vector(self.trial, self.pareto, step, metrics)

    def _report_vector(
        self,
        trial: optuna.Trial,
        pruner: pareto_pruner.ParetoPruner,
        step: int,
        metrics: Mapping[str, float],
    ) -> None:
        """A multi-objective study's evaluation: the trial's objectives so far stored (the
        evaluation index is the step, as above) and ranked against the finished trials'."""
        self.evaluations += 1
        values = pareto_pruner.values_at(
            pruner.goals,
            metrics,
            seconds=time.monotonic() - self.started,
            steps=self.step,
            cost_usd=self.cost_usd,
        )
        if values is None:
            return
        pareto_pruner.report_values(trial, self.evaluations, values)
        if pruner.should_prune(trial.study, self.evaluations, values):
            trial.set_user_attr("steps", self.step)
            raise optuna.TrialPruned(
                f"pruned at evaluation {self.evaluations} (step {step}): its objectives rank "
                "behind most completed trials' there (Pareto rank)"
            )


@dataclass
class TrialOutcome:
    number: int
    state: str
    params: dict[str, Any]
    value: float | None  # the (first) objective
    seconds: float
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    cost_usd: float | None = None  # where money is spent
    values: list[float] | None = None  # every objective of a multi-objective study


def run_trial(
    plan: Plan,
    tracker: Tracker,
    params: dict[str, Any],
    number: int,
    run_name: str,
    workdir: Path,
    tags: Mapping[str, str],
    trial: optuna.Trial | None = None,
    parent_id: str | None = None,
    save_model: bool = True,
    key: str = "",
    on_cost: Callable[[float], None] | None = None,
    on_progress: ProgressCallback | None = None,
    of_trial: bool = True,
) -> tuple[TrialResult, TrackedRun]:
    """One trial through the backend, recorded in its own MLflow run. Exceptions propagate after
    the run is closed with the right state. ``of_trial=False``: a run of no Optuna trial (a
    confirm run), closed without an ``optuna.trial_state`` tag."""
    cfg = with_params(plan.cfg, params)
    workdir.mkdir(parents=True, exist_ok=True)
    goals = plan.objectives
    metric, direction = str(cfg.sweep.metric), str(cfg.sweep.direction)
    spec = TrialSpec(
        number, cfg, plan.prepared, workdir, save_model, key, metric=metric, direction=direction
    )
    run = tracker.start_run(run_name, params, tags, cfg, parent_id)
    try:  # at once: an interrupt from here on still closes the run
        reporter = TrialReporter(
            run, cfg.sweep.metric, trial, on_cost, len(goals) == 1, on_progress, number
        )
        started = time.monotonic()
        result = plan.backend.run(spec, reporter)
        _record_result(result, time.monotonic() - started, goals, run, on_cost)
        if result.hosted_model:
            try:  # a paid result is not thrown away for want of a model entry
                tracker.log_hosted_model(run.run_id, run_name, result.hosted_model)
            except Exception as exc:
                run.set_tags({"harness.hosted_model_error": redact_text(repr(exc))[:TAG_LIMIT]})
    except optuna.TrialPruned as pruned:
        _end_pruned(run, goals[0][0], pruned)  # the (first) objective: sweep.metric alone
        raise
    except BaseException as exc:  # KeyboardInterrupt too: the run must not stay RUNNING
        _end_failed(run, exc, of_trial)
        raise
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"} if of_trial else {})
    return result, run


def _record_result(
    result: TrialResult,
    seconds: float,
    goals: list[tuple[str, str]],
    run: TrackedRun,
    on_cost: Callable[[float], None] | None,
) -> None:
    """A trained trial's final metrics and artifacts into its run; a non-finite objective
    fails the trial."""
    # what every trial costs in time and compute, whatever the backend: objectives to trade
    # (a hosted job the provider held paused reports that time: its capacity, not the trial's)
    result.metrics.setdefault("train/seconds", seconds - result.metrics.get("paused_seconds", 0.0))
    result.metrics.setdefault("train/steps", float(result.steps))
    for metric, _ in goals:
        value = result.metrics.get(metric, math.nan)
        if not math.isfinite(value):
            raise RuntimeError(f"objective {metric} is {value} (metrics: {sorted(result.metrics)})")
    run.log_metrics(result.steps, final_metrics(result.metrics, goals[0][0]), buffered=True)
    if "cost_usd" in result.metrics and on_cost is not None:
        on_cost(float(result.metrics["cost_usd"]))
    for artifact in result.artifacts:
        run.log_artifact(artifact)


def final_metrics(metrics: Mapping[str, float], objective: str) -> dict[str, float]:
    """A completed trial's final values as its run logs them at its last step."""
    # eval/* already has its history (reported per evaluation); logging the kept model's
    # values again at the last step would put a second point there. test/* and the
    # objective (the kept model's validation metric) are final values.
    final = {k: float(v) for k, v in metrics.items() if not k.startswith("eval/")}
    return {**final, "objective": float(metrics[objective])}


def _end_pruned(run: TrackedRun, metric: str, pruned: optuna.TrialPruned) -> None:
    # Its objective is the last value Optuna judged it by (Optuna's value for the trial
    # too). FINISHED, not KILLED: MLflow's runs table marks KILLED with FAILED's red cross.
    last = run.latest.get(metric)
    if last is not None:
        run.log_metrics(last[0], {"objective": last[1]}, buffered=True)
    run.end("FINISHED", {"optuna.trial_state": "PRUNED", "harness.pruned_reason": str(pruned)})


def _end_failed(run: TrackedRun, exc: BaseException, of_trial: bool = True) -> None:
    reason = describe_failure(exc)
    state = {"optuna.trial_state": "FAIL"} if of_trial else {}
    # best effort: the store itself may be what failed (a full disk, a server gone)
    with contextlib.suppress(Exception):
        run.set_tags({**state, "harness.failure_reason": reason[:TAG_LIMIT]})
    with contextlib.suppress(Exception):
        run.log_text(redact_text(traceback.format_exc()), "error.txt")
    with contextlib.suppress(Exception):  # the original error is the one to report
        run.end("FAILED")


def describe_failure(exc: BaseException) -> str:
    """Why a trial failed, fit to print and store: secrets redacted, a full disk named."""
    reason = redact_text(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason += " (the disk is full: free space where runs/ and the MLflow artifacts live)"
    return reason


def is_store_unwritable(exc: BaseException) -> bool:
    """The MLflow SQLite store refused a write: a read-only file, folder or file system."""
    return "readonly database" in str(exc) or "read-only file system" in str(exc).lower()


class BudgetExceededError(RuntimeError):
    pass


class SurplusTrialError(RuntimeError):
    pass
