"""The MLflow tracking store as harness reads and writes it outside a study's experiment: a
run's tags and end state, files under a run, and the model registry (versions, aliases). The
only module of harness that makes an ``MlflowClient`` in the sweep's process: every MLflow
request of the package goes through ``MLflowStore`` (``MLflowTracker`` is one, for a study's
experiment), but trial runs' writes that MLflowTracker sends to its writer process
(harness.tracking.mlflow_writer, which also makes them in place should that process die).

Written with explicit run ids (no fluent active-run stack), so it works the same from any
thread or process, and a run's times are its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.tracking.server import GuardedClient, tracking_uri, use_server_credentials

COLLISION_ATTEMPTS = 3  # tries of a write that collides with other workers' (see retried)


def retried(write: Callable[[], Any]) -> Any:
    """``write()``, tried again when it lost a race with another process: MLflow's store adds
    a row it keeps one of (an experiment's dataset, a run's tag or latest metric) by looking,
    then inserting, so workers writing the same one at once collide on its unique key
    ("UNIQUE constraint failed: ..."; the loser's transaction is rolled back whole). The
    loser's next try finds the row."""
    for attempt in range(COLLISION_ATTEMPTS):
        try:
            return write()
        except Exception as exc:
            if "UNIQUE" not in str(exc).upper() or attempt == COLLISION_ATTEMPTS - 1:
                raise


class MLflowStore:
    """A tracking store at ``uri`` (credentials already moved out of it): what `harness train
    +from_best` and `harness report` ask of MLflow, and the run-level half of a tracker."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = GuardedClient(MlflowClient(uri))

    @property
    def client(self) -> GuardedClient:
        """The client, once every write sent to be made elsewhere has been made."""
        self.wait_for_writes()
        return self._client

    def wait_for_writes(self) -> None:
        """Waits for writes sent to be made elsewhere (MLflowTracker's writer); none here."""

    @classmethod
    def of(cls, cfg: DictConfig) -> MLflowStore:
        """The config's store, its ``user:pass@`` sent as MLflow's basic auth."""
        return cls(use_server_credentials(tracking_uri(cfg)))

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        """A tag of a run other workers may tag at the same moment (the parent run)."""
        retried(lambda: self.client.set_tag(run_id, key, value))

    def terminate_run(self, run_id: str, status: str) -> None:
        """Closes a run (FINISHED, FAILED or KILLED) with no more to log in it."""
        self.client.set_terminated(run_id, status)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        """Every file under ``folder`` into the run's ``artifact_path``."""
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def register_model(self, model_uri: str, name: str) -> str:
        """A new version of registered model ``name`` for ``model_uri`` (``models:/<id>`` of a
        logged or external model); returns the version."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return str(mlflow.register_model(model_uri, name).version)

    def set_alias(
        self, name: str, alias: str, version: str, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Points ``name@alias`` at ``version`` and tags that version."""
        self.client.set_registered_model_alias(name, alias, version)
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(name, version, key, str(value))
