"""A tracker that keeps its runs in memory: what the fast tests use where the study's logic,
not MLflow's records, is under test. One ``InMemoryStore`` outlives the sweeps of a test (a
resume finds the runs of the first invocation); it hands each sweep a tracker:

    store = InMemoryStore()
    Sweep(cfg, overrides, tracker_factory=store.tracker).run()
    store.runs_of("my-study")  # the parent run and one run per trial

Runs of one process only: a sweep with helper worker processes needs MLflow's store."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from harness.data import split_files
from harness.secrets import redact_text
from harness.tracking.protocol import TrackerFactory, as_model_logger
from harness.tracking.records import (
    ROLE_TAG,
    STUDY_TAG,
    WINDOWED,
    LossWindow,
    closing_of,
    config_yaml,
    missing_finals,
    stale_run_tags,
    trial_run_tags,
)


@dataclass
class RunRecord:
    """One run as the in-memory store holds it."""

    run_id: str
    experiment: str
    name: str
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (step, value)s
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact name -> text
    artifacts: list[str] = field(default_factory=list)  # artifact names (folder/file)
    inputs: list[str] = field(default_factory=list)  # the data files, as `<file>:<split>`


@dataclass
class LoggedModel:
    run_id: str
    model_dir: Path
    task: str
    registered_name: str | None
    uri: str


class InMemoryStore:
    """Every run, model and experiment of the trackers it made."""

    def __init__(self) -> None:
        self.runs: dict[str, RunRecord] = {}  # in the order they were made
        self.models: list[LoggedModel] = []
        self.hosted_models: dict[str, dict[str, str]] = {}  # model entry id -> details
        self._ids = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):05d}"

    def tracker(
        self, cfg: DictConfig, file_hashes: Mapping[str, str] | None = None
    ) -> InMemoryTracker:
        """A TrackerFactory: the tracker of ``cfg``'s study, on this store."""
        return InMemoryTracker(self, cfg)

    def runs_of(self, study: str, role: str | None = None) -> list[RunRecord]:
        """The study's runs (``role``: "study" for its parent run, "trial" for the others)."""
        return [
            run
            for run in self.runs.values()
            if run.tags.get(STUDY_TAG) == study and role in (None, run.tags.get(ROLE_TAG))
        ]


