"""The sweep's Optuna objective: one sampled trial run through ``run_trial``, its spend held to
the budget, its result stored on the Optuna trial, and after it the best model kept."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from harness import search
from harness.backends.base import PaidBackend, TrialResult
from harness.backends.hosted import ProviderRefusedError
from harness.config import with_params
from harness.storage import full_disk
from harness.study.plan import Plan
from harness.study.queries import FINISHED_STATES, RUNNING, best_trial, study_spend
from harness.study.trial import (
    BudgetExceededError,
    ProgressCallback,
    SurplusTrialError,
    TrialOutcome,
    describe_failure,
    is_store_unwritable,
    run_trial,
)
from harness.tracking import (
    UNRECORDED,
    TrackedRun,
    Tracker,
    is_unreachable,
    tracking_uri,
    unreachable_reason,
    unwritable_store_message,
)
from harness.workers import Preempted, locked


class TrialObjective:
    """The objective half of a Sweep (a mixin: it reads the sweep's config, plan, tracker and
    parent run, and records why the study stopped)."""

    cfg: DictConfig
    plan: Plan
    overrides: list[str]
    uid: str
    checkpoints: Path
    tags: dict[str, str]
    tracker: Tracker
    parent_id: str
    on_trial: Callable[[TrialOutcome], None]
    on_progress: ProgressCallback | None
    stop_reason: str
    provider_refused: bool
    tracking_gone: str
    store_unwritable: str
    disk_full: BaseException | None
    failed: list[TrialOutcome]
    trials_run: int  # trials this invocation ran to an end, in this process
    is_helper: bool  # a worker process of sweep.n_workers: it prints no ending of its own

    def _objective(self, trial: optuna.Trial) -> float | list[float]:
        """One trial; whatever fails it, sampling included (Optuna refuses a value a stored
        distribution does not allow), is recorded as its ``fail_reason``."""
        try:
            return self._run_one(trial)
        except optuna.TrialPruned:
            raise
        except Preempted:
            _retry_preempted(trial)
            raise
        except Exception as exc:
            if "fail_reason" not in trial.user_attrs:
                trial.set_user_attr("fail_reason", describe_failure(exc)[:2000])
            raise

    def _run_one(self, trial: optuna.Trial) -> float | list[float]:
        # (the storage named this process the trial's "worker" as it made the trial RUNNING)
        self._check_surplus(trial)
        trial.set_user_attr("overrides", self.overrides)
        params = search.suggest(trial, self.plan.distributions)
        # A retry of a crashed trial keeps that trial's key: a hosted backend re-attaches to the
        # job it started. Otherwise the key is new: the study's uid and the trial number.
        key = trial.user_attrs.get("harness_trial_key") or f"{self.uid}-{trial.number}"
        trial.set_user_attr("harness_trial_key", key)
        self._check_budget(trial, {**self.plan.fixed, **params})
        workdir = trial_workdir(self.checkpoints, trial)
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
            self._stop_if_all_would_fail(trial, exc)
            raise
        self._store_result(trial, result, run)
        values = [float(result.metrics[metric]) for metric, _ in self.plan.objectives]
        return values[0] if len(values) == 1 else values

    def _check_surplus(self, trial: optuna.Trial) -> None:
        """Workers check the count before asking for a trial; two asking at the same moment can
        both pass. The lower trial numbers win and the surplus one stops here, unrun."""
        earlier = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, RUNNING))
            if t.number < trial.number
        ]
        if len(earlier) >= self.cfg.sweep.n_trials:
            trial.set_user_attr("fail_reason", "surplus: other workers took the last trials")
            trial.study.stop()
            raise SurplusTrialError("sweep.n_trials already reached by other workers")

    def _stop_if_all_would_fail(self, trial: optuna.Trial, exc: Exception) -> None:
        """Records why a trial failed; a failure every next trial would share stops the study."""
        trial.set_user_attr("fail_reason", describe_failure(exc)[:2000])
        if isinstance(exc, ProviderRefusedError):  # so would every next job request
            self.stop_reason, self.provider_refused = str(exc), True
            trial.study.stop()
        if is_unreachable(exc):  # every next trial would fail the same way, slowly
            self.tracking_gone = unreachable_reason(exc)
            trial.study.stop()
        full = full_disk(exc)
        if full is not None:  # so would they on a full disk, each one at once
            self.disk_full = full
            trial.study.stop()
        elif is_store_unwritable(exc):  # ... or at once: the study stops here
            self.store_unwritable = unwritable_store_message(
                tracking_uri(self.cfg), describe_failure(exc).splitlines()[0][:300]
            )
            trial.study.stop()

    def _store_result(self, trial: optuna.Trial, result: TrialResult, run: TrackedRun) -> None:
        try:
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("metrics", result.metrics)
            trial.set_user_attr("steps", result.steps)
        except BaseException:  # the storage failed: the trial fails after its run FINISHED
            with contextlib.suppress(Exception):
                run.set_tags({"optuna.trial_state": "FAIL", "harness.failure_reason": UNRECORDED})
                run.terminate("FAILED")
            raise

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
        workdir = trial_workdir(self.checkpoints, trial)
        self._keep_if_best(study, trial, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        outcome = trial_outcome(trial)
        self.trials_run += 1
        if self.stop_reason and self.stop_reason in outcome.reason and not self.is_helper:
            # the failure that stopped the study is said once, in full, as why it stopped
            kind = outcome.reason.split(":", 1)[0]
            outcome.reason = f"{kind}, which stops the study: see 'stopped' as it ends"
        if outcome.state == "FAIL" and not outcome.reason.startswith("surplus"):
            self.failed.append(outcome)
        self.on_trial(outcome)

    def _keep_if_best(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, workdir: Path
    ) -> None:
        best = self.checkpoints / "best"
        best_now = best_trial(study)
        is_best = best_now is not None and best_now.number == trial.number
        if not (is_best and (workdir / "model").exists()):
            return
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


def _retry_preempted(trial: optuna.Trial) -> None:
    """A trial stopped by SIGTERM (a scheduler took the machine) is retried by the next sweep
    of the study, in the same folder (its saved state) and under the same trial key (a hosted
    job re-attached to). Optuna records the trial itself as failed."""
    key = trial.user_attrs.get("harness_trial_key")
    if key is None:  # stopped before its params were drawn: nothing of it to go on from
        return
    trial.set_user_attr(
        "fail_reason", "pre-empted (SIGTERM): the next sweep retries it from its saved state"
    )
    root = int(trial.user_attrs.get("harness_retry_of", trial.number))  # its folder's trial
    trial.study.enqueue_trial(
        trial.params, user_attrs={"harness_retry_of": root, "harness_trial_key": key}
    )


def trial_workdir(checkpoints: Path, trial: optuna.Trial | optuna.trial.FrozenTrial) -> Path:
    """A trial's scratch folder. A retry of a trial whose process died (or was pre-empted)
    works in that trial's folder: the local backend finds the state saved there and goes on
    from it. (A retry whose process dies is not retried again, and a pre-empted one is retried
    in the first trial's folder: no two trials share a folder at once.)"""
    number = int(trial.user_attrs.get("harness_retry_of", trial.number))
    return checkpoints / f"trial-{number:04d}"


def trial_outcome(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    """A finished trial as the display shows it."""
    reason = ""
    if trial.state == optuna.trial.TrialState.FAIL:
        reason = str(trial.user_attrs.get("fail_reason", ""))
    return TrialOutcome(
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
