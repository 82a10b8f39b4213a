"""Run or resume a study: Optuna samples, a backend trains, MLflow records.

Everything that can be checked is checked before the first trial: search-space expressions,
which keys the backend can tune, the types sampled values will have, the dataset. A failing trial
fails alone (its run is marked FAILED with the reason) and the study goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from harness import continuation, search
from harness.backends.base import Backend, PaidBackend, TrialResult, TrialSpec, check_tunable
from harness.checks import check_space_ranges
from harness.config import ConfigError, runs_dir, with_params
from harness.continuation import holds
from harness.data import Dataset, load_dataset
from harness.fingerprint import differences, fingerprint, suggested_name
from harness.metrics import EVAL_METRICS
from harness.provenance import provenance
from harness.secrets import first_line, redact_override, redact_text
from harness.storage import (
    CLAIM_PREFIX,
    STORAGE_ATTEMPTS,
    WORKER_ATTR,
    StorageGoneError,
    describe_storage,
    disk_full_error,
    existing_study,
    full_disk,
    storage_error,
    storage_for,
)
from harness.tracking import (
    UNRECORDED,
    MLflowTracker,
    TrackedRun,
    Tracker,
    TrackerFactory,
    TrackingServerError,
    check_store_writable,
    check_tracking_server,
    is_unreachable,
    tracking_uri,
    unreachable_reason,
    unwritable_store_message,
)
from harness.workers import (
    HELPER_ENV,
    PARENT_ENV,
    alive,
    locked,
    overrides_env,
    stop,
    wait_for,
    worker_identity,
)

FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING
# settings of a sweep that mean nothing to `harness train`
SWEEP_ONLY_KEYS = {
    "sweep.n_trials",
    "sweep.n_workers",
    "sweep.timeout_s",
    "sweep.budget_usd",
    "sweep.enqueue",
    "sweep.continue_from",
}


def make_backend(cfg: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        backend: Backend = instantiate(cfg.backend)
    except InstantiationException as exc:  # e.g. a backend.* key the backend does not take
        hint = ""
        if "unexpected keyword argument" in str(exc):
            hint = (
                f"\nconf/backend/ lists the keys {cfg.backend._target_} takes. An API key is "
                "read from the environment (backend.api_key_env), never from the config."
            )
        raise ConfigError(f"backend={cfg.backend._target_}: {exc}{hint}") from exc
    return backend


@dataclass
class Plan:
    """A validated study: what to search, what is fixed, the backend, the data."""

    cfg: DictConfig  # fixed values of the space applied
    distributions: dict[str, optuna.distributions.BaseDistribution]
    fixed: dict[str, Any]  # keys of the space given a plain value
    backend: Backend
    dataset: Dataset
    fingerprint: dict[str, Any]  # what defines the study (harness.fingerprint)
    prepared: Any = None
    notices: list[str] = field(default_factory=list)  # said once before the first trial


def plan_study(cfg: DictConfig) -> Plan:
    """Validates everything a study needs before the first trial; raises with a clear message."""
    space = dict(cfg.search.space)
    distributions = search.to_distributions(space)
    fixed = search.fixed_values(space)
    cfg = with_params(cfg, fixed)
    backend = make_backend(cfg)
    check_tunable(backend.name, backend.tunable_keys(cfg), distributions)
    if isinstance(backend, PaidBackend):  # first: counting tokens for the data checks caches files
        backend.check_credentials()
    for key, dist in distributions.items():  # the schema must accept every value sampled
        for value in search.extremes(dist):
            try:
                with_params(cfg, {key: value})
            except Exception as exc:
                raise ConfigError(
                    f"search space {key}={space[key]}: {value!r} is not valid for this key: {exc}"
                ) from exc
    check_space_ranges(space, distributions, fixed)
    notices = _check_objectives(cfg)
    metrics = backend.eval_metrics(cfg.data.task)
    if cfg.sweep.metric not in metrics:
        raise ConfigError(
            f"sweep.metric={cfg.sweep.metric} is not measured at evaluations of a "
            f"{cfg.data.task} task; choose one of {', '.join(metrics)}"
        )
    if cfg.sweep.n_workers > 1 and str(cfg.storage.url or "").startswith("sqlite"):
        raise ConfigError(
            "sweep.n_workers > 1 needs a storage that is safe for parallel workers; SQLite is "
            'not ("database is locked"). Leave storage.url unset (a journal file) or use '
            "postgresql://..."
        )
    if cfg.sweep.direction not in ("maximize", "minimize"):
        raise ConfigError(
            f"sweep.direction must be maximize or minimize, not {cfg.sweep.direction!r}"
        )
    dataset = load_dataset(cfg.data, backend.example_check(cfg))
    _check_reported(cfg, backend, dataset)
    identity = fingerprint(cfg, dataset, backend.name, objectives(cfg))
    return Plan(cfg, distributions, fixed, backend, dataset, identity, notices=notices)


# Final metrics every trial has besides its task's: what a multi-objective study may trade
# against quality (money, time, compute).
COST_METRICS = ("cost_usd", "train/seconds", "train/steps")


def objectives(cfg: DictConfig) -> list[tuple[str, str]]:
    """(metric, direction) of each objective: sweep.objectives, else sweep.metric alone."""
    if cfg.sweep.objectives:
        return [(str(k), str(v)) for k, v in cfg.sweep.objectives.items()]
    return [(str(cfg.sweep.metric), str(cfg.sweep.direction))]


def _check_objectives(cfg: DictConfig) -> list[str]:
    """Refuses objectives no trial reports; says that several objectives turn pruning off."""
    chosen = objectives(cfg)
    if len(cfg.sweep.objectives) == 1:
        metric, direction = chosen[0]
        raise ConfigError(
            "sweep.objectives names one objective; for one, use "
            f"sweep.metric={metric} sweep.direction={direction} (pruning and early stopping "
            "follow them)"
        )
    task_metrics = EVAL_METRICS.get(cfg.data.task, ())
    for metric, direction in chosen:
        if direction not in ("maximize", "minimize"):
            raise ConfigError(
                f"sweep.objectives: {metric}: direction must be maximize or minimize, "
                f"not {direction!r}"
            )
        if not (metric in task_metrics or metric in COST_METRICS or metric.startswith("test/")):
            raise ConfigError(
                f"sweep.objectives: {metric!r} is not a metric trials report; choose from "
                f"{', '.join((*task_metrics, *COST_METRICS))} or a test/* metric"
            )
    if len(chosen) == 1:
        return []
    if cfg.sampler.name == "cmaes":
        raise ConfigError(
            "sweep.objectives: sampler=cmaes optimizes one objective; use tpe, random, grid or gp"
        )
    notices = [
        f"{len(chosen)} objectives ({', '.join(f'{m} {d}' for m, d in chosen)}): the study "
        "looks for the Pareto front; the report plots it. Within a trial, early stopping and "
        f"the kept checkpoint follow sweep.metric ({cfg.sweep.direction} {cfg.sweep.metric})."
    ]
    if cfg.pruner.name != "none":
        notices.append(
            f"pruning is off (pruner={cfg.pruner.name} ignored): Optuna cannot prune trials of "
            "a multi-objective study, so every trial runs to the end."
        )
    return notices


def _check_reported(cfg: DictConfig, backend: Backend, dataset: Dataset) -> None:
    """Objectives this backend and data cannot measure would fail every trial at its end."""
    for metric, _ in objectives(cfg):
        if metric == "cost_usd" and not isinstance(backend, PaidBackend):
            raise ConfigError(
                f"sweep.objectives: cost_usd is only reported by a backend that spends money; "
                f"backend {backend.name} does not (train/seconds "
                "measures the time a trial takes)"
            )
        if metric.startswith("test/") and not dataset.test:
            raise ConfigError(f"sweep.objectives: {metric} needs a test split; the data has none")


def count_finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED_STATES)


def check_same_study(study: optuna.Study, plan: Plan, overrides: list[str]) -> None:
    """Refuses to add this command's trials to a stored study that answers another question:
    other objectives, or another fingerprint (task, data, labels, model, backend). A study
    stored before fingerprints existed adopts this command's."""
    cfg, name = plan.cfg, study.study_name
    goals = objectives(cfg)
    before = stored_objectives(study, cfg)
    directions = [d.name.lower() for d in study.directions]
    if before != goals or directions != [d for _, d in goals]:
        had = ", ".join(f"{d} {m}" for m, d in before)
        raise ConfigError(
            f"study {name!r} exists with the objective(s) {had}; this command has "
            f"{', '.join(f'{d} {m}' for m, d in goals)}. Resume with the same sweep.metric, "
            "sweep.direction and sweep.objectives, or give the new study its own name: "
            "name=..."
        )
    stored = study.user_attrs.get("fingerprint")
    if not stored:
        return
    changed = differences(stored, plan.fingerprint)
    if not changed:
        return
    fake = "FakeBackend" in (stored.get("backend"), plan.fingerprint["backend"])
    new_name = suggested_name(name, stored, plan.fingerprint)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "name"]
    command = " ".join(shlex.quote(w) for w in ["harness", "sweep", *kept, f"name={new_name}"])
    raise ConfigError(
        f"study {name!r} ({describe_storage(cfg)}, {count_finished(study)} finished trials) "
        "is not the study this command describes:\n  "
        + "\n  ".join(changed)
        + "\nA study is its task, data, labels, model, backend and objective; adding these "
        "trials to it would mix two questions under one best. "
        + ("A backend=fake check is a study of its own. " if fake else "")
        + f"Start a new study with its own name:\n  {command}"
    )


