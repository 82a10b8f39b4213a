"""Where the MLflow tracking store is and whether it answers: the tracking URI, its
credentials, the health check before a study starts, the HTTP retries sized to
``tracking.server_timeout_s``, and a client that stops asking a server which did not answer
(this process then sends it nothing more; a resume closes the runs that were left RUNNING)."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import urllib.request
from typing import Any

from omegaconf import DictConfig

from harness.config import ConfigError, runs_dir
from harness.secrets import redact_text


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
    """An MLflow tracking client that stops asking a tracking server which did not answer: after a
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
