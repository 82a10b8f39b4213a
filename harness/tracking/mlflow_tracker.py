"""The MLflow tracker: one experiment per study, a parent run per study, a child run per trial.

Every run lists the study's data files as MLflow dataset inputs (the runs table's Dataset
column). Secrets never reach MLflow: config values under secret-looking keys and passwords in
URLs are redacted before the config is logged (harness.secrets). An http(s) tracking server
that stops answering fails a request in about ``tracking.server_timeout_s`` (see
harness.tracking.server). With the local SQLite store, a trial run's writes after its creation
are made by a writer process (harness.tracking.mlflow_writer); every other request waits for
them first."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.config import runs_dir
from harness.mlflow_store import ensure_store
from harness.secrets import redact_text
from harness.tracking.datasets import dataset_inputs
from harness.tracking.mlflow_client import MLflowStore, retried
from harness.tracking.mlflow_run import TrialRun
from harness.tracking.mlflow_writer import (
    DeferredClient,
    wait_for_ended_writers,
    writer_alive,
)
from harness.tracking.protocol import ModelDestination, as_model_logger
from harness.tracking.records import (
    ROLE_TAG,
    STUDY_TAG,
    TAG_LIMIT,
    closing_of,
    config_yaml,
    missing_finals,
    stale_run_tags,
    trial_run_tags,
)
from harness.tracking.server import (
    bound_server_requests,
    check_tracking_server,
    tracking_uri,
    use_server_credentials,
)
from harness.tracking.sqlite_store import fast_sqlite_writes


class MLflowTracker(MLflowStore):
    """The study's experiment and parent run; makes a ``TrialRun`` per trial."""

    def __init__(
        self,
        cfg: DictConfig,
        file_hashes: Mapping[str, str] | None = None,
        defer_writes: bool = True,
    ) -> None:
        """``file_hashes``: the data files' sha256 (Dataset.file_hashes), for the runs' dataset
        inputs; files not in it are hashed when first needed. ``defer_writes``: trial runs'
        writes to a SQLite store go through a writer process (a study's many runs; not worth
        it for one run)."""
        import mlflow

        self.file_hashes = dict(file_hashes or {})
        self.cfg = cfg
        uri = tracking_uri(cfg)
        check_tracking_server(uri, cfg.tracking.server_timeout_s)
        if uri.startswith(("http://", "https://")):
            bound_server_requests(cfg.tracking.server_timeout_s)
        uri = use_server_credentials(uri)
        self.writes: DeferredClient | None = None
        self.store: Path | None = None  # the local SQLite store's file
        if uri.startswith("sqlite:"):
            runs_dir(cfg).mkdir(parents=True, exist_ok=True)
            store = self.store = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
            ensure_store(store)  # whole or not at all, whatever stops this process
            fast_sqlite_writes(store)
            wait_for_ended_writers(store)  # what a killed sweep sent is in the store first
            if defer_writes:  # before this process opens the store (see DeferredClient.start)
                self.writes = DeferredClient.start(uri, store)
        mlflow.set_tracking_uri(uri)  # for log_model, which only has a fluent API
        super().__init__(uri)
        self._datasets: list[Any] | None = None  # the data files' inputs, hashed on first use
        self.experiment_id = self._experiment(cfg.tracking.experiment or cfg.name)

    def wait_for_writes(self) -> None:
        if self.writes is not None:
            self.writes.sync()

    def close_writes(self) -> None:
        """Makes every write sent to the writer process, and ends it."""
        if self.writes is not None:
            self.writes.close()

    def _experiment(self, name: str) -> str:
        """The id of experiment ``name``, created the first time."""
        for attempt in range(3):
            try:  # a SQLite store another process is writing may be locked a moment
                experiment = self.client.get_experiment_by_name(name)
                break
            except Exception:  # ("database is locked"): tried again
                if attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
        if experiment is not None:
            return str(experiment.experiment_id)
        artifacts = None
        if self.uri.startswith("sqlite:"):  # else MLflow would use ./mlruns of the cwd
            artifacts = (runs_dir(self.cfg) / "mlartifacts" / name).as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=artifacts))
        except Exception:  # another worker created it a moment ago
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def find_parent(self) -> str | None:
        """The oldest parent run of the study (ties: the smallest run id), so that workers
        which each created one at the same moment all settle on the same."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.cfg.name}' and tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=20,
        )
        if not runs:
            return None
        return str(min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id)

    def parent_run(self, tags: Mapping[str, str]) -> str:
        """The study's parent run: found again on resume, created the first time."""
        run_id = self.find_parent()
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.cfg.name,
                tags={STUDY_TAG: self.cfg.name, ROLE_TAG: "study", **tags},
            )
            run_id = run.info.run_id
            self.log_datasets(run_id)
            self.log_text(run_id, config_yaml(self.cfg), "config.yaml")
            oldest = self.find_parent()
            if oldest is not None and oldest != run_id:  # another worker's came first: use it
                self.client.delete_run(run_id)
                run_id = oldest
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def settle_parent(self, run_id: str) -> str:
        """A worker that found a parent run just before its creator found an older one (made
        by a third worker whose clock ran behind) and deleted its own, nested its trials
        under a deleted run: they move under the parent every worker settled on."""
        settled = self.find_parent()
        if settled is None or settled == run_id:
            return run_id
        for run in self._study_runs(f"tags.`mlflow.parentRunId` = '{run_id}'"):
            self.set_tag(run.info.run_id, "mlflow.parentRunId", settled)
        return settled

    def fail_stale_run(self, trial_number: int, reason: str) -> None:
        """Fails the runs of a trial Optuna failed because its process died (see
        stale_run_tags)."""
        self._wait_for_ended_writers()  # a dead worker's writer may be closing that run now
        for run in self._study_runs(f"tags.`optuna.trial_number` = '{trial_number}'"):
            tags = stale_run_tags(run.info.status, reason)
            if tags is not None:
                self._close(run.info.run_id, "FAILED", tags)

    def close_abandoned_runs(
        self,
        trials: Mapping[int, tuple[str, str]],
        finals: Mapping[int, tuple[int, Mapping[str, float]]] | None = None,
    ) -> None:
        """Closes this study's runs left RUNNING by a process that ended without closing them
        (a tracking server that was gone then, a kill): runs whose Optuna trial is finished or
        failed (``trials``: number -> (state, fail reason)), and runs started on this host by
        a process that is gone. A run of a trial still RUNNING in Optuna belongs to a live
        worker, maybe on another host: it is left alone, as is one whose sweep is alive here
        and writes through a writer process (its end is on the way). A completed trial's run
        gets the final metrics Optuna recorded where it lacks them (``finals``). A confirm run
        (harness confirm) has no trial: it is closed once its process is gone."""
        self._wait_for_ended_writers()
        for role in ("trial", "confirm"):
            running = f"tags.`{ROLE_TAG}` = '{role}' and attributes.status = 'RUNNING'"
            for run in self._study_runs(running):
                closing = closing_of(run.data.tags, trials)
                if closing is None or self._writing(run.data.tags):
                    continue
                step, final = missing_finals(run.data.tags, set(run.data.metrics), closing, finals)
                if final:
                    self._log_metrics(run.info.run_id, step, final)
                self._close(run.info.run_id, *closing)

    def _wait_for_ended_writers(self) -> None:
        if self.store is not None:
            wait_for_ended_writers(self.store)

    def _writing(self, tags: Mapping[str, str]) -> bool:
        """The run's sweep is alive on this host and writes through a writer process: the run
        is RUNNING only until the writer gets to its end."""
        pid = tags.get("harness.pid", "")
        return (
            self.store is not None
            and tags.get("harness.host") == socket.gethostname()
            and pid.isdigit()
            and writer_alive(self.store, int(pid))
        )

    def _log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """``metrics`` at ``step``, in one request, of a run other processes may write too (a
        parent run, workers ending together; a run closed for a process that ended)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        retried(lambda: self.client.log_batch(run_id, metrics=batch))

    def _study_runs(self, condition: str) -> list[Any]:
        """This study's runs that meet ``condition`` (an MLflow filter)."""
        return list(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{STUDY_TAG}` = '{self.cfg.name}' and {condition}",
            )
        )

    def _close(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """Closes a run another process left; workers starting together close the same ones
        (the loser of a tag's insert retries, and writes the same)."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, v[:TAG_LIMIT]) for k, v in tags.items()]
        retried(lambda: self.client.log_batch(run_id, tags=batch))
        self.terminate_run(run_id, status)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_datasets(self, run_id: str, client: Any = None) -> None:
        """The study's data files as the run's dataset inputs (one request, by ``client``)."""
        if self._datasets is None:
            self._datasets = dataset_inputs(self.cfg.data, self.file_hashes)
        datasets = self._datasets
        client = client or self.client
        retried(lambda: client.log_inputs(run_id, datasets=datasets))

    def start_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        cfg: DictConfig,
        parent_id: str | None = None,
    ) -> TrialRun:
        all_tags = trial_run_tags(str(self.cfg.name), tags, parent_id)
        # created here, not waiting for the writer: its id is needed now, and no write sent
        # before concerns it
        run = self._client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        client = self.writes or self._client
        trial_run = TrialRun(
            client,
            run.info.run_id,
            run.info.artifact_uri,
            self.cfg.tracking.flush_every_s,
            self.cfg.tracking.log_every_steps,
        )
        try:
            trial_run.log_params(params)
            self.log_datasets(run.info.run_id, client)
            trial_run.log_text(config_yaml(cfg), "config.yaml")
        except BaseException:  # Ctrl-C or a store error before the trial began: not RUNNING
            with contextlib.suppress(Exception):
                trial_run.terminate("FAILED")
            raise
        return trial_run

    def log_hosted_model(self, run_id: str, name: str, details: Mapping[str, str]) -> None:
        """An MLflow model entry for a model that lives with a provider (a fine-tuned model
        id): listed in the experiment's models beside logged local ones, linked to its run."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        model = mlflow.create_external_model(
            name=name,
            source_run_id=run_id,
            experiment_id=self.experiment_id,
            model_type="hosted-fine-tune",
            tags={f"hosted.{k}": redact_text(str(v)) for k, v in details.items()},
        )
        self.client.set_tag(run_id, "harness.hosted_model", details.get("id", ""))
        self.client.set_tag(run_id, "harness.logged_model_id", model.model_id)

    def finish_parent(self, run_id: str, metrics: Mapping[str, float], close: bool = True) -> None:
        self._log_metrics(run_id, 0, metrics)
        if close:
            self.terminate_run(run_id, "FINISHED")

    def log_model(
        self,
        run_id: str,
        backend: object,
        model_dir: Path,
        task: str,
        registered_name: str | None = None,
    ) -> str:
        """The backend that saved ``model_dir`` logs it in its format under ``run_id``'s
        experiment (the run's own, looked up: a continuation's best run may be its source's)."""
        experiment_id = str(self.client.get_run(run_id).info.experiment_id)
        destination = ModelDestination(self.uri, experiment_id, run_id)
        return as_model_logger(backend).log_model(destination, model_dir, task, registered_name)
