"""Run or resume a study: Optuna samples, a backend trains, MLflow records.

Everything that can be checked is checked before the first trial (harness.study.plan), and the
stored study is read once, through the storage the sweep goes on to write with. A failing trial
fails alone (its run is marked FAILED with the reason) and the study goes on.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.study import StudyDirection

from harness import continuation, search
from harness.config import ConfigError, runs_dir
from harness.gpus import pin_this_process, worker_envs
from harness.pareto_pruner import active, pruner_for_objectives
from harness.provenance import provenance
from harness.pruning import make_pruner
from harness.secrets import first_line, redact_override
from harness.storage import (
    STORAGE_ATTEMPTS,
    StorageGoneError,
    describe_storage,
    disk_full_error,
    full_disk,
    storage_error,
    storage_exists,
    storage_for,
)
from harness.study.confirm import ConfirmStep, check_confirm, check_same_run
from harness.study.finish import SweepFinish
from harness.study.objective import TrialObjective
from harness.study.plan import check_resume, check_same_study, plan_study
from harness.study.queries import FINISHED_STATES, RUNNING, count_finished, ranked_trials
from harness.study.recovery import Recovery, storage_wait
from harness.study.stop_rules import any_rule, stop_rule_met, time_budget
from harness.study.trial import ProgressCallback, TrialOutcome
from harness.study.warmstart import WarmStart
from harness.tracking import (
    MLflowTracker,
    TrackerFactory,
    TrackingServerError,
    check_store_writable,
    check_tracking_server,
    is_unreachable,
    tracking_uri,
    unreachable_reason,
)
from harness.workers import HELPER_ENV, PARENT_ENV, Preempted, overrides_env, stop, wait_for


class Sweep(WarmStart, Recovery, TrialObjective, SweepFinish, ConfirmStep):
    """One invocation of `harness sweep`: runs the trials still missing, then summarises."""

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str],
        on_trial: Callable[[TrialOutcome], None] = lambda outcome: None,
        on_progress: ProgressCallback | None = None,
        tracker_factory: TrackerFactory = MLflowTracker,
    ) -> None:
        if cfg.sweep.n_workers > 1 and tracker_factory is not MLflowTracker:
            # worker processes record in MLflow under the parent run this process makes
            raise ValueError("sweep.n_workers > 1 records in MLflow: use the MLflowTracker")
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
        # told how many trials the stored study had finished, once it is read (a progress bar)
        self.on_start: Callable[[int], None] = lambda finished: None
        if cfg.sweep.devices and not self.is_helper:
            # before the plan's checks ask CUDA anything: CUDA reads the variable once
            pin_this_process(worker_envs(list(cfg.sweep.devices))[0])
        self.plan = plan_study(cfg)
        self.cfg = self.plan.cfg
        check_confirm(self.cfg, self.plan)  # sweep.confirm_top_k: harness.study.confirm
        # warm-start param sets, found before anything is written (another study may be missing)
        self.warm_sets = [] if self.is_helper else self._warm_sets()
        self.checkpoints = runs_dir(self.cfg) / "checkpoints" / self.cfg.name
        self.stop_reason = ""  # why the study stopped before n_trials (the budget), if it did
        self.stop_rule = ""  # ... when a stop rule did, as a normal end: its key (sweep.target)
        self.provider_refused = False  # ... because the provider takes no new jobs
        self.tracking_gone = ""  # why MLflow could not be reached mid-study, if it could not
        self.store_unwritable = ""  # the message for an MLflow store that refused a write
        self.disk_full: BaseException | None = None  # the out-of-space error that stopped it
        self.storage: Any = None  # the Optuna storage, opened once: by preflight if it exists
        self.existing: optuna.Study | None = None  # the study as stored before this sweep
        self.carried: list[optuna.trial.FrozenTrial] = []  # sweep.continue_from's trials
        self.failed: list[TrialOutcome] = []  # trials this invocation ran that failed
        self.trials_run = 0  # ... and how many it ran to an end (any state)

    def preflight(self) -> None:
        """Every check this sweep makes, before anything is written to any store: the stored
        study (its objectives, what it is, its search space), where a continuation starts, the
        tracking server, and the backend's preparation (an API key, the data's upload).
        Raises ConfigError saying what to do."""
        self.existing = self._stored_study()
        finished = 0
        if self.existing is not None:
            check_resume(self.existing, self.plan, self.overrides)
            if self.cfg.sweep.confirm_top_k > 0:  # refused now rather than after the trials
                for trial in ranked_trials(self.existing)[: self.cfg.sweep.confirm_top_k]:
                    check_same_run(self.overrides, trial)
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
        self.on_start(finished if self.existing is not None else 0)  # carried ones: not yet
        check_tracking_server(tracking_uri(self.cfg), self.cfg.tracking.server_timeout_s)
        check_store_writable(tracking_uri(self.cfg))
        if finished < self.cfg.sweep.n_trials and not self._stopped_before_start():
            self.plan.prepared = self.plan.backend.prepare(self.cfg, self.plan.dataset)

    def _stopped_before_start(self) -> bool:
        """Whether the study as it will start (the stored one, or the trials a continuation
        carries) meets a stop rule already: then no trial starts, and preparing would be for
        nothing (a hosted backend's upload, which can fail). Asked after every check. Not
        skipped where a confirm step may follow (sweep.confirm_top_k): it runs after a stop
        rule's end and trains, and its backend must be prepared here, before any write."""
        if not any_rule(self.cfg) or self.cfg.sweep.confirm_top_k > 0:
            return False
        start = self.existing
        if start is None and self.carried:  # judged as the new study will hold them
            directions = [StudyDirection[d.upper()] for _, d in self.plan.objectives]
            start = optuna.create_study(directions=directions)  # in memory
            start.add_trials(self.carried)
        return start is not None and self._met_stop_rule(start, before_start=True)

    def _stored_study(self) -> optuna.Study | None:
        """The study as stored, read through the storage this sweep then writes with; None, and
        nothing created (no journal file, no table), when there is none yet."""
        if not storage_exists(self.cfg):
            return None
        self.storage = storage_for(self.cfg, on_stale=self._on_stale_heartbeat)
        try:
            return optuna.load_study(study_name=self.cfg.name, storage=self.storage)
        except KeyError:
            return None

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
        if self.storage is None:  # a new study: its storage is made now
            self.storage = storage_for(c, on_stale=self._on_stale_heartbeat)
        # A resumed sweep seeds its sampler past the trials already there: the same seed again
        # would re-draw the first trials' parameters. A fresh sweep is seeded with c.seed.
        done = len(self.existing.trials) if self.existing is not None else 0
        seed = c.seed + done + 1000 * self.seed_index
        sampler = search.make_sampler(
            c.sampler.name, seed, c.sampler.n_startup_trials, self.plan.distributions
        )
        goals = self.plan.objectives
        if len(goals) == 1:
            pruner = make_pruner(c.pruner, self.plan.evaluations)
        else:  # Optuna's pruners judge one objective: several are ranked (pareto_pruner)
            pruner = pruner_for_objectives(c.pruner, goals, self.plan.evaluations)
        return optuna.create_study(
            study_name=c.name,
            storage=self.storage,
            sampler=sampler,
            pruner=pruner,
            directions=[StudyDirection[d.upper()] for _, d in goals],
            load_if_exists=True,
        )

    def run(self) -> optuna.Study:
        # Optuna's own "trial failed" warnings would print errors unredacted; ours are redacted
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.started_at = time.monotonic()  # sweep.timeout_s counts from here (confirm step too)
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
        self._store_study_attrs(study)
        self._start_parent_run(study)
        try:
            self._run_trials_and_close(study)
        finally:  # what is still on its way to MLflow is there before the caller reads it
            self.tracker.close_writes()
        return study

    def _run_trials_and_close(self, study: optuna.Study) -> None:
        self.workers: list[subprocess.Popen[bytes]] = []
        try:
            self._run_trials(study)
        except BaseException as exc:
            stop(self.workers, preempted=isinstance(exc, Preempted))
            self._close_parent(study, exc)
            full = full_disk(exc)
            if full is not None and not isinstance(exc, ConfigError):
                raise disk_full_error(runs_dir(self.cfg), full) from exc
            if is_unreachable(exc) and not self.tracking_gone:  # outside a trial
                raise self._tracking_gone_error(unreachable_reason(exc)) from exc
            raise

    def _store_study_attrs(self, study: optuna.Study) -> None:
        if self.carried and "harness_continued_from" not in study.user_attrs:
            study.add_trials(self.carried)
            study.set_user_attr("harness_continued_from", str(self.cfg.sweep.continue_from))
        study.set_user_attr("overrides", self.overrides)
        # for report and best
        study.set_user_attr("objectives", [list(goal) for goal in self.plan.objectives])
        goals = self.plan.objectives  # whether the last sweep pruned by Pareto rank: the report
        study.set_user_attr("pareto_pruning", len(goals) > 1 and active(self.cfg.pruner, goals))
        study.set_user_attr("fingerprint", self.plan.fingerprint)  # adopted by older studies
        study.set_user_attr("mlflow_experiment", self.cfg.tracking.experiment or self.cfg.name)
        # Names this study's trials to hosted providers (see the trial key in _objective). Two
        # workers starting at once may each store their own: harmless, trial numbers differ.
        if "harness_uid" not in study.user_attrs:
            study.set_user_attr("harness_uid", uuid.uuid4().hex[:12])
        self.uid = str(study.user_attrs["harness_uid"])

    def _start_parent_run(self, study: optuna.Study) -> None:
        """The tracker, runs left open by ended processes closed, and the study's parent run."""
        tracker = self.tracker_factory(self.cfg, self.plan.dataset.file_hashes)
        self.tracker = tracker
        self._fail_stale_trials(study)
        self._close_abandoned_runs(study)
        tags = {
            "optuna.study_name": study.study_name,
            "optuna.storage": describe_storage(self.cfg),
            **provenance(self.plan.dataset.file_hashes, self.cfg.seed),
        }
        parent_id = os.environ.get(PARENT_ENV) or tracker.parent_run(tags)
        study.set_user_attr("mlflow_parent_run_id", parent_id)
        self.tags = tags
        self.parent_id = parent_id

    def _run_trials(self, study: optuna.Study) -> None:
        """The missing trials, in this process and its workers (``self.workers``: stopped by
        the caller if this raises); then the summary."""
        missing = self.cfg.sweep.n_trials - count_finished(study)
        if missing > 0 and self._met_stop_rule(study, before_start=True):
            missing = 0  # a resumed study that meets a stop rule already: no trial starts
        if missing > 0 and not self.is_helper:
            self._warm_start(study)
        if missing > 0 and not self._enough(study):
            self.workers = self._start_workers()
            self._optimize(study, missing)
        wait_for(self.workers)
        if self.workers:  # a helper that died left its trial RUNNING: fail it and run the retry
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
            self._confirm(study)  # sweep.confirm_top_k > 0: the best trials with new seeds
            self._finish(study)

    def _optimize(self, study: optuna.Study, n_trials: int) -> None:
        """study.optimize, riding out storage errors: a database that drops out for a moment
        (a restart, a network blip) costs a wait with backoff, not the study. The trial in
        flight is failed and retried once with its params; a storage still failing after the
        last wait stops the study (see run)."""
        for attempt in range(STORAGE_ATTEMPTS):
            if self.stop_rule:  # met by a trial of this process: no retry after its workers
                return
            try:
                started = time.monotonic()
                if attempt > 0:  # after a wait: first the trial the failure left RUNNING
                    self._fail_own_running(study)
                    if self._enough(study):
                        return
                study.optimize(
                    self._objective,
                    n_trials=n_trials,  # a bound: failed trials are replaced, but not forever
                    timeout=self.cfg.sweep.timeout_s,
                    catch=(Exception,),
                    callbacks=[self._after_trial, self._stop_when_enough, self._stop_by_rule],
                    # no gc_after_trial: ~200 ms a trial with torch loaded; the local backend
                    # collects after its own trials, which are the ones holding big objects
                )
                self._note_timeout(study, time.monotonic() - started)
                return
            except Exception as exc:
                cause = storage_error(exc)
                # a full disk stays full for longer than any wait: run() says so at once
                if cause is None or attempt == STORAGE_ATTEMPTS - 1 or full_disk(cause):
                    raise
                wait = storage_wait(self.cfg, attempt)
                logging.getLogger("harness").warning(
                    "the Optuna storage failed (%s: %s); retrying in %.3g s",
                    type(cause).__name__,
                    first_line(cause),
                    wait,
                )
                time.sleep(wait)

    def _enough(self, study: optuna.Study) -> bool:
        """Finished and running trials (of any worker) already make up sweep.n_trials."""
        trials = study.get_trials(deepcopy=False, states=(*FINISHED_STATES, RUNNING))
        return len(trials) >= self.cfg.sweep.n_trials

    def _stop_when_enough(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._fail_stale_trials(study)  # a worker that died must not count as running
        if self._enough(study):
            study.stop()

    def _met_stop_rule(self, study: optuna.Study, before_start: bool = False) -> bool:
        """Whether a stop rule (harness/study/stop_rules.py) ends the study now; if so, it is
        the stop reason. Not asked once sweep.n_trials is made up: that is no early stop."""
        if self.stop_reason or not any_rule(self.cfg) or self._enough(study):
            return bool(self.stop_rule)
        stop = stop_rule_met(self.cfg, study, self.plan.objectives[0], before_start)
        if stop is not None:
            self.stop_rule, self.stop_reason = stop.rule, stop.message
        return stop is not None

    def _stop_by_rule(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._met_stop_rule(study):
            study.stop()

    def _note_timeout(self, study: optuna.Study, elapsed_s: float) -> None:
        """study.optimize ended by sweep.timeout_s (rather than by a rule, a failure or the
        trials made up) becomes the stop reason."""
        timeout = self.cfg.sweep.timeout_s
        if timeout is None or elapsed_s < timeout or self.stop_reason or self._enough(study):
            return
        if self.failed:  # Optuna's trial cap, used up by failures, may have ended it instead
            return
        stop = time_budget(timeout)
        self.stop_rule, self.stop_reason = stop.rule, stop.message

    def _start_workers(self) -> list[subprocess.Popen[bytes]]:
        """sweep.n_workers - 1 more processes on this study; this one is the first. With
        sweep.devices, each process sees only its GPU (harness/gpus.py)."""
        devices = worker_envs(list(self.cfg.sweep.devices)) or [{}] * self.cfg.sweep.n_workers
        pin_this_process(devices[0])
        extra = self.cfg.sweep.n_workers - 1
        if extra <= 0 or self.is_helper:
            return []
        # the overrides go in the environment: they may hold secrets (workers.OVERRIDES_ENV)
        command = [sys.executable, "-m", "harness.cli", "sweep", "sweep.n_workers=1"]
        command.append("sweep.devices=[]")  # pinned by this process
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
                    **devices[index],
                },
                start_new_session=True,  # Ctrl-C is forwarded once, by workers.stop
            )
            for index in range(1, extra + 1)
        ]
