"""MLflow records: one experiment per study, a parent run per study, a child run per trial.

Written through ``MlflowClient`` with explicit run ids (no fluent active-run stack), so it works
the same from any thread or process, and a run's times are its own. A trial's metrics are
buffered and sent in batches: with the first metric logged ``tracking.flush_every_s`` seconds
after the last batch, and when the run ends. Every run lists the study's data files as MLflow
dataset inputs (the runs table's Dataset column). Secrets never reach MLflow: config values
under secret-looking keys and passwords in URLs are redacted before the config is logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, runs_dir
from harness.data import file_sha256, split_files

# A key whose last word names a secret: api_key, openai_api_key, token, client_secret,
# password... but not max_new_tokens or tokenizer_source.
SECRET_KEY = re.compile(
    r"(^|[._-])(api_?key|access_?key|token|secret|password|passwd)$", re.IGNORECASE
)
QUERY_PASSWORD = re.compile(r"\b(password|passwd|pwd)=[^&\s]+", re.I)  # ?password=... in DSNs
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@", re.I)
# API keys quoted in provider error messages ("Incorrect API key provided: sk-proj-****abcd")
API_KEY = re.compile(r"(?<![\w-])sk-[A-Za-z0-9_*-]{4,}")

STUDY_TAG = "harness.study"
DATASET_ATTEMPTS = 3  # log_inputs tries: concurrent first uses of a dataset collide
WINDOWED = "train/loss"  # reported every step; logged as a mean over tracking.log_every_steps
ROLE_TAG = "harness.role"


def redact_text(text: str) -> str:
    text = URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return API_KEY.sub("sk-***", QUERY_PASSWORD.sub(r"\1=***", text))


def redact_override(line: str) -> str:
    """A command-line override safe to log or print: `backend.api_key=***`."""
    key, sep, _ = line.partition("=")
    if sep and SECRET_KEY.search(key.lstrip("+~")):
        return f"{key}=***"
    return redact_text(line)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a plain container with secret-looking keys masked and URL passwords removed."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if value is not None and SECRET_KEY.search(key):
        return "***"
    return redact_text(value) if isinstance(value, str) else value


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


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{runs_dir(cfg) / 'mlflow.db'}"


class TrackingServerError(ConfigError):
    pass


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """An http(s) tracking URI must answer MLflow's /health before a study starts: MLflow's
    own client would otherwise retry for minutes, then fail in the middle of a trial."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except Exception as exc:  # a refused connection, a bad URL (http.client.InvalidURL)...
        problem = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(ValueError):  # errors may quote the URL's parts, password too
        password = urllib.parse.urlsplit(uri).password
        if password:
            problem = problem.replace(password, "***")
    raise TrackingServerError(
        f"cannot reach the MLflow tracking server at {redact_text(uri)} ({redact_text(problem)}). "
        "Start it (`mlflow server --host 127.0.0.1 --port 5000 ...`) or fix tracking.uri."
    )


# MLflow SQLite store files of this process whose connections get fast_sqlite_writes' pragmas
_FAST_STORES: set[str] = set()