def check_resume(study: optuna.Study, plan: Plan, overrides: list[str]) -> None:
    """The checks of ``check_same_study``, then the search space: a change Optuna cannot make
    within a study (a choice list, a log scale, a kind) is refused with the command that
    continues the study as a new one (harness.continuation)."""
    check_same_study(study, plan, overrides)
    stored = continuation.stored_distributions(study)
    changed = continuation.incompatible(stored, plan.distributions)
    if changed:
        name = study.study_name
        raise ConfigError(
            f"study {name!r}: this command changes its search space in a way Optuna cannot "
            "follow within one study:\n  "
            + "\n  ".join(changed)
            + "\n(a choice list, a log scale and int/float are fixed for the life of a study; a "
            "wider interval or range goes on in place). Continue it as a new study that starts "
            f"with its {count_finished(study)} finished trials and records under the same "
            "MLflow experiment:\n  " + continuation.continuation_command(name, overrides)
        )


def stored_objectives(study: optuna.Study, cfg: DictConfig) -> list[tuple[str, str]]:
    """The objectives a study was created with (older studies: the config's)."""
    stored = study.user_attrs.get("objectives")
    return [(str(m), str(d)) for m, d in stored] if stored else objectives(cfg)


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial on the first objective: the study's best trial, and in a
    multi-objective study (which has a Pareto front, no single best) the front's end that is
    best on the objective listed first. None before any trial completes."""
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials, best first on the first objective (ties: the earlier trial)."""
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return sorted(completed, key=lambda t: (-sign * t.values[0], t.number))


