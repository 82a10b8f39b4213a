"""The backend protocol: what every way of running a trial (local GPT-2, a hosted job, the fake)
must do. Implementations share no base code; the contract test suite in tests/ checks each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from harness.data import Dataset


class Reporter(Protocol):
    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records metrics at a training step (``train/loss`` each step, ``eval/*`` at each
        evaluation). When the metrics include the study's objective metric, the value is also
        reported to Optuna, and ``optuna.TrialPruned`` is raised if the trial should stop: the
        backend lets it propagate, which stops the trial at once. A backend that spends money
        reports ``cost_usd`` (the trial's spend so far) as it goes, and once its work is
        stopped (pruned, interrupted, failed) what that work billed, in a report without an
        evaluation, so nothing is pruned on it."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Labels the trial's run as soon as something is known (a hosted job's id, say)."""

    def set_total_steps(self, total: int) -> None:
        """The steps the trial will take if nothing stops it early, as soon as it is known
        (again if the estimate changes): the length of the trial's progress bar."""


@dataclass(frozen=True)
class TrialSpec:
    number: int  # Optuna trial number; -1 for a single `harness train` run
    config: DictConfig  # the full config with this trial's params applied
    prepared: Any  # what Backend.prepare returned: shared by every trial of the study
    workdir: Path  # this trial's scratch folder: artifacts and a saved model go here
    save_model: bool = True  # save the final model under workdir/model
    # Stable identity of this trial's work. A retry of a trial whose process died has the key of
    # the trial it retries, so a hosted backend finds the job that process started rather than
    # paying for another. Empty: the backend makes up a unique one.
    key: str = ""


@dataclass
class TrialResult:
    metrics: dict[str, float]  # eval/* of the kept model (best evaluation) and test/*
    artifacts: list[Path] = field(default_factory=list)  # files to attach to the trial's run
    model_dir: Path | None = None  # saved model (transformers format) when spec.save_model
    steps: int = 0  # optimizer steps taken
    # A model that lives with a provider, not on disk: its id and details (job id, base model),
    # recorded in MLflow as an external model entry beside local ones.
    hosted_model: dict[str, str] | None = None


class Backend(Protocol):
    # Config keys a search space may vary with this backend: exact keys, or prefixes "train.*".
    tunable_keys: frozenset[str]

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> Any:
        """Once per study: tokenize / upload / convert the data; the result is reused by every
        trial (as TrialSpec.prepared), so it must not depend on searched keys."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        """Runs one trial to the end (or until the reporter raises TrialPruned)."""


class PaidBackend(Protocol):
    """A backend whose trials cost money: the study checks its budget before each trial."""

    def estimate_cost_usd(self, cfg: DictConfig, prepared: Any) -> float:
        """What a trial with this config would cost, before it is launched."""

    def abandon(self, key: str) -> float | None:
        """Stops paid work started under this trial key that nobody will follow again; returns
        what that work billed in USD once stopped (None: unknown), for the caller to record."""

    def check_credentials(self) -> None:
        """Raises a ConfigError when the provider's credentials are missing or refused; reads
        no file under runs/ and makes at most one request, so a sweep can check it before
        anything else."""


class UntunableKeyError(ValueError):
    pass


def check_tunable(backend_name: str, tunable: frozenset[str], keys: Iterable[str]) -> None:
    """Fails before any trial starts when the search space varies a key the backend ignores."""

    def allowed(key: str) -> bool:
        return key in tunable or any(p.endswith(".*") and key.startswith(p[:-1]) for p in tunable)

    bad = sorted(k for k in keys if not allowed(k))
    if bad:
        raise UntunableKeyError(
            f"backend {backend_name!r} cannot tune {', '.join(bad)}; it tunes "
            f"{', '.join(sorted(tunable))}. Fix the key with a plain value or remove it from "
            "the search space."
        )