def fast_sqlite_writes(store: Path) -> None:
    """Opens the SQLite MLflow store at ``store`` in WAL mode with synchronous=NORMAL: a commit
    then appends to the write-ahead log without waiting for the disk, about 3x fewer ms of
    writes per trial (FACTS.md). The store stays consistent after a crash; a power cut may lose
    the last commits. WAL needs every writer on one host (not on NFS), as SQLite does anyway.

    journal_mode=WAL persists in the file; synchronous is per connection, so both are set as
    each connection opens: SQLAlchemy's ``connect`` event, listened once for every engine (MLflow
    makes its engine inside its store) and acting only on connections to these files, so an
    Optuna SQLite storage in the same process is left as it is."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not _FAST_STORES:
        event.listen(Engine, "connect", _on_sqlite_connect)
    _FAST_STORES.add(os.path.realpath(store))


def _on_sqlite_connect(connection: Any, _record: Any) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return
    files = {row[1]: row[2] for row in connection.execute("PRAGMA database_list")}
    if not files.get("main") or os.path.realpath(files["main"]) not in _FAST_STORES:
        return
    mode = ""
    with contextlib.suppress(sqlite3.OperationalError):  # another process holds it: next time
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode == "wal":  # NORMAL is safe from corruption in WAL mode only
        connection.execute("PRAGMA synchronous=NORMAL")


# A split's MLflow dataset context (the tag the runs table shows beside the dataset's name)
CONTEXTS = {"train": "training", "validation": "validation", "test": "test"}


def dataset_inputs(data: DictConfig, hashes: Mapping[str, str]) -> list[Any]:
    """The study's data as MLflow dataset inputs, one per split: they fill the runs table's
    Dataset column and its dataset filter. Digest: the file's sha256, as much of it as MLflow
    keeps (36 characters); source: the file. Each split is named ``<file>:<split>`` because
    MLflow keeps one input per name and digest, and one file may hold all three splits (its
    seeded split is then the dataset's profile)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    files = split_files(data)
    profile = None
    if data.path:
        profile = json.dumps(
            {
                "split_seed": data.split_seed,
                "validation_fraction": data.validation_fraction,
                "test_fraction": data.test_fraction,
            }
        )
    digests = {  # the sha256 the loader took, else read here
        path: (hashes.get(str(path)) or file_sha256(path))[:36] for path in set(files.values())
    }
    return [
        DatasetInput(
            Dataset(
                name=f"{path.name}:{split}",
                digest=digests[path],
                source_type="local",
                source=json.dumps({"uri": str(path)}),
                profile=profile,
            ),
            [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])],
        )
        for split, path in files.items()
    ]