def checked_param_sets(plan: Plan, sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param sets to enqueue must name searched keys with values their ranges hold: a warm
    start that Optuna would quietly resample is refused before any trial, naming the value.
    A key the command line fixed is dropped from the sets, with a notice."""
    kept = []
    for params in sets:
        for key in [k for k in params if k in plan.fixed]:
            plan.notices.append(
                f"sweep.enqueue: {key}={params.pop(key)!r} dropped: an override fixes it to "
                f"{plan.fixed[key]!r}"
            )
        for key, value in params.items():
            dist = plan.distributions.get(key)
            if dist is None:
                raise ConfigError(
                    f"sweep.enqueue: {key} is not a searched key (searched: "
                    f"{', '.join(plan.distributions) or 'none'})"
                )
            if not holds(dist, value):
                raise ConfigError(f"sweep.enqueue: {key}={value!r} is outside its range {dist}")
        if params:
            kept.append(params)
    return kept


def reproduce_command(command: str, overrides: list[str], params: Mapping[str, Any]) -> str:
    """The `harness train` line that repeats a trial: the sweep's plain overrides + its params."""
    dropped = set(params) | SWEEP_ONLY_KEYS
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    words = ["harness", command, *kept, *(f"{k}={override_value(v)}" for k, v in params.items())]
    return " ".join(shlex.quote(w) for w in words)


def override_value(value: Any) -> str:
    """A param value as an override: floats in full (repr), so a trial repeats exactly."""
    return repr(value) if isinstance(value, float) else str(value)


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
        self.prune = prune  # False in multi-objective studies: Optuna cannot prune them
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
) -> tuple[TrialResult, TrackedRun]:
    """One trial through the backend, recorded in its own MLflow run. Exceptions propagate after
    the run is closed with the right state."""
    cfg = with_params(plan.cfg, params)
    workdir.mkdir(parents=True, exist_ok=True)
    goals = objectives(cfg)
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
        # what every trial costs in time and compute, whatever the backend: objectives to trade
        result.metrics.setdefault("train/seconds", time.monotonic() - started)
        result.metrics.setdefault("train/steps", float(result.steps))
        for metric, _ in goals:
            value = result.metrics.get(metric, math.nan)
            if not math.isfinite(value):
                raise RuntimeError(
                    f"objective {metric} is {value} (metrics: {sorted(result.metrics)})"
                )
        objective = result.metrics[goals[0][0]]
        # eval/* already has its history (reported per evaluation); logging the kept model's
        # values again at the last step would put a second point there. test/* and the
        # objective (the kept model's validation metric) are final values.
        final = {k: v for k, v in result.metrics.items() if not k.startswith("eval/")}
        run.log_metrics(result.steps, {**final, "objective": objective}, buffered=True)
        if "cost_usd" in result.metrics and on_cost is not None:
            on_cost(float(result.metrics["cost_usd"]))
        for artifact in result.artifacts:
            run.log_artifact(artifact)
        if result.hosted_model:
            try:  # a paid result is not thrown away for want of a model entry
                tracker.log_hosted_model(run.run_id, run_name, result.hosted_model)
            except Exception as exc:
                run.set_tags({"harness.hosted_model_error": redact_text(repr(exc))[:4000]})
    except optuna.TrialPruned as pruned:
        # Its objective is the last value Optuna judged it by (Optuna's value for the trial
        # too). FINISHED, not KILLED: MLflow's runs table marks KILLED with FAILED's red cross.
        last = run.latest.get(cfg.sweep.metric)
        if last is not None:
            run.log_metrics(last[0], {"objective": last[1]}, buffered=True)
        run.end("FINISHED", {"optuna.trial_state": "PRUNED", "harness.pruned_reason": str(pruned)})
        raise
    except BaseException as exc:  # KeyboardInterrupt too: the run must not stay RUNNING
        reason = describe_failure(exc)
        # best effort: the store itself may be what failed (a full disk, a server gone)
        with contextlib.suppress(Exception):
            run.set_tags({"optuna.trial_state": "FAIL", "harness.failure_reason": reason[:4000]})
        with contextlib.suppress(Exception):
            run.log_text(redact_text(traceback.format_exc()), "error.txt")
        with contextlib.suppress(Exception):  # the original error is the one to report
            run.end("FAILED")
        raise
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    return result, run


