"""One MLflow run's metrics (batched), artifacts and end state.

A run's metrics are buffered and sent in batches: with the first metric logged
``tracking.flush_every_s`` seconds after the last batch, and when the run ends."""

from __future__ import annotations

import contextlib
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.tracking.records import WINDOWED, LossWindow


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when it is on this machine (the default store's
    `file://` or plain path), else None (a server's `mlflow-artifacts:` and the like)."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":  # a bare path
        return Path(artifact_uri)
    return None


class TrialRun:
    """One run's metrics (batched), artifacts and end state."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        artifact_uri: str,
        flush_every_s: float,  # tracking.flush_every_s
        log_every_steps: int,  # tracking.log_every_steps
    ) -> None:
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self.window = LossWindow(log_every_steps)
        self.artifact_uri = artifact_uri  # known from create_run: no request to look it up
        self.pending: list[Any] = []
        self.flushed_at = time.monotonic()
        self.stamped = (-1, 0)  # (step, timestamp in ms) of the last metrics logged
        self.latest: dict[str, tuple[int, float]] = {}  # metric -> (step, value) logged last

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if params:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, step: int, metrics: Mapping[str, float], buffered: bool = False) -> None:
        metrics = self.window.take(step, metrics)
        if metrics:
            self._log(step, metrics, buffered)

    def _log(self, step: int, metrics: Mapping[str, float], buffered: bool) -> None:
        from mlflow.entities import Metric

        # Timestamps never go back within a run: MLflow orders a metric's history by them.
        # Of two values at one step MLflow shows the later (else the larger): the one logged
        # last must win, so it gets a later millisecond.
        later = 1 if step == self.stamped[0] else 0
        now = max(int(time.time() * 1000), self.stamped[1] + later)
        self.stamped = (step, now)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.latest.update((k, (step, float(v))) for k, v in metrics.items())
        due = time.monotonic() - self.flushed_at >= self.flush_every_s
        if not buffered or due or len(self.pending) >= 1000:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # log_batch takes <= 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []
        self.flushed_at = time.monotonic()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # the client's log_artifact would first fetch the whole run to learn its artifact URI
        store = get_artifact_repository(self.artifact_uri, tracking_uri=self.client.tracking_uri)
        call = getattr(self.client, "call", None)  # GuardedClient: not when the server is gone
        if call is None:
            store.log_artifact(str(path), folder)
        else:
            call(store.log_artifact, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        folder, _, file_name = name.rpartition("/")
        local = local_artifact_dir(self.artifact_uri)
        if local is not None:  # written in place: no temporary file to copy (~2 ms a trial)
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / file_name
            path.write_text(text, encoding="utf-8")
            self.log_artifact(path, folder or None)

    def end(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        """status: FINISHED (a complete or a pruned trial: the tag optuna.trial_state tells them
        apart) or FAILED. The last metrics and ``tags`` go in the same request."""
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        try:
            if self.window.values:  # the last, partial window
                self._log(self.window.step, {WINDOWED: self.window.close()}, buffered=True)
            if run_tags or self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000], tags=run_tags)
                self.pending = self.pending[1000:]
            self.flush()
        except BaseException:  # whatever happened to the last metrics, the run does not stay
            with contextlib.suppress(Exception):  # RUNNING; the first error is the one to raise
                self.terminate(status)
            raise
        self.terminate(status)

    def terminate(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except KeyboardInterrupt:  # Ctrl-C cut the request short: close the run, then stop
            with contextlib.suppress(Exception):  # (a server gone: the resume closes it)
                self.client.set_terminated(self.run_id, status)
            raise
