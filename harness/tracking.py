"""MLflow records: one experiment per study, a parent run per study, a child run per trial.

Written through ``MlflowClient`` with explicit run ids (no fluent active-run stack), so it works
the same from any thread or process, and a run's times are its own. A trial's metrics are
buffered and sent in batches: with the first metric logged ``tracking.flush_every_s`` seconds
after the last batch, and when the run ends. Every run lists the study's data files as MLflow
dataset inputs (the runs table's Dataset column). Secrets never reach MLflow: config values
under secret-looking keys and passwords in URLs are redacted before the config is logged.
An http(s) tracking server that stops answering fails a request in about
``tracking.server_timeout_s`` (MLflow's retries are sized to it), and this process then sends it
nothing more; a resume closes the runs that were left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, runs_dir
from harness.data import file_sha256, split_files
from harness.mlflow_store import ensure_store
from harness.secrets import redact, redact_override, redact_text  # noqa: F401 (moved there)
from harness.workers import alive

STUDY_TAG = "harness.study"
COLLISION_ATTEMPTS = 3  # tries of a write that collides with other workers' (see retried)
WINDOWED = "train/loss"  # reported every step; logged as a mean over tracking.log_every_steps
ROLE_TAG = "harness.role"


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


class TrackingUnreachableError(RuntimeError):
    """The tracking server did not answer an earlier request of this process: this one was not
    sent (each would wait out MLflow's retries again)."""


def is_unreachable(exc: BaseException) -> bool:
    """MLflow's client gave up on a tracking server that does not answer (after its retries),
    or an earlier request of this process did (TrackingUnreachableError)."""
    if isinstance(exc, TrackingUnreachableError):
        return True
    text = str(exc)
    return type(exc).__name__ == "MlflowException" and (
        "API request to" in text
        and ("failed with exception" in text or "failed with timeout exception" in text)
    )


# the OS's reason inside MLflow's long message: "[Errno 111] Connection refused"
OS_ERROR = re.compile(r"\[Errno -?\d+\] [^\"'()\]]+")


def unreachable_reason(exc: BaseException) -> str:
    """Why the tracking server did not answer, in a few words (is_unreachable's errors quote
    the URL, urllib3's pool and its retries around it)."""
    text = redact_text(str(exc))
    found = OS_ERROR.search(text)
    if found:
        return found.group(0).strip()
    found = re.search(r"too many (\d+) error responses", text)  # a proxy before a dead server
    if found:
        return f"HTTP {found.group(1)} to every try"
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "no answer in time"
    return text[:300]


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pass@host:port/path`` -> (``http://host:port/path``, user, pass), the two
    %-decoded; other URIs as they are, with (None, None). The userinfo runs to the URI's last
    '@', as SQLAlchemy and harness's redaction read it: urllib would end it at a '/' in the
    password and take the rest of the password for the host."""
    scheme, sep, rest = uri.partition("://")
    if scheme not in ("http", "https") or not sep or "@" not in rest:
        return uri, None, None
    userinfo, _, host = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    if "/" in user:  # an '@' in the path, not userinfo
        return uri, None, None
    return f"{scheme}://{host}", urllib.parse.unquote(user), urllib.parse.unquote(password)


def use_server_credentials(uri: str) -> str:
    """The tracking URI without ``user:pass@``, whose parts go to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which worker processes inherit):
    MLflow then sends them as basic auth, to its artifact endpoints too, and no URL it prints
    in an error or keeps carries the password."""
    bare, user, password = split_userinfo(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return bare


def _authorization(user: str | None, password: str | None) -> str | None:
    """The Authorization header MLflow's REST client sends: basic auth from the URI's userinfo
    or MLFLOW_TRACKING_USERNAME/PASSWORD, else a bearer MLFLOW_TRACKING_TOKEN."""
    import base64

    if not user:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return "Basic " + base64.standard_b64encode(f"{user}:{password}".encode()).decode()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return f"Bearer {token}" if token else None


def check_tracking_server(uri: str, timeout_s: float) -> None:
    """An http(s) tracking URI must answer MLflow's /health before a study starts: MLflow's
    own client would otherwise retry, then fail in the middle of a trial. Sends the
    credentials MLflow would send (``user:pass@`` in the URI included)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error

    secrets: list[str] = []
    with contextlib.suppress(ValueError):  # errors may quote the URL's parts, password too
        secrets = [s for s in (split_userinfo(uri)[2], urllib.parse.urlsplit(uri).password) if s]
    authorization = None
    try:
        bare, user, password = split_userinfo(uri)
        request = urllib.request.Request(f"{bare.rstrip('/')}/health")
        authorization = _authorization(user, password)
        if authorization:
            request.add_header("Authorization", authorization)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "none were given" if authorization is None else "those given were refused"
            raise TrackingServerError(
                f"the MLflow tracking server at {redact_text(uri)} wants credentials (HTTP "
                f"{exc.code}) and {given}: put them in tracking.uri (user:password@host) or in "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        problem = f"HTTP {exc.code}"
    except Exception as exc:  # a refused connection, a bad URL (http.client.InvalidURL)...
        problem = f"{type(exc).__name__}: {exc}"
    for secret in secrets:
        problem = problem.replace(secret, "***")
    raise TrackingServerError(
        f"cannot reach the MLflow tracking server at {redact_text(uri)} ({redact_text(problem)}). "
        "Start it (`mlflow server --host 127.0.0.1 --port 5000 ...`) or fix tracking.uri."
    )


def check_store_writable(uri: str) -> None:
    """An existing SQLite MLflow store must take writes before a study starts: a read-only file
    (or folder, where SQLite keeps its write-ahead log) would fail every trial in a row. The file
    is opened for writing and closed, nothing written (SQLite itself would quietly open a
    write-protected file read-only and fail only at the first write)."""
    if not uri.startswith("sqlite:///"):
        return
    store = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not store.is_file():
        return  # created by the first run, in a folder harness makes
    try:
        with store.open("r+b"):
            pass
        if not os.access(store.parent, os.W_OK):
            raise PermissionError(f"its folder {store.parent} is read-only")
    except OSError as exc:
        problem = exc.strerror if exc.filename and exc.strerror else str(exc)
        raise TrackingServerError(unwritable_store_message(uri, problem)) from None


def unwritable_store_message(uri: str, problem: str) -> str:
    store = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return (
        f"the MLflow store {redact_text(store)} cannot be written ({redact_text(problem)}). "
        "Make the file and its folder writable by this user (e.g. chmod u+w), or point "
        "tracking.uri at another store; then run the same command again: it resumes."
    )


# MLflow's HTTP client retries a request up to 7 times with 2 s x 2^n backoff (about 4 minutes,
# MLFLOW_HTTP_REQUEST_*), each try waiting up to 120 s for an answer: a trial took 12 minutes
# to fail on a server that was gone. harness sizes them to tracking.server_timeout_s.
RETRY_SHARE = 1 / 3  # of tracking.server_timeout_s spent waiting between tries
MAX_RETRIES = 7  # MLflow's default, whatever the timeout (it refuses more than 10)
BACKOFF_JITTER_S = 0.5  # random extra wait before a retry: workers do not retry in step


def request_settings(timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP retry variables for requests that give up after about ``timeout_s`` in
    all: retries with backoff 0, 2, 4, 8 ... s (urllib3's, factor 1) while their waits fit
    RETRY_SHARE of it, each try waiting an equal share of the rest for an answer."""
    retries, waited = 0, 0.0
    while True:
        wait = 0.0 if retries == 0 else 2.0**retries + BACKOFF_JITTER_S
        if waited + wait > timeout_s * RETRY_SHARE or retries == MAX_RETRIES:
            break
        retries, waited = retries + 1, waited + wait
    per_try = max(1, int((timeout_s - waited) / (retries + 1)))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(BACKOFF_JITTER_S),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(per_try),
    }


HURRIED_TIMEOUT_S = 3  # an interrupted process: one try per request, this long at most


def bound_server_requests(timeout_s: float) -> None:
    """Sets MLflow's request retries (process-wide; worker processes inherit them) so that a
    tracking server that stopped answering fails a request in about ``timeout_s``."""
    os.environ.update(request_settings(timeout_s))


def hurry_server_requests() -> None:
    """The process is stopping (Ctrl-C, SIGTERM): what it still sends to close runs gets one
    short try, so a tracking server that is gone cannot hold the exit for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    timeout = int(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HURRIED_TIMEOUT_S))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(min(timeout, HURRIED_TIMEOUT_S))


class GuardedClient:
    """An ``MlflowClient`` that stops asking a tracking server which did not answer: after a
    request failed that way, each next one raises TrackingUnreachableError at once, so closing
    a trial's run, its tags and the parent run do not each wait out the retries again."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gone = ""  # why the server was given up on, once it was

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self.call(attribute, *args, **kwargs)

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        if self.gone:
            raise TrackingUnreachableError(self.gone)
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if is_unreachable(exc):
                self.gone = redact_text(f"{type(exc).__name__}: {exc}")
            raise


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
        uri = tracking_uri(cfg)
        check_tracking_server(uri, cfg.tracking.server_timeout_s)
        if uri.startswith(("http://", "https://")):
            bound_server_requests(cfg.tracking.server_timeout_s)
        self.uri = use_server_credentials(uri)
        if self.uri.startswith("sqlite:"):
            runs_dir(cfg).mkdir(parents=True, exist_ok=True)
            store = Path(self.uri.removeprefix("sqlite:///").split("?", 1)[0])
            ensure_store(store)  # whole or not at all, whatever stops this process
            fast_sqlite_writes(store)
        mlflow.set_tracking_uri(self.uri)  # for log_model, which only has a fluent API
        self.client = GuardedClient(MlflowClient(self.uri))
        self._datasets: list[Any] | None = None  # the data files' inputs, hashed on first use
        name = cfg.tracking.experiment or cfg.name
        for attempt in range(3):
            try:  # a SQLite store another process is writing may be locked a moment
                experiment = self.client.get_experiment_by_name(name)
                break
            except Exception:  # ("database is locked"): tried again
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
        """Fails the run of a trial Optuna failed because its process died: one left RUNNING,
        or one already closed FINISHED whose result Optuna never recorded (the process was
        killed, or the storage failed, between the two), so MLflow counts what Optuna does."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.cfg.name}' and "
            f"tags.`optuna.trial_number` = '{trial_number}'",
        )
        for run in runs:
            if run.info.status in ("RUNNING", "FINISHED"):
                why = reason if run.info.status == "RUNNING" else UNRECORDED
                tags = {"optuna.trial_state": "FAIL", "harness.failure_reason": why}
                self._close(run.info.run_id, "FAILED", tags)

    def close_abandoned_runs(self, trials: Mapping[int, tuple[str, str]]) -> None:
        """Closes this study's runs left RUNNING by a process that ended without closing them
        (a tracking server that was gone then, a kill): runs whose Optuna trial is finished or
        failed (``trials``: number -> (state, fail reason)), and runs started on this host by
        a process that is gone. A run of a trial still RUNNING in Optuna belongs to a live
        worker, maybe on another host: it is left alone."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{self.cfg.name}' and "
            f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            closing = _closing(run.data.tags, trials)
            if closing is not None:
                self._close(run.info.run_id, *closing)

    def _close(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """Closes a run another process left; workers starting together close the same ones
        (the loser of a tag's insert retries, and writes the same)."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, v[:4000]) for k, v in tags.items()]
        retried(lambda: self.client.log_batch(run_id, tags=batch))
        self.client.set_terminated(run_id, status)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_datasets(self, run_id: str) -> None:
        """The study's data files as the run's dataset inputs (one request)."""
        if self._datasets is None:
            self._datasets = dataset_inputs(self.cfg.data, self.file_hashes)
        datasets = self._datasets
        retried(lambda: self.client.log_inputs(run_id, datasets=datasets))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        """A tag of a run other workers may tag at the same moment (the parent run)."""
        retried(lambda: self.client.set_tag(run_id, key, value))

    def start_run(
        self,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        cfg: DictConfig,
        parent_id: str | None = None,
    ) -> TrialRun:
        all_tags = {STUDY_TAG: self.cfg.name, ROLE_TAG: "trial", **tags, **_owner()}
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
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        retried(lambda: self.client.log_batch(run_id, metrics=batch))  # workers ending together
        if close:
            self.client.set_terminated(run_id, "FINISHED")


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
            if self.window:  # the last, partial window
                self._log(self.window_step, {WINDOWED: self._close_window()}, buffered=True)
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


ABANDONED = "its process ended before it could close this run"
UNRECORDED = (
    "its process ended (or the Optuna storage failed) before Optuna recorded this result; "
    "Optuna failed the trial and retried it"
)


def _closing(
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
            "harness.failure_reason": reason or ABANDONED,
        }
    if not state and _owner_gone(tags):
        return "KILLED", {"harness.failure_reason": ABANDONED}
    return None


def _owner() -> dict[str, str]:
    """Tags naming the process that runs a run: a resume closes runs whose process is gone."""
    return {"harness.host": socket.gethostname(), "harness.pid": str(os.getpid())}


def _owner_gone(tags: Mapping[str, str]) -> bool:
    """The run's process was on this host and is no longer running (elsewhere: unknown)."""
    pid = tags.get("harness.pid", "")
    return (
        tags.get("harness.host") == socket.gethostname() and pid.isdigit() and not alive(int(pid))
    )


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