class InMemoryRun:
    """A TrackedRun writing into its RunRecord at once (nothing to batch); train/loss windowed
    as MLflow's runs log it."""

    def __init__(self, record: RunRecord, log_every_steps: int = 1) -> None:
        self.record = record
        self.run_id = record.run_id
        self.latest: dict[str, tuple[int, float]] = {}
        self.window = LossWindow(log_every_steps)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.record.params.update((k, str(v)) for k, v in params.items())

    def log_metrics(self, step: int, metrics: Mapping[str, float], buffered: bool = False) -> None:
        self._record(step, self.window.take(step, metrics))

    def _record(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.record.metrics.setdefault(key, []).append((step, float(value)))
            self.latest[key] = (step, float(value))

    def flush(self) -> None:
        pass  # every metric is recorded as it is logged

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.record.tags.update((k, str(v)) for k, v in tags.items())

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.record.artifacts.append(f"{folder}/{path.name}" if folder else path.name)

    def log_text(self, text: str, name: str) -> None:
        self.record.texts[name] = text
        self.record.artifacts.append(name)

    def end(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        if self.window.values:  # the last, partial window
            self._record(self.window.step, {WINDOWED: self.window.close()})
        self.set_tags(tags or {})
        self.terminate(status)

    def terminate(self, status: str) -> None:
        self.record.status = status


class InMemoryTracker:
    """A Tracker of one study's runs in an InMemoryStore; closes runs as MLflowTracker does."""

    def __init__(self, store: InMemoryStore, cfg: DictConfig) -> None:
        self.store, self.cfg = store, cfg
        self.experiment = str(cfg.tracking.experiment or cfg.name)

    def _new_run(self, name: str, tags: Mapping[str, str]) -> RunRecord:
        record = RunRecord(self.store.new_id("run"), self.experiment, name, tags=dict(tags))
        files = split_files(self.cfg.data)
        record.inputs = [f"{path.name}:{split}" for split, path in files.items()]
        self.store.runs[record.run_id] = record
        return record

    def _runs(self, role: str) -> list[RunRecord]:
        return [
            run
            for run in self.store.runs_of(str(self.cfg.name), role)
            if run.experiment == self.experiment
        ]

    def start_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        cfg: DictConfig,
        parent_id: str | None = None,
    ) -> InMemoryRun:
        all_tags = trial_run_tags(str(self.cfg.name), tags, parent_id)
        run = InMemoryRun(self._new_run(name, all_tags), self.cfg.tracking.log_every_steps)
        run.log_params(params)
        run.log_text(config_yaml(cfg), "config.yaml")
        return run

    def find_parent(self) -> str | None:
        parents = self._runs("study")
        return parents[0].run_id if parents else None

    def parent_run(self, tags: Mapping[str, str]) -> str:
        run_id = self.find_parent()
        if run_id is not None:
            self.store.runs[run_id].status = "RUNNING"
            return run_id
        record = self._new_run(self.cfg.name, {STUDY_TAG: self.cfg.name, ROLE_TAG: "study", **tags})
        record.texts["config.yaml"] = config_yaml(self.cfg)
        return record.run_id

    def settle_parent(self, run_id: str) -> str:
        return run_id  # one process: no other worker's parent run to race with

    def finish_parent(self, run_id: str, metrics: Mapping[str, float], close: bool = True) -> None:
        InMemoryRun(self.store.runs[run_id]).log_metrics(0, metrics)
        if close:
            self.terminate_run(run_id, "FINISHED")

    def fail_stale_run(self, trial_number: int, reason: str) -> None:
        for run in self._runs("trial"):
            tags = stale_run_tags(run.status, reason)
            if run.tags.get("optuna.trial_number") == str(trial_number) and tags is not None:
                run.tags.update(tags)
                run.status = "FAILED"

    def close_abandoned_runs(
        self,
        trials: Mapping[int, tuple[str, str]],
        finals: Mapping[int, tuple[int, Mapping[str, float]]] | None = None,
    ) -> None:
        for run in [*self._runs("trial"), *self._runs("confirm")]:
            closing = closing_of(run.tags, trials) if run.status == "RUNNING" else None
            if closing is not None:
                final = missing_finals(run.tags, set(run.metrics), closing, finals)
                for key, value in final[1].items():
                    run.metrics.setdefault(key, []).append((final[0], value))
                run.status, tags = closing
                run.tags.update(tags)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.store.runs[run_id].tags[key] = value

    def close_writes(self) -> None:
        pass  # every write is made at once

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.store.runs[run_id].tags)

    def terminate_run(self, run_id: str, status: str) -> None:
        self.store.runs[run_id].status = status

    def log_hosted_model(self, run_id: str, name: str, details: Mapping[str, str]) -> None:
        model_id = self.store.new_id("m")
        entry = {f"hosted.{k}": redact_text(str(v)) for k, v in details.items()}
        self.store.hosted_models[model_id] = {"name": name, "run": run_id, **entry}
        self.set_tag(run_id, "harness.hosted_model", details.get("id", ""))
        self.set_tag(run_id, "harness.logged_model_id", model_id)

    def log_model(
        self,
        run_id: str,
        backend: object,
        model_dir: Path,
        task: str,
        registered_name: str | None = None,
    ) -> str:
        """Recorded, not written: the model stays in ``model_dir`` (the backend must still be
        one that can log it)."""
        as_model_logger(backend)
        version = sum(1 for m in self.store.models if m.registered_name == registered_name) + 1
        uri = f"models:/{registered_name}/{version}" if registered_name else f"runs:/{run_id}/model"
        self.store.models.append(LoggedModel(run_id, model_dir, task, registered_name, uri))
        return uri


if TYPE_CHECKING:  # mypy holds the in-memory tracker to the Tracker protocol
    _factory: TrackerFactory = InMemoryStore().tracker