class Sweep:
    """One invocation of `harness sweep`: runs the trials still missing, then summarises."""

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str],
        on_trial: Callable[[TrialOutcome], None] = lambda outcome: None,
        on_progress: ProgressCallback | None = None,
        tracker_factory: TrackerFactory = MLflowTracker,
    ) -> None:
        self.tracker_factory = tracker_factory  # InMemoryStore().tracker in fast tests
        # kept in Optuna and MLflow and printed: never with a secret in it
        self.overrides = [redact_override(o) for o in overrides]
        self.raw_overrides = list(overrides)  # only for starting worker processes
        # A helper process started by a sweep with sweep.n_workers > 1 runs trials and leaves
        # the summary to the process that started it. HARNESS_WORKER_INDEX offsets the
        # sampler's seed so that workers started at the same moment do not draw the same params.
        self.is_helper = os.environ.get(HELPER_ENV) == "1"
        index = int(os.environ.get("HARNESS_WORKER_INDEX", "0") or 0)
        # host k with n workers seeds k*n, k*n+1, ...: apart from every other host's workers
        self.seed_index = index if self.is_helper else index * max(1, cfg.sweep.n_workers)
        self.on_trial, self.on_progress = on_trial, on_progress
        self.plan = plan_study(cfg)
        self.cfg = self.plan.cfg
        # warm-start param sets, found before anything is written (another study may be missing)
        self.warm_sets = [] if self.is_helper else self._warm_sets()
        self.checkpoints = runs_dir(self.cfg) / "checkpoints" / self.cfg.name
        self.stop_reason = ""  # why the study stopped before n_trials (the budget), if it did
        self.tracking_gone = ""  # why MLflow could not be reached mid-study, if it could not
        self.store_unwritable = ""  # the message for an MLflow store that refused a write
        self.disk_full: BaseException | None = None  # the out-of-space error that stopped it
        self.existing: optuna.Study | None = None  # the study as stored before this sweep
        self.carried: list[optuna.trial.FrozenTrial] = []  # sweep.continue_from's trials
        self.failed: list[TrialOutcome] = []  # trials this invocation ran that failed

    def preflight(self) -> None:
        """Every check this sweep makes, before anything is written to any store: the stored
        study (its objectives, what it is, its search space), where a continuation starts, the
        tracking server, and the backend's preparation (an API key, the data's upload).
        Raises ConfigError saying what to do."""
        self.existing = existing_study(self.cfg)
        finished = 0
        if self.existing is not None:
            check_resume(self.existing, self.plan, self.overrides)
            finished = count_finished(self.existing)
            if not self.cfg.tracking.experiment:  # a continuation records under its source's
                self.cfg.tracking.experiment = self.existing.user_attrs.get("mlflow_experiment")
        elif self.cfg.sweep.continue_from and not self.is_helper:
            source = self._continuation_source()
            self.carried, dropped = continuation.carried_trials(
                source, self.cfg, self.plan.distributions
            )
            finished = len(self.carried)
            left_out = f" ({dropped} outside this space left out)" if dropped else ""
            self.plan.notices.append(
                f"continuing study {source.study_name!r}: {len(self.carried)} of its finished "
                f"trials carried over{left_out}"
            )
        check_tracking_server(tracking_uri(self.cfg), self.cfg.tracking.server_timeout_s)
        check_store_writable(tracking_uri(self.cfg))
        if finished < self.cfg.sweep.n_trials:
            self.plan.prepared = self.plan.backend.prepare(self.cfg, self.plan.dataset)

    def _continuation_source(self) -> optuna.Study:
        """sweep.continue_from's study, which must be this study in all but its space; runs are
        recorded under its MLflow experiment."""
        name = str(self.cfg.sweep.continue_from)
        source = self._other_study(name, "sweep.continue_from")
        check_same_study(source, self.plan, self.overrides)
        if not self.cfg.tracking.experiment:
            self.cfg.tracking.experiment = source.user_attrs.get("mlflow_experiment", name)
        return source

    def create_study(self) -> optuna.Study:
        c = self.cfg
        storage = storage_for(c, on_stale=self._on_stale_heartbeat)
        # A resumed sweep seeds its sampler past the trials already there: the same seed again
        # would re-draw the first trials' parameters. A fresh sweep is seeded with c.seed.
        done = len(self.existing.trials) if self.existing is not None else 0
        seed = c.seed + done + 1000 * self.seed_index
        sampler = search.make_sampler(
            c.sampler.name, seed, c.sampler.n_startup_trials, self.plan.distributions
        )
        goals = objectives(c)
        pruner = search.pruner_from(c.pruner, "none" if len(goals) > 1 else None)
        return optuna.create_study(
            study_name=c.name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            directions=[optuna.study.StudyDirection[d.upper()] for _, d in goals],
            load_if_exists=True,
        )

    def run(self) -> optuna.Study:
        # Optuna's own "trial failed" warnings would print errors unredacted; ours are redacted
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.preflight()
        try:
            return self._run_study()
        except Exception as exc:
            full = full_disk(exc)
            if full is not None and not isinstance(exc, ConfigError):  # creating the study too
                raise disk_full_error(runs_dir(self.cfg), full) from exc
            cause = storage_error(exc)
            if cause is None or isinstance(exc, ConfigError):  # said already (a full disk)
                raise
            raise StorageGoneError(
                f"the Optuna storage {describe_storage(self.cfg)} failed during the study: "
                f"{type(cause).__name__}: {first_line(cause)[:300]}. The study stopped; "
                "finished trials are kept. Run the same command again when the storage is "
                "back: it resumes."
            ) from exc

    def _run_study(self) -> optuna.Study:
        # From here on the stores are written: the study, then the MLflow experiment and runs.
        study = self.create_study()
        goals = objectives(self.cfg)
        if self.carried and "harness_continued_from" not in study.user_attrs:
            study.add_trials(self.carried)
            study.set_user_attr("harness_continued_from", str(self.cfg.sweep.continue_from))
        study.set_user_attr("overrides", self.overrides)
        study.set_user_attr("objectives", [list(goal) for goal in goals])  # for report and best
        study.set_user_attr("fingerprint", self.plan.fingerprint)  # adopted by older studies
        study.set_user_attr("mlflow_experiment", self.cfg.tracking.experiment or self.cfg.name)
        # Names this study's trials to hosted providers (see the trial key in _objective). Two
        # workers starting at once may each store their own: harmless, trial numbers differ.
        if "harness_uid" not in study.user_attrs:
            study.set_user_attr("harness_uid", uuid.uuid4().hex[:12])
        self.uid = str(study.user_attrs["harness_uid"])
        tracker = self.tracker_factory(self.cfg, self.plan.dataset.file_hashes)
        self.tracker = tracker
        self._fail_stale_trials(study)
        self._close_abandoned_runs(study)
        missing = self.cfg.sweep.n_trials - count_finished(study)
        tags = {
            "optuna.study_name": study.study_name,
            "optuna.storage": describe_storage(self.cfg),
            **provenance(self.plan.dataset.file_hashes, self.cfg.seed),
        }
        parent_id = os.environ.get(PARENT_ENV) or tracker.parent_run(tags)
        study.set_user_attr("mlflow_parent_run_id", parent_id)
        self.tags = tags
        self.parent_id = parent_id
        workers: list[subprocess.Popen[bytes]] = []
        try:
            if missing > 0 and not self.is_helper:
                self._warm_start(study)
            if missing > 0 and not self._enough(study):
                workers = self._start_workers()
                self._optimize(study, missing)
            wait_for(workers)
            if workers:  # a helper that died left its trial RUNNING: fail it and run the retry
                self._fail_stale_trials(study)
                if not self._enough(study) and not self.tracking_gone:
                    self._optimize(study, missing)
            if self.tracking_gone:
                raise self._tracking_gone_error(self.tracking_gone)
            if self.disk_full is not None:
                raise disk_full_error(runs_dir(self.cfg), self.disk_full)
            if self.store_unwritable:
                raise TrackingServerError(self.store_unwritable)
            if not self.is_helper:
                self._finish(study)
        except BaseException as exc:
            stop(workers)
            self._close_parent(study, exc)
            full = full_disk(exc)
            if full is not None and not isinstance(exc, ConfigError):
                raise disk_full_error(runs_dir(self.cfg), full) from exc
            if is_unreachable(exc) and not self.tracking_gone:  # outside a trial
                raise self._tracking_gone_error(unreachable_reason(exc)) from exc
            raise
        return study

    def _close_parent(self, study: optuna.Study, exc: BaseException) -> None:
        """The parent run of a study stopped by ``exc``: FAILED when the Optuna storage failed
        (it is not asked whether other workers run on: it would fail again, and they cannot
        record their trials either), else KILLED unless trials of other processes run on."""
        if self.is_helper:
            return
        gone = storage_error(exc) is not None
        if not gone:
            try:
                if self._others_running(study):
                    return
            except Exception:  # the storage failed just now: as above
                gone = True
        with contextlib.suppress(Exception):  # the tracking store may be down too
            self.tracker.terminate_run(self.parent_id, "FAILED" if gone else "KILLED")

    def _tracking_gone_error(self, reason: str) -> TrackingServerError:
        waited = self.cfg.tracking.server_timeout_s
        return TrackingServerError(
            f"the MLflow tracking server {redact_text(tracking_uri(self.cfg))} stopped "
            f"answering ({reason}, retried for tracking.server_timeout_s={waited:g} s); the "
            "trial it was recording failed and the study stopped. Trials are kept in the Optuna "
            "storage: run the same command again when the server is back, it resumes (and "
            "closes the runs left open)."
        )

    def _close_abandoned_runs(self, study: optuna.Study) -> None:
        """MLflow runs left RUNNING by processes that ended (see MLflowTracker)."""
        trials = {
            t.number: (t.state.name, str(t.user_attrs.get("fail_reason", "")))
            for t in study.get_trials(deepcopy=False)
        }
        try:
            self.tracker.close_abandoned_runs(trials)
        except Exception as exc:  # the runs stay as they are; the study goes on
            logging.getLogger("harness").warning(
                "could not close MLflow runs left open: %s", describe_failure(exc)
            )

    def _warm_sets(self) -> list[dict[str, Any]]:
        """sweep.enqueue: param sets to try before the sampler's own. ``{from_study: OTHER,
        top: N}`` takes OTHER's N best trials, keeping the keys this study searches and the
        values its ranges hold."""
        sets: list[dict[str, Any]] = []
        for item in self.cfg.sweep.enqueue:
            if not isinstance(item, Mapping):
                raise ConfigError(
                    f"sweep.enqueue: {item!r} is not a param set; write "
                    "'sweep.enqueue=[{train.learning_rate: 1e-3}]' or [{from_study: NAME}]"
                )
            item = dict(item)
            if "from_study" not in item:
                sets.append(item)
                continue
            other = str(item["from_study"])
            taken = self._best_params_of(other, int(item.get("top", 3)))
            sets += taken
            self.plan.notices.append(
                f"warm start: {len(taken)} param set(s) from study {other!r} tried first"
            )
        return checked_param_sets(self.plan, sets)

    def _warm_start(self, study: optuna.Study) -> None:
        """Enqueues the warm-start sets once per study: a resume does not enqueue them again
        (the flag; skip_if_exists alone would re-enqueue a set whose trial failed)."""
        if not self.warm_sets or study.user_attrs.get("harness_warm_started"):
            return
        for params in self.warm_sets:
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr("harness_warm_started", True)

    def _other_study(self, name: str, setting: str) -> optuna.Study:
        """Another study in this study's storage, which ``setting`` names; read, never made."""
        other_cfg = self.cfg.copy()
        other_cfg.name = name
        other = existing_study(other_cfg)
        if other is None:
            raise ConfigError(
                f"{setting}: no study named {name!r} in {describe_storage(other_cfg)}"
            )
        return other

    def _best_params_of(self, name: str, top: int) -> list[dict[str, Any]]:
        ranked = ranked_trials(self._other_study(name, "sweep.enqueue"))
        sets = []
        for trial in ranked[:top]:
            params = {}
            for key, value in trial.params.items():
                dist = self.plan.distributions.get(key)
                if dist is not None and holds(dist, value):
                    params[key] = value
            if params:
                sets.append(params)
        return sets

    def _optimize(self, study: optuna.Study, n_trials: int) -> None:
        """study.optimize, riding out storage errors: a database that drops out for a moment
        (a restart, a network blip) costs a wait with backoff, not the study. The trial in
        flight is failed and retried once with its params; a storage still failing after the
        last wait stops the study (see run)."""
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                if attempt > 0:  # after a wait: first the trial the failure left RUNNING
                    self._fail_own_running(study)
                    if self._enough(study):
                        return
                study.optimize(
                    self._objective,
                    n_trials=n_trials,  # a bound: failed trials are replaced, but not forever
                    timeout=self.cfg.sweep.timeout_s,
                    catch=(Exception,),
                    callbacks=[self._after_trial, self._stop_when_enough],
                    # no gc_after_trial: ~200 ms a trial with torch loaded; the local backend
                    # collects after its own trials, which are the ones holding big objects
                )
                return
            except Exception as exc:
                cause = storage_error(exc)
                # a full disk stays full for longer than any wait: run() says so at once
                if cause is None or attempt == STORAGE_ATTEMPTS - 1 or full_disk(cause):
                    raise
                # storage.retry_s in all, doubling: 2, 4, 8 s of 14 s
                wait = (
                    float(self.cfg.storage.retry_s) * 2**attempt / (2 ** (STORAGE_ATTEMPTS - 1) - 1)
                )
                logging.getLogger("harness").warning(
                    "the Optuna storage failed (%s: %s); retrying in %.3g s",
                    type(cause).__name__,
                    first_line(cause),
                    wait,
                )
                time.sleep(wait)

    def _fail_own_running(self, study: optuna.Study) -> None:
        """After a storage error: this process's trial that could not be told is failed and
        retried once, like a trial whose process died."""
        me = worker_identity()
        for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
            if trial.user_attrs.get(WORKER_ATTR) == me:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                self._retry_or_abandon(study, trial, "the storage failed during this trial")

    def _others_running(self, study: optuna.Study) -> bool:
        """Trials of other processes (other hosts) still running: the parent run stays open."""
        me = worker_identity()
        return any(
            t.user_attrs.get(WORKER_ATTR) != me
            for t in study.get_trials(deepcopy=False, states=(RUNNING,))
        )

    def _enough(self, study: optuna.Study) -> bool:
        """Finished and running trials (of any worker) already make up sweep.n_trials."""
        trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, RUNNING))
        return len(trials) >= self.cfg.sweep.n_trials

    def _stop_when_enough(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._fail_stale_trials(study)  # a worker that died must not count as running
        if self._enough(study):
            study.stop()

    def _start_workers(self) -> list[subprocess.Popen[bytes]]:
        """sweep.n_workers - 1 more processes on this study; this one is the first."""
        extra = self.cfg.sweep.n_workers - 1
        if extra <= 0 or self.is_helper:
            return []
        # the overrides go in the environment: they may hold secrets (workers.OVERRIDES_ENV)
        command = [sys.executable, "-m", "harness.cli", "sweep", "sweep.n_workers=1"]
        return [
            subprocess.Popen(
                command,
                env={
                    **os.environ,
                    **overrides_env(self.raw_overrides),
                    HELPER_ENV: "1",
                    # seeds apart from this host's other workers and from other hosts'
                    "HARNESS_WORKER_INDEX": str(self.seed_index + index),
                    PARENT_ENV: self.parent_id,
                },
                start_new_session=True,  # Ctrl-C is forwarded once, by workers.stop
            )
            for index in range(1, extra + 1)
        ]

    def _fail_stale_trials(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a process that is gone (crash, kill -9, a lost host) are
        marked FAIL, so they neither block nor count, and retried once with the same params and
        trial key (a hosted backend re-attaches to the job the dead process started). A retry
        that dies too is not retried again: a paid backend cancels its work. Which trials are
        gone: see ``owner_gone``; on an RDB storage, any host's trial is also gone when its
        heartbeat stops (Optuna then calls ``_on_stale_heartbeat``)."""
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
        for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
            if not owner_gone(trial, float(self.cfg.storage.grace_s)):
                continue
            # its hosted work may run on to the end: count it as spent until a retry takes over
            spent = max(
                float(trial.user_attrs.get("cost_usd", 0.0)),
                float(trial.user_attrs.get("cost_estimate_usd", 0.0)),
            )
            try:  # another worker of this host may be failing it at this very moment
                if spent:  # Optuna has no public setter for another process's trial
                    study._storage.set_trial_user_attr(trial._trial_id, "cost_usd", spent)
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):
                continue  # it did: the retry is its to make
            self._retry_or_abandon(study, trial, "the process running this trial ended")

    def _on_stale_heartbeat(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._retry_or_abandon(study, trial, "its worker stopped sending heartbeats")

    def _retry_or_abandon(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str
    ) -> None:
        key = trial.user_attrs.get("harness_trial_key", "")
        log = logging.getLogger("harness")
        if "harness_retry_of" not in trial.user_attrs:  # first, so nothing below can lose it
            study.enqueue_trial(
                trial.params,
                user_attrs={"harness_retry_of": trial.number, "harness_trial_key": key},
            )
        else:
            backend = self.plan.backend
            if isinstance(backend, PaidBackend) and key:
                try:
                    billed = backend.abandon(key)
                except Exception as exc:
                    log.warning("trial %d: could not cancel its work: %s", trial.number, exc)
                else:  # the trial is finished (failed): Optuna keeps no new attrs on it
                    if billed is not None:
                        study.set_user_attr(billed_key(trial.number), float(billed))
        try:
            self.tracker.fail_stale_run(trial.number, reason)
        except Exception as exc:  # the run stays as it is; the study goes on
            log.warning("trial %d: could not close its MLflow run: %s", trial.number, exc)

    def _objective(self, trial: optuna.Trial) -> float | list[float]:
        """One trial; whatever fails it, sampling included (Optuna refuses a value a stored
        distribution does not allow), is recorded as its ``fail_reason``."""
        try:
            return self._run_one(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if "fail_reason" not in trial.user_attrs:
                trial.set_user_attr("fail_reason", describe_failure(exc)[:2000])
            raise

    def _run_one(self, trial: optuna.Trial) -> float | list[float]:
        # (the storage named this process the trial's "worker" as it made the trial RUNNING)
        # Workers check the count before asking for a trial; two asking at the same moment can
        # both pass. The lower trial numbers win and the surplus one stops here, unrun.
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, RUNNING))
            if t.number < trial.number
        ]
        if len(earlier) >= self.cfg.sweep.n_trials:
            trial.set_user_attr("fail_reason", "surplus: other workers took the last trials")
            trial.study.stop()
            raise SurplusTrialError("sweep.n_trials already reached by other workers")
        trial.set_user_attr("overrides", self.overrides)
        params = search.suggest(trial, self.plan.distributions)
        # A retry of a crashed trial keeps that trial's key: a hosted backend re-attaches to the
        # job it started. Otherwise the key is new: the study's uid and the trial number.
        key = trial.user_attrs.get("harness_trial_key") or f"{self.uid}-{trial.number}"
        trial.set_user_attr("harness_trial_key", key)
        self._check_budget(trial, {**self.plan.fixed, **params})
        workdir = self.checkpoints / f"trial-{trial.number:04d}"
        tags = {**self.tags, "optuna.trial_number": str(trial.number)}
        try:
            result, run = run_trial(
                self.plan,
                self.tracker,
                {**self.plan.fixed, **params},  # logged: the same keys in every trial
                trial.number,
                f"trial-{trial.number:04d}",
                workdir,
                tags,
                trial,
                self.parent_id,
                save_model=self.cfg.tracking.log_best_model,
                key=key,
                on_cost=lambda usd: trial.set_user_attr("cost_usd", usd),
                on_progress=self.on_progress,
            )
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", describe_failure(exc)[:2000])
            if is_unreachable(exc):  # every next trial would fail the same way, slowly
                self.tracking_gone = unreachable_reason(exc)
                trial.study.stop()
            full = full_disk(exc)
            if full is not None:  # so would they on a full disk, each one at once
                self.disk_full = full
                trial.study.stop()
            elif _store_unwritable(exc):  # ... or at once: the study stops here
                self.store_unwritable = unwritable_store_message(
                    tracking_uri(self.cfg), describe_failure(exc).splitlines()[0][:300]
                )
                trial.study.stop()
            raise
        try:
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("metrics", result.metrics)
            trial.set_user_attr("steps", result.steps)
        except BaseException:  # the storage failed: the trial fails after its run FINISHED
            with contextlib.suppress(Exception):
                run.set_tags({"optuna.trial_state": "FAIL", "harness.failure_reason": UNRECORDED})
                run.terminate("FAILED")
            raise
        values = [float(result.metrics[metric]) for metric, _ in objectives(self.cfg)]
        return values[0] if len(values) == 1 else values

    def _check_budget(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        """Does not launch a trial whose estimated cost would take the study's spend past
        sweep.budget_usd: the trial fails with the reason and the study stops."""
        budget = self.cfg.sweep.budget_usd
        backend = self.plan.backend
        if not isinstance(backend, PaidBackend):
            return
        trial_cfg = with_params(self.cfg, params)
        estimate = float(backend.estimate_cost_usd(trial_cfg, self.plan.prepared))
        trial.set_user_attr("cost_estimate_usd", estimate)
        if budget is None or "harness_retry_of" in trial.user_attrs:
            return  # a retry re-attaches to work the study already counted as spent
        spent = study_spend(trial.study, exclude=trial.number)
        if spent + estimate > budget:
            self.stop_reason = (
                f"budget: trial {trial.number} would cost ~${estimate:.4f} and the study has "
                f"spent ${spent:.4f} of sweep.budget_usd=${budget:.2f}; it was not launched and "
                "the study stopped. Raise sweep.budget_usd to go on."
            )
            trial.set_user_attr("fail_reason", self.stop_reason)
            trial.study.stop()
            raise BudgetExceededError(self.stop_reason)

    def _after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Keeps the model of the best trial so far and deletes the others' scratch folders."""
        workdir = self.checkpoints / f"trial-{trial.number:04d}"
        best = self.checkpoints / "best"
        best_now = best_trial(study)
        is_best = best_now is not None and best_now.number == trial.number
        if is_best and (workdir / "model").exists():
            try:
                with locked(self.checkpoints / "best.lock"):  # workers of this host
                    # still the best? another worker may have kept a better one meanwhile
                    kept = best / "TRIAL"
                    other = int(kept.read_text()) if kept.exists() else None
                    best_now = best_trial(study)
                    if other is None or (best_now is not None and best_now.number == trial.number):
                        shutil.rmtree(best, ignore_errors=True)
                        (workdir / "model").rename(best)
                        (best / "TRIAL").write_text(str(trial.number))
            except OSError as exc:
                logging.getLogger("harness").warning(
                    "could not keep trial %d's model: %s", trial.number, exc
                )
        shutil.rmtree(workdir, ignore_errors=True)
        reason = ""
        if trial.state == optuna.trial.TrialState.FAIL:
            reason = str(trial.user_attrs.get("fail_reason", ""))
        outcome = TrialOutcome(
            trial.number,
            trial.state.name,
            dict(trial.params),
            trial.values[0] if trial.values else None,
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else 0.0,
            reason,
            dict(trial.user_attrs.get("metrics", {})),
            trial.user_attrs.get("cost_usd"),
            list(trial.values) if trial.values and len(trial.values) > 1 else None,
        )
        if outcome.state == "FAIL" and not reason.startswith("surplus"):
            self.failed.append(outcome)
        self.on_trial(outcome)

    def shortfall(self, study: optuna.Study) -> str:
        """Why the study ended short of sweep.n_trials finished trials ("" if it did not):
        failed trials count toward the trials one invocation runs, so a resume runs more.
        Trials other processes still run (other hosts' workers) are theirs to finish: they
        make no shortfall of this process."""
        # one read for both counts: a trial another worker finishes between two reads would
        # count in neither (RUNNING in the first, COMPLETE by the second)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        wanted = self.cfg.sweep.n_trials
        finished = sum(1 for state in states if state in FINISHED_STATES)
        running = states.count(RUNNING)
        if finished + running >= wanted:
            return ""
        why = []
        if self.failed:
            shown = "; ".join(f"trial {o.number}: {o.reason[:200]}" for o in self.failed[:3])
            more = f"; and {len(self.failed) - 3} more" if len(self.failed) > 3 else ""
            why.append(f"{len(self.failed)} failed ({shown}{more})")
        if running:
            why.append(f"{running} still running in another process")
        if self.stop_reason:
            why.append("the study stopped (see above)")
        elif self.cfg.sweep.timeout_s is not None and not self.failed:
            why.append(f"sweep.timeout_s={self.cfg.sweep.timeout_s} was reached")
        return (
            f"{finished} of {wanted} trials finished"
            + (f"; {'; '.join(why)}" if why else "")
            + ". Run the same command to try again: it runs only the missing trials."
        )

    def _finish(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {
            state.name.lower(): sum(1 for t in trials if t.state == state)
            for state in optuna.trial.TrialState
        }
        metrics = {f"trials_{k}": float(v) for k, v in counts.items() if k != "waiting"}
        metrics["spend_usd"] = study_spend(study)
        if self.stop_reason:
            self.tracker.set_tag(self.parent_id, "harness.stop_reason", self.stop_reason)
        best = best_trial(study)
        if best is not None:
            metrics["best_objective"] = float(best.values[0])
            if is_multi_objective(study):
                metrics["pareto_front_size"] = float(len(study.best_trials))
            self.tracker.set_tag(self.parent_id, "best_trial", str(best.number))
            self._log_best_model(study, best)
        # the last worker to finish closes the parent run; others leave it RUNNING for it
        self.tracker.finish_parent(self.parent_id, metrics, close=not self._others_running(study))

    def _log_best_model(self, study: optuna.Study, best: optuna.trial.FrozenTrial) -> None:
        best_dir = self.checkpoints / "best"
        run_id = best.user_attrs.get("mlflow_run_id")
        if not (self.cfg.tracking.log_best_model and run_id and best_dir.exists()):
            return
        if (best_dir / "TRIAL").read_text().strip() != str(best.number):
            logging.getLogger("harness").warning(
                "the saved best model is not trial %d's (its process died before keeping it): "
                "no model logged; `harness train` with its params makes one",
                best.number,
            )
            return
        if self.tracker.run_tags(run_id).get("harness.model_logged") == "true":
            return  # logged by an earlier invocation of this study
        name = None
        if self.cfg.tracking.register_best_model:
            name = self.cfg.tracking.registered_model_name or f"{self.cfg.name}-best"
        uri = self.tracker.log_model(run_id, self.plan.backend, best_dir, self.cfg.data.task, name)
        self.tracker.set_tag(run_id, "harness.model_logged", "true")
        self.tracker.set_tag(self.parent_id, "best_model_uri", uri)
        study.set_user_attr("best_model_uri", uri)


def owner_gone(trial: optuna.trial.FrozenTrial, grace_s: float) -> bool:
    """Whether the process that made ``trial`` RUNNING is dead (harness.storage records it as
    the trial becomes RUNNING): its "worker" pid is gone from this host; else, for a trial
    popped from the queue before its "worker" was written, every process that claimed it is
    gone from this host. A trial of another host is left to heartbeats. A trial with no owner
    at all was made by something else than harness (a script's study.ask(), an older harness):
    gone once it has been RUNNING for storage.grace_s, a time in which any live process of
    harness would have named itself (it does in milliseconds; clocks of hosts sharing a
    database are assumed to agree far closer than that)."""
    host = socket.gethostname()
    worker = trial.user_attrs.get(WORKER_ATTR)
    claims = [v for k, v in trial.user_attrs.items() if k.startswith(CLAIM_PREFIX)]
    owners = [worker] if worker else claims
    if owners:
        return all(o.get("host") == host and not alive(int(o.get("pid", 0))) for o in owners)
    started = trial.datetime_start
    if started is None:
        return False
    now = datetime.datetime.now(started.tzinfo)
    return (now - started).total_seconds() > grace_s


def describe_failure(exc: BaseException) -> str:
    """Why a trial failed, fit to print and store: secrets redacted, a full disk named."""
    reason = redact_text(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason += " (the disk is full: free space where runs/ and the MLflow artifacts live)"
    return reason


def _store_unwritable(exc: BaseException) -> bool:
    """The MLflow SQLite store refused a write: a read-only file, folder or file system."""
    return "readonly database" in str(exc) or "read-only file system" in str(exc).lower()


class BudgetExceededError(RuntimeError):
    pass


class SurplusTrialError(RuntimeError):
    pass


def study_spend(study: optuna.Study, exclude: int = -1) -> float:
    """USD spent by the study's trials: what finished ones cost, and for running ones (other
    workers) the larger of their spend so far and their estimate. A crashed trial whose retry
    has started is left out: the retry follows the same job and reports its whole cost."""
    trials = study.get_trials(deepcopy=False)
    taken_over = {
        t.user_attrs["harness_retry_of"]
        for t in trials
        if "harness_retry_of" in t.user_attrs and t.state != optuna.trial.TrialState.WAITING
    }
    billed = study.user_attrs
    total = 0.0
    for trial in trials:
        if trial.number == exclude or trial.number in taken_over:
            continue
        spent = float(trial.user_attrs.get("cost_usd", 0.0))
        if trial.state == optuna.trial.TrialState.RUNNING:
            spent = max(spent, float(trial.user_attrs.get("cost_estimate_usd", 0.0)))
        # an abandoned job's bill, read back once it was cancelled, replaces any estimate
        total += float(billed.get(billed_key(trial.number), spent))
    return total


def billed_key(number: int) -> str:
    """The study attr holding what trial ``number``'s abandoned job billed (one key per trial:
    workers setting them at once do not overwrite each other's)."""
    return f"harness_billed_usd_{number}"


@dataclass
class Trained:
    """What `harness train` made: the result, its MLflow run, the logged model (if any)."""

    result: TrialResult
    run_id: str
    model_uri: str | None = None  # models:/NAME/VERSION when registered


def train_once(
    cfg: DictConfig,
    overrides: list[str],
    name: str = "train",
    tags: Mapping[str, str] | None = None,
    with_validation: bool = False,
    register_as: str | None = None,
) -> Trained:
    """`harness train`: one run with the config's values (no search), tracked like a trial but
    as a top-level run named <name>-<time>. ``with_validation`` trains on train + validation
    (the final fit once the search is over): early stopping is then off, as the validation
    split no longer tells over-fitting apart, and the test split stays held out. A local
    model is logged, and registered under ``register_as`` when given."""
    plan = plan_study(cfg)
    if with_validation:
        data = plan.dataset
        plan.dataset = replace(data, train=[*data.train, *data.validation])
        plan.cfg = with_params(plan.cfg, {"train.patience": 0})
    params = {key: OmegaConf.select(plan.cfg, key) for key in cfg.search.space}
    plan.prepared = plan.backend.prepare(plan.cfg, plan.dataset)
    tracker = MLflowTracker(plan.cfg, plan.dataset.file_hashes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = runs_dir(plan.cfg) / "checkpoints" / plan.cfg.name / f"{name}-{stamp}"
    run_tags = {
        "harness.overrides": " ".join(redact_override(o) for o in overrides)[:4000],
        "harness.trained_on": "train+validation" if with_validation else "train",
        **provenance(plan.dataset.file_hashes, plan.cfg.seed),
        **(tags or {}),
    }
    result, run = run_trial(
        plan,
        tracker,
        params,
        -1,
        f"{name}-{stamp}",
        workdir,
        run_tags,
        save_model=plan.cfg.tracking.log_best_model or register_as is not None,
        key=f"{name}-{uuid.uuid4().hex[:12]}",
    )
    model_uri = None
    if result.model_dir is not None:
        model_uri = tracker.log_model(
            run.run_id, plan.backend, result.model_dir, plan.cfg.data.task, register_as
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return Trained(result, run.run_id, model_uri)


def load_study(cfg: DictConfig) -> optuna.Study:
    """The stored study ``cfg.name``; a ConfigError, and no file created, when there is none."""
    study = existing_study(cfg)
    if study is None:
        raise ConfigError(
            f"no study named {cfg.name!r} in {describe_storage(cfg)}; run "
            f"`harness sweep study={cfg.name}` first"
        )
    return study
