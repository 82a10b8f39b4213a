"""What every tracker records the same way, whatever its store: the tags that find a study's
runs, the config as logged, and how a run another process left RUNNING is closed."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from harness.secrets import redact
from harness.workers import alive

STUDY_TAG = "harness.study"
ROLE_TAG = "harness.role"
TAG_LIMIT = 4000  # characters of a tag value MLflow keeps (a longer one is refused)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, secrets redacted (written once per trial: libyaml's C
    emitter where there is one, ~1 ms instead of OmegaConf's ~5)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(
        yaml.dump(
            redact(OmegaConf.to_container(cfg, resolve=True)),
            Dumper=dumper,
            sort_keys=False,
            allow_unicode=True,
        )
    )


ABANDONED = "its process ended before it could close this run"
UNRECORDED = (
    "its process ended (or the Optuna storage failed) before Optuna recorded this result; "
    "Optuna failed the trial and retried it"
)


def stale_run_tags(status: str, reason: str) -> dict[str, str] | None:
    """The tags that fail the run (in ``status``) of a trial Optuna failed because its process
    died: one left RUNNING, or one already closed FINISHED whose result Optuna never recorded
    (the process was killed, or the storage failed, between the two), so the tracker counts
    what Optuna does. None: a run already FAILED or KILLED, left as it is."""
    if status not in ("RUNNING", "FINISHED"):
        return None
    why = reason if status == "RUNNING" else UNRECORDED
    return {"optuna.trial_state": "FAIL", "harness.failure_reason": why[:TAG_LIMIT]}


def closing_of(
    tags: Mapping[str, str], trials: Mapping[int, tuple[str, str]]
) -> tuple[str, dict[str, str]] | None:
    """(status, tags) that close a RUNNING run, by what Optuna says of its trial (or, for a
    run of no trial, such as `harness train`'s, whether its process is gone); None: leave it."""
    number = tags.get("optuna.trial_number", "")
    state, reason = trials.get(int(number), ("", "")) if number.isdigit() else ("", "")
    if state in ("COMPLETE", "PRUNED"):
        return "FINISHED", {"optuna.trial_state": state}
    if state == "FAIL":
        return "FAILED", {
            "optuna.trial_state": state,
            "harness.failure_reason": (reason or ABANDONED)[:TAG_LIMIT],
        }
    if not state and _owner_gone(tags):
        return "KILLED", {"harness.failure_reason": ABANDONED}
    return None


def missing_finals(
    tags: Mapping[str, str],
    logged: set[str],
    closing: tuple[str, Mapping[str, str]],
    finals: Mapping[int, tuple[int, Mapping[str, float]]] | None,
) -> tuple[int, dict[str, float]]:
    """(step, metrics) a run closed as a completed trial's lacks (its process, or the writer
    process of harness.tracking.mlflow_writer, was killed before logging them): the final
    metrics Optuna recorded for the trial, none where the run has its ``objective``."""
    number = tags.get("optuna.trial_number", "")
    if closing[1].get("optuna.trial_state") != "COMPLETE" or "objective" in logged:
        return 0, {}
    step, metrics = (finals or {}).get(int(number), (0, {})) if number.isdigit() else (0, {})
    return step, {k: float(v) for k, v in metrics.items() if k not in logged}


WINDOWED = "train/loss"  # reported every step; logged as a mean over tracking.log_every_steps


class LossWindow:
    """train/loss, reported at every step, logged as its mean over each window of ``every``
    steps (at the window's last step), as transformers' Trainer does with logging_steps:
    MLflow's SQLite store spends ~0.15 ms of CPU per metric row, which at every step was most
    of what harness added to a short trial."""

    def __init__(self, every: int) -> None:
        self.every = max(1, int(every))
        self.values: list[float] = []  # train/loss values of the window so far
        self.step = 0  # the step of the last of them

    def take(self, step: int, metrics: Mapping[str, float]) -> Mapping[str, float]:
        """The metrics to log at ``step``: train/loss only when its window closes, as the mean."""
        if WINDOWED not in metrics or self.every == 1:
            return metrics
        metrics = dict(metrics)
        self.values.append(float(metrics.pop(WINDOWED)))
        self.step = step
        if len(self.values) >= self.every:
            metrics[WINDOWED] = self.close()
        return metrics

    def close(self) -> float:
        mean = sum(self.values) / len(self.values)
        self.values = []
        return mean


def trial_run_tags(study: str, tags: Mapping[str, str], parent_id: str | None) -> dict[str, str]:
    """A trial's (or `harness train`'s) run: its study, role and process, under its parent."""
    all_tags = {STUDY_TAG: study, ROLE_TAG: "trial", **tags, **owner_tags()}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id  # what the MLflow UI nests by
    return all_tags


def owner_tags() -> dict[str, str]:
    """Tags naming the process that runs a run: a resume closes runs whose process is gone."""
    return {"harness.host": socket.gethostname(), "harness.pid": str(os.getpid())}


def _owner_gone(tags: Mapping[str, str]) -> bool:
    """The run's process was on this host and is no longer running (elsewhere: unknown)."""
    pid = tags.get("harness.pid", "")
    return (
        tags.get("harness.host") == socket.gethostname() and pid.isdigit() and not alive(int(pid))
    )
