"""The end of a sweep: why it fell short of sweep.n_trials, the parent run's summary metrics, the
best trial's model logged (and registered) in MLflow, and the parent run of a study that
stopped."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import DictConfig

from harness.secrets import redact_text
from harness.storage import storage_error
from harness.study.plan import Plan
from harness.study.queries import (
    FINISHED_STATES,
    RUNNING,
    StudySummary,
    best_trial,
    is_multi_objective,
    reproduce_command,
    study_spend,
    summarize,
)
from harness.study.recovery import others_running
from harness.study.stop_rules import HOW_TO_GO_ON, go_on
from harness.study.trial import TrialOutcome
from harness.tracking import Tracker, TrackingServerError, tracking_uri


@dataclass
class SweepEnding:
    """What `harness sweep` says once its trials are done, read from the study once."""

    spent_usd: float | None  # None: no trial spent money
    stop_reason: str  # why this invocation stopped starting trials ("" if it did not)
    shortfall: str  # why the study is short of sweep.n_trials ("" if it is not)
    last_failure: str  # the last failed trial's reason, for a study where none completed
    summary: StudySummary
    report_command: str  # `harness report` with this sweep's overrides (redacted)
    stop_rule: str = ""  # the stop rule that ended it, a normal end (sweep.target...), if one did


class SweepFinish:
    """The closing half of a Sweep (a mixin: it reads the sweep's config, tracker, parent run
    and the failures and stop reason of this invocation)."""

    cfg: DictConfig
    overrides: list[str]
    plan: Plan
    tracker: Tracker
    parent_id: str
    is_helper: bool
    checkpoints: Path
    stop_reason: str
    stop_rule: str
    provider_refused: bool
    failed: list[TrialOutcome]
    trials_run: int

    def ending(self, study: optuna.Study) -> SweepEnding:
        trials = study.get_trials(deepcopy=False)
        reasons = [t.user_attrs.get("fail_reason", "") for t in trials]
        paid = any("cost_usd" in t.user_attrs for t in trials)
        return SweepEnding(
            spent_usd=study_spend(study) if paid else None,
            stop_reason=self.stop_reason,
            shortfall=self.shortfall(study),
            last_failure=next((r for r in reversed(reasons) if r), "no reason recorded"),
            summary=summarize(study, self.plan.objectives),
            report_command=reproduce_command("report", self.overrides, {}),  # redacted
            # a rule's stop is a normal end only when no trial of this sweep failed
            stop_rule="" if self.failed else self.stop_rule,
        )

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
        if self.stop_rule and not self.failed:  # a normal end: nothing to try again
            return f"{finished} of {wanted} trials finished; " + "; ".join(
                [*why, f"{go_on(self.stop_rule)}."]
            )
        if self.stop_reason:
            why.append("the study stopped (see above)")
        elif self.cfg.sweep.timeout_s is not None and not self.failed:
            why.append(f"sweep.timeout_s={self.cfg.sweep.timeout_s} was reached")
        if self.provider_refused:
            again = "Run it on a provider that trains (see above): this one would refuse again."
        elif self.stop_rule and self.stop_rule != "sweep.timeout_s":
            # the rule still holds on a rerun, which would start no trial: only going past it
            # runs the missing ones
            again = f"The same command would start no trial: {HOW_TO_GO_ON[self.stop_rule]}."
        else:
            again = "Run the same command to try again: it runs only the missing trials."
        return (
            f"{finished} of {wanted} trials finished"
            + (f"; {'; '.join(why)}" if why else "")
            + f". {again}"
        )

    def _finish(self, study: optuna.Study) -> None:
        settled = self.tracker.settle_parent(self.parent_id)
        if settled != self.parent_id:  # another worker's parent run became the study's
            self.parent_id = settled
            study.set_user_attr("mlflow_parent_run_id", settled)
        trials = study.get_trials(deepcopy=False)
        counts = {
            state.name.lower(): sum(1 for t in trials if t.state == state)
            for state in optuna.trial.TrialState
        }
        metrics = {f"trials_{k}": float(v) for k, v in counts.items() if k != "waiting"}
        metrics["spend_usd"] = study_spend(study)
        if self.stop_reason:
            self.tracker.set_tag(self.parent_id, "harness.stop_reason", self.stop_reason)
        if self.stop_reason or self.trials_run:  # for the report; "" once a sweep goes on (a
            # run that starts no trial, `harness confirm` or a complete study, keeps it)
            study.set_user_attr("stop_reason", self.stop_reason)
        best = best_trial(study)
        if best is not None:
            metrics["best_objective"] = float(best.values[0])
            if is_multi_objective(study):
                metrics["pareto_front_size"] = float(len(study.best_trials))
            self.tracker.set_tag(self.parent_id, "best_trial", str(best.number))
            self._log_best_model(study, best)
        # the last worker to finish closes the parent run; others leave it RUNNING for it
        self.tracker.finish_parent(self.parent_id, metrics, close=not others_running(study))

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

    def _close_parent(self, study: optuna.Study, exc: BaseException) -> None:
        """The parent run of a study stopped by ``exc``: FAILED when the Optuna storage failed
        (it is not asked whether other workers run on: it would fail again, and they cannot
        record their trials either), else KILLED unless trials of other processes run on."""
        if self.is_helper:
            return
        gone = storage_error(exc) is not None
        if not gone:
            try:
                if others_running(study):
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
