"""Recovery within a sweep: trials left RUNNING by a process that is gone (a crash, kill -9, a
lost host) or by a storage failure are failed and retried once, their MLflow runs closed; the
storage's blips are waited out with backoff."""

from __future__ import annotations

import datetime
import logging
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.backends.base import PaidBackend
from harness.storage import CLAIM_PREFIX, STORAGE_ATTEMPTS, WORKER_ATTR
from harness.study.objective import trial_workdir
from harness.study.plan import Plan
from harness.study.queries import RUNNING, billed_key
from harness.study.trial import describe_failure, final_metrics
from harness.tracking import Tracker
from harness.workers import alive, worker_identity


class Recovery:
    """The recovery half of a Sweep (a mixin: it reads the sweep's config, plan, storage and
    tracker)."""

    cfg: DictConfig
    plan: Plan
    storage: Any  # the Optuna storage the sweep's study lives in
    checkpoints: Path  # the trials' scratch folders
    tracker: Tracker

    def _fail_own_running(self, study: optuna.Study) -> None:
        """After a storage error: this process's trial that could not be told is failed and
        retried once, like a trial whose process died."""
        me = worker_identity()
        for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
            if trial.user_attrs.get(WORKER_ATTR) == me:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                self._retry_or_abandon(study, trial, "the storage failed during this trial")

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
                if spent:  # another process's trial: set through the storage, as no Trial holds it
                    self._set_trial_attr(study, trial.number, "cost_usd", spent)
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):
                continue  # it did: the retry is its to make
            self._retry_or_abandon(study, trial, "the process running this trial ended")

    def _set_trial_attr(self, study: optuna.Study, number: int, key: str, value: Any) -> None:
        """A user attr of trial ``number`` of ``study``, through the storage's public API (a
        FrozenTrial has no setter, and its storage id is private)."""
        study_id = self.storage.get_study_id_from_name(study.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self.storage.set_trial_user_attr(trial_id, key, value)

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
        else:  # its state, saved for a retry, will not be used
            shutil.rmtree(trial_workdir(self.checkpoints, trial), ignore_errors=True)
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

    def _close_abandoned_runs(self, study: optuna.Study) -> None:
        """MLflow runs left RUNNING by processes that ended (see MLflowTracker)."""
        trials = {
            t.number: (t.state.name, str(t.user_attrs.get("fail_reason", "")))
            for t in study.get_trials(deepcopy=False)
        }
        metric = self.plan.objectives[0][0]
        finals = {  # a completed trial's final metrics, for a run that lacks them
            t.number: (
                int(t.user_attrs.get("steps", 0)),
                final_metrics(t.user_attrs["metrics"], metric),
            )
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if metric in t.user_attrs.get("metrics", {})
        }
        try:
            self.tracker.close_abandoned_runs(trials, finals)
        except Exception as exc:  # the runs stay as they are; the study goes on
            logging.getLogger("harness").warning(
                "could not close MLflow runs left open: %s", describe_failure(exc)
            )


def others_running(study: optuna.Study) -> bool:
    """Trials of other processes (other hosts) still running: the parent run stays open."""
    me = worker_identity()
    return any(
        t.user_attrs.get(WORKER_ATTR) != me
        for t in study.get_trials(deepcopy=False, states=(RUNNING,))
    )


def storage_wait(cfg: DictConfig, attempt: int) -> float:
    """Seconds to wait after the storage failed ``attempt + 1`` times: storage.retry_s in all,
    doubling (2, 4, 8 s of 14 s)."""
    return float(cfg.storage.retry_s) * 2**attempt / (2 ** (STORAGE_ATTEMPTS - 1) - 1)


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