class MLflowTracker:
    """The study's experiment and parent run; makes a ``TrialRun`` per trial."""

    def __init__(self, cfg: DictConfig, file_hashes: Mapping[str, str] | None = None) -> None:
        """``file_hashes``: the data files' sha256 (Dataset.file_hashes), for the runs' dataset
        inputs; files not in it are hashed when first needed."""
        import mlflow
        from mlflow.tracking import MlflowClient

        self.file_hashes = dict(file_hashes or {})

        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        check_tracking_server(self.uri)
        if self.uri.startswith("sqlite:"):
            runs_dir(cfg).mkdir(parents=True, exist_ok=True)
            fast_sqlite_writes(Path(self.uri.removeprefix("sqlite:///").split("?", 1)[0]))
        mlflow.set_tracking_uri(self.uri)  # for log_model, which only has a fluent API
        self.client = MlflowClient(self.uri)
        self._datasets: list[Any] | None = None  # the data files' inputs, hashed on first use
        name = cfg.tracking.experiment or cfg.name
        for attempt in range(3):
            try:  # the first use of a new SQLite store migrates its schema
                experiment = self.client.get_experiment_by_name(name)
                break
            except Exception:  # two processes migrating a new store at once: one loses
                if attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
        if experiment is None:
            artifacts = None
            if self.uri.startswith("sqlite:"):  # else MLflow would use ./mlruns of the cwd
                artifacts = (runs_dir(cfg) / "mlartifacts" / name).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    name, artifact_location=artifacts
                )
            except Exception:  # another worker created it a moment ago
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                self.experiment_id = experiment.experiment_id
        else:
            self.experiment_id = experiment.experiment_id

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

    def fail_stale_run(self, trial_number: int, reason: str) -> None:
        """Closes the run of a trial whose process died, if it was left RUNNING."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.cfg.name}' and "
            f"tags.`optuna.trial_number` = '{trial_number}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            self.client.set_tag(run.info.run_id, "harness.failure_reason", reason)
            self.client.set_tag(run.info.run_id, "optuna.trial_state", "FAIL")
            self.client.set_terminated(run.info.run_id, "FAILED")

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_datasets(self, run_id: str) -> None:
        """The study's data files as the run's dataset inputs (one request)."""
        if self._datasets is None:
            self._datasets = dataset_inputs(self.cfg.data, self.file_hashes)
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(run_id, datasets=self._datasets)
                return
            except Exception as exc:
                # MLflow's store adds an experiment's dataset on first use, by looking and then
                # inserting: workers logging the same new dataset at once collide on its unique
                # key ("UNIQUE constraint failed: datasets..."). The loser's next try finds it.
                if "UNIQUE" not in str(exc).upper() or attempt == DATASET_ATTEMPTS - 1:
                    raise

    def start_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        cfg: DictConfig,
        parent_id: str | None = None,
    ) -> TrialRun:
        all_tags = {STUDY_TAG: self.cfg.name, ROLE_TAG: "trial", **tags}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id  # what the UI nests by
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        trial_run = TrialRun(
            self.client,
            run.info.run_id,
            run.info.artifact_uri,
            self.cfg.tracking.flush_every_s,
            self.cfg.tracking.log_every_steps,
        )
        try:
            trial_run.log_params(params)
            self.log_datasets(run.info.run_id)
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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
        )
        if close:
            self.client.set_terminated(run_id, "FINISHED")


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
        flush_every_s: float = 5.0,
        log_every_steps: int = 1,
    ) -> None:
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        # train/loss, reported at every step, is logged as its mean over each window of this
        # many steps (at the window's last step), as transformers' Trainer does with
        # logging_steps: MLflow's SQLite store spends ~0.15 ms of CPU per metric row, which at
        # every step was most of what harness added to a short trial.
        self.log_every_steps = max(1, int(log_every_steps))
        self.window: list[float] = []  # train/loss values of the window so far
        self.window_step = 0  # the step of the last of them
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

        if WINDOWED in metrics and self.log_every_steps > 1:
            metrics = dict(metrics)
            self.window.append(float(metrics.pop(WINDOWED)))
            self.window_step = step
            if len(self.window) >= self.log_every_steps:
                metrics[WINDOWED] = self._close_window()
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

    def _close_window(self) -> float:
        mean = sum(self.window) / len(self.window)
        self.window = []
        return mean

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

        # MlflowClient.log_artifact would first fetch the whole run to learn its artifact URI
        store = get_artifact_repository(self.artifact_uri, tracking_uri=self.client.tracking_uri)
        store.log_artifact(str(path), folder)

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
            if self.window:  # the last, partial window
                self._log(self.window_step, {WINDOWED: self._close_window()}, buffered=True)
            if run_tags or self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000], tags=run_tags)
                self.pending = self.pending[1000:]
            self.flush()
        finally:  # whatever happened to the last metrics, the run does not stay RUNNING
            self.terminate(status)

    def terminate(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except KeyboardInterrupt:  # Ctrl-C cut the request short: close the run, then stop
            self.client.set_terminated(self.run_id, status)
            raise


def log_transformers_model(
    uri: str, run_id: str, model_dir: Path, task: str, registered_name: str | None
) -> str:
    """Logs a saved model as an MLflow transformers model in ``run_id``; registers it when a
    name is given. Returns the model URI."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    mlflow.set_tracking_uri(uri)
    is_classification = task == "classification"
    auto = AutoModelForSequenceClassification if is_classification else AutoModelForCausalLM
    components = {
        "model": auto.from_pretrained(model_dir),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    # Explicit requirements: inference would add torchvision and fail, and it is slow (FACTS.md).
    requirements = [f"{name}=={version}" for name, version in _versions().items()]
    # run_id (passed on to mlflow.models.Model.log), not `with mlflow.start_run(run_id=...)`:
    # leaving that block would end the run again, moving its end time (and so its duration)
    # to now, minutes after the trial ended. Without an active run the model goes to the
    # active experiment (the Default one, under ./mlruns): make it the run's.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    info = mlflow.transformers.log_model(
        transformers_model=components,
        name="model",
        task="text-classification" if is_classification else "text-generation",
        pip_requirements=requirements,
        registered_model_name=registered_name,
        run_id=run_id,
    )
    if registered_name and info.registered_model_version is not None:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return str(info.model_uri)


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {n: metadata.version(n) for n in ("torch", "transformers", "tokenizers", "mlflow")}
