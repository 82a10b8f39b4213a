"""What the study asks of a tracker, whatever records the runs: MLflow (MLflowTracker) or
memory (InMemoryTracker, for fast tests). A study has a parent run; each trial (and each
`harness train`) has a run of its own, made by ``start_run`` and closed by ``end``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig


class TrackedRun(Protocol):
    """One trial's run: its params, metrics, tags, files and end state."""

    run_id: str
    latest: dict[str, tuple[int, float]]  # metric -> (step, value) logged last

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float], buffered: bool = False) -> None:
        """``buffered``: may be sent a moment later, in a batch (``flush`` sends it now)."""

    def flush(self) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def end(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        """status: FINISHED (a complete or a pruned trial: the tag optuna.trial_state tells
        them apart) or FAILED; the last metrics and ``tags`` are recorded first."""

    def terminate(self, status: str) -> None:
        """Closes the run in ``status`` with nothing more recorded."""


class Tracker(Protocol):
    """A study's runs: its parent run, one run per trial, and the closing of runs that
    processes which died left open."""

    def start_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        cfg: DictConfig,
        parent_id: str | None = None,
    ) -> TrackedRun: ...

    def find_parent(self) -> str | None:
        """The study's parent run, if there is one already."""

    def parent_run(self, tags: Mapping[str, str]) -> str:
        """The study's parent run: found again on resume (RUNNING again), created the first
        time."""

    def settle_parent(self, run_id: str) -> str:
        """The study's parent run once workers have settled on one (``run_id`` unless another
        worker's won the race to be it), with the trial runs nested under ``run_id`` moved
        under it."""

    def finish_parent(
        self, run_id: str, metrics: Mapping[str, float], close: bool = True
    ) -> None: ...

    def fail_stale_run(self, trial_number: int, reason: str) -> None:
        """Fails the runs of a trial Optuna failed because its process died."""

    def close_abandoned_runs(
        self,
        trials: Mapping[int, tuple[str, str]],
        finals: Mapping[int, tuple[int, Mapping[str, float]]] | None = None,
    ) -> None:
        """Closes runs left RUNNING by processes that ended (``trials``: number -> (state,
        fail reason)); a completed trial's run gets its final metrics first (``finals``:
        number -> (step, metrics), as Optuna recorded them), where they are missing."""

    def set_tag(self, run_id: str, key: str, value: str) -> None: ...

    def close_writes(self) -> None:
        """Makes every write of the trial runs still on its way (see MLflowTracker), before the
        sweep's process goes on to other work or ends."""

    def run_tags(self, run_id: str) -> dict[str, str]: ...

    def terminate_run(self, run_id: str, status: str) -> None: ...

    def log_hosted_model(self, run_id: str, name: str, details: Mapping[str, str]) -> None:
        """A model that lives with a provider (a fine-tuned model id), linked to its run."""

    def log_model(
        self,
        run_id: str,
        backend: object,
        model_dir: Path,
        task: str,
        registered_name: str | None = None,
    ) -> str:
        """Has ``backend`` (a ModelLogger: the one that saved the model) log ``model_dir`` under
        ``run_id``, registered as ``registered_name`` when given; returns the model's URI."""


class TrackerFactory(Protocol):
    """How a sweep makes its tracker (MLflowTracker itself, or InMemoryStore.tracker)."""

    def __call__(self, cfg: DictConfig, file_hashes: Mapping[str, str] | None = None) -> Tracker:
        """``file_hashes``: the data files' sha256 the loader took."""


@dataclass(frozen=True)
class ModelDestination:
    """Where a backend logs a model it saved: the MLflow store, the run's experiment, the run."""

    tracking_uri: str
    experiment_id: str
    run_id: str


@runtime_checkable
class ModelLogger(Protocol):
    """A backend that saves models (TrialResult.model_dir) and knows their format."""

    def log_model(
        self,
        destination: ModelDestination,
        model_dir: Path,
        task: str,
        registered_name: str | None,
    ) -> str:
        """Logs the model saved in ``model_dir`` (trained for ``task``) at ``destination``;
        registers it as ``registered_name`` when given. Returns the model's URI."""


def as_model_logger(backend: object) -> ModelLogger:
    """``backend`` as the ModelLogger it must be to have saved a model."""
    if not isinstance(backend, ModelLogger):
        raise TypeError(f"backend {type(backend).__name__} saved a model it cannot log")
    return backend
