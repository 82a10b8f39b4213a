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
        backend lets it propagate, which stops the trial at once."""


@dataclass(frozen=True)
class TrialSpec:
    number: int  # Optuna trial number; -1 for a single `harness train` run
    config: DictConfig  # the full config with this trial's params applied
    prepared: Any  # what Backend.prepare returned: shared by every trial of the study
    workdir: Path  # this trial's scratch folder: artifacts and a saved model go here
    save_model: bool = True  # save the final model under workdir/model


@dataclass
class TrialResult:
    metrics: dict[str, float]  # eval/* of the kept model (best evaluation) and test/*
    artifacts: list[Path] = field(default_factory=list)  # files to attach to the trial's run
    model_dir: Path | None = None  # saved model (transformers format) when spec.save_model
    steps: int = 0  # optimizer steps taken


class Backend(Protocol):
    # Config keys a search space may vary with this backend: exact keys, or prefixes "train.*".
    tunable_keys: frozenset[str]

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> Any:
        """Once per study: tokenize / upload / convert the data; the result is reused by every
        trial (as TrialSpec.prepared), so it must not depend on searched keys."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        """Runs one trial to the end (or until the reporter raises TrialPruned)."""


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
