"""Secrets never show (issue 11, items 7 and 14): distinct secrets in every place one can go (a
storage URL's password with '/', '@' and %-escapes, query passwords, an API key, values read
through ${oc.env:...}), then every file harness wrote, everything it printed, the Optuna
attributes it stored and the command line of every process it started are searched for any
piece of them. A refused API key is one line, written before anything under runs/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from harness.cli import main
from harness.config import load_config
from harness.storage import existing_study
from tests.helpers import OPENAI_TEST_SETTINGS, ROOT, answers, free_port, snapshot, start_cli

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # the slow tier (pyproject.toml)

DB = "127.0.0.1:5432/test"  # PostgreSQL with trust auth: any password is accepted
# Every secret below is made of markers Pq<nn>Zk: a marker found anywhere is (part of) a leak.
MARKER = re.compile(rb"Pq\d\dZk")


def leaks(data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return sorted({m.decode() for m in MARKER.findall(raw)})


def pg_url(password: str, query: str = "") -> str:
    return f"postgresql://postgres:{password}@{DB}" + (f"?{query}" if query else "")


class Watched:
    """A harness command in a subprocess: its output in a file, and the command lines of all
    its descendant processes, polled while it runs."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = tmp / f"out-{uuid.uuid4().hex[:8]}.log"
        self.command_lines: list[str] = []
        with self.log.open("wb") as out:
            self.process = start_cli(
                *args,
                env={**env, "PYTHONPATH": str(ROOT)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def poll_children(self) -> None:
        own = " ".join(map(str, self.process.args))
        with suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with suppress(psutil.Error):
                    line = " ".join(child.cmdline())
                    if line != own:  # a fork not yet exec'd shows the command the user typed
                        self.command_lines.append(line)

    def wait(self, timeout: float = 240, until: Callable[[], bool] | None = None) -> int | None:
        """Polls children until the process exits (or ``until()`` holds); its exit code."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and not (until and until()):
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"timed out after {timeout:.0f} s:\n{self.output()}")
            self.poll_children()
            time.sleep(0.05)
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left behind
        self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def stored_attrs(name: str) -> str:
    """Every attribute Optuna keeps for the study and its trials, as text."""
    import optuna

    storage = optuna.storages.RDBStorage(pg_url("x"))
    study = optuna.load_study(study_name=name, storage=storage)
    study_id = storage.get_study_id_from_name(name)
    parts = [study.user_attrs, storage.get_study_system_attrs(study_id)]
    for trial in study.trials:
        parts += [trial.user_attrs, trial.system_attrs, trial.params]
    return json.dumps(parts, default=str)


def files_leaks(runs: Path) -> dict[str, list[str]]:
    """Markers in any file under runs/ (the MLflow store and its WAL, artifacts, configs,
    journals, caches)."""
    found = {str(p): leaks(p.read_bytes()) for p in runs.rglob("*") if p.is_file()}
    return {path: markers for path, markers in found.items() if markers}


def test_no_storage_secret_shows_in_files_output_attributes_or_command_lines(
    postgres,
    tmp_path,
):
    """A sweep with two worker processes, its report and best, a validate, --cfg job, a storage
    that is down, and `ui --optuna`: each given the storage URL in its own way (on the command
    line, or through ${oc.env:...}), each with its own secrets."""
    runs = tmp_path / "runs"
    name = f"secrets_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        # '/' and an escaped '@' in the password, a query sslpassword and password
        "PG_REPORT": pg_url("Pq01Zk/Pq02Zk%40Pq03Zk", "sslpassword=Pq04Zk&password=Pq05Zk"),
        "PG_UI": pg_url("Pq06Zk%2FPq07Zk/Pq08Zk", "sslpassword=Pq09Zk"),
    }
    common = [f"name={name}", "backend=fake", "pruner=none", f"paths.runs_dir={runs}"]
    direct = pg_url("Pq10Zk/Pq11Zk%25Pq12Zk", "sslpassword=Pq13Zk")  # %25: a '%' in it
    sweep = Watched(
        tmp_path,
        ["sweep", *common, "sweep.n_trials=6", "sweep.n_workers=2", f"storage.url='{direct}'"],
        env,
    )
    watched = [sweep]
    try:
        assert sweep.wait() == 0, sweep.output()
        workers = [line for line in sweep.command_lines if "harness.cli" in line]
        assert workers, f"no worker process was seen: {sweep.command_lines}"
        for args in (
            ["report", *common, "storage.url=${oc.env:PG_REPORT}"],
            ["best", *common, f"storage.url='{pg_url('Pq14Zk/Pq15Zk', 'password=Pq16Zk')}'"],
            ["validate", *common, f"storage.url='{pg_url('Pq17Zk/Pq18Zk')}'"],
            ["sweep", *common, f"storage.url='{pg_url('Pq19Zk/Pq20Zk')}'", "--cfg", "job"],
        ):
            done = Watched(tmp_path, args, env)
            watched.append(done)
            assert done.wait() == 0, done.output()
        assert "  url: postgresql://postgres:***@" in watched[-1].output()  # --cfg job
        # a database that is down: its error quotes the URL, a token in its query too
        down = "postgresql://postgres:Pq21Zk/Pq22Zk@127.0.0.1:1/test?token=Pq23Zk"
        refused = Watched(tmp_path, ["sweep", *common, f"storage.url='{down}'"], env)
        watched.append(refused)
        assert refused.wait() == 2, refused.output()
        assert "cannot open the Optuna storage postgresql://postgres:***@" in refused.output()

        port = free_port()
        ui = Watched(
            tmp_path,
            ["ui", "--optuna", "--port", str(port), *common, "storage.url=${oc.env:PG_UI}"],
            env,
        )
        watched.append(ui)
        url = f"http://127.0.0.1:{port}"
        ui.wait(timeout=120, until=lambda: f"open {url}" in ui.output())
        assert ui.process.poll() is None, ui.output()
        assert answers(f"{url}/api/meta")
        ui.poll_children()
        assert any("optuna_dashboard" in line for line in ui.command_lines), ui.command_lines
        ui.stop()
        assert ui.process.returncode == 0, ui.output()

        everything = {
            "outputs": {" ".join(w.process.args): leaks(w.output()) for w in watched},
            "command lines": {line: leaks(line) for w in watched for line in w.command_lines},
            "files": files_leaks(runs),
            "optuna attributes": leaks(stored_attrs(name)),
        }
        assert any(runs.rglob("config.yaml")) and (runs / "mlflow.db").exists()
        assert not [
            (where, what, markers)
            for where, found in everything.items()
            for what, markers in (found.items() if isinstance(found, dict) else [("", found)])
            if markers
        ], everything
    finally:
        for process in watched:
            process.stop()
        with suppress(Exception):
            import optuna

            optuna.delete_study(study_name=name, storage=pg_url("x"))


def test_hosted_key_shows_nowhere(fake_openai, tmp_path):
    """A hosted sweep (with a failing job: error paths print too) and its validate, with the
    key in OPENAI_API_KEY; the fake refuses any other key, so it was really sent. (The storage
    test above covers report and best.)"""
    runs = tmp_path / "runs"
    key = "sk-proj-Pq30Zk_Pq31Zk"
    fake_openai.api.api_key = key
    fake_openai.api.faults.fail_jobs = frozenset({1})
    env = {**os.environ, "OPENAI_API_KEY": key}
    common = [
        "study=tickets_openai",
        f"backend.base_url={fake_openai.base_url}",
        f"paths.runs_dir={runs}",
        *OPENAI_TEST_SETTINGS,
    ]
    watched = []
    try:
        for args in (
            ["sweep", *common, "sweep.n_trials=2", "train.epochs=1"],
            ["validate", *common],
        ):
            done = Watched(tmp_path, args, env)
            watched.append(done)
            done.wait()
        sweep, validate = (w.output() for w in watched)
        # whether a study short of n_trials by a failed trial exits 0 is not this test's concern
        assert "COMPLETE" in sweep and "FAIL" in sweep and "Traceback" not in sweep, sweep
        assert watched[1].process.returncode == 0 and "cost per trial shape" in validate, validate
        assert not {
            " ".join(w.process.args): leaks(w.output()) for w in watched if leaks(w.output())
        }
        assert not [line for w in watched for line in w.command_lines if leaks(line)]
        assert (runs / "mlflow.db").exists()
        assert not files_leaks(runs)
    finally:
        for process in watched:
            process.stop()


@pytest.mark.parametrize(
    "override, named",
    [
        ("backend.api_kye=Pq40Zk-typo", "backend.api_kye"),  # a misspelt key: Hydra quotes it
        ("backend.api_key=sk-Pq41Zk", "backend.api_key"),  # no such key: keys come from env
        ("storage.url=postgresql://u:Pq42Zk/Pq43Zk(@h/db", "storage.url"),  # bad syntax
        ("storage.url=postgresql://h/db?sslpassword=Pq44Zk", "storage.url"),  # '=' unquoted
        ("storage.pasword=Pq45Zk", "storage.pasword"),
    ],
)
def test_a_refused_override_names_its_key_never_its_secret(override, named, runs, capsys):
    assert main(["validate", "backend=fake", override, f"paths.runs_dir={runs}"]) == 2
    captured = capsys.readouterr()
    assert named in captured.err, captured.err
    assert not leaks(captured.out + captured.err), captured.err
    assert not runs.exists()


@pytest.mark.parametrize("from_file", [False, True])
def test_a_refused_api_key_is_one_line_naming_where_it_was_read(
    from_file, fake_openai, runs, tmp_path, capsys, monkeypatch
):
    fake_openai.api.api_key = "sk-the-right-one-Pq50Zk"
    wrong = "sk-wrong-Pq51Zk"
    if from_file:
        keyfile = tmp_path / "key.txt"
        keyfile.write_text(wrong + "\n")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        extra, source = [f"backend.api_key_file={keyfile}"], f"the file {keyfile}"
    else:
        monkeypatch.setenv("OPENAI_API_KEY", wrong)
        extra, source = [], "the environment variable OPENAI_API_KEY"
    before = snapshot(runs)
    code = main(
        [
            "sweep",
            "study=tickets_openai",
            f"backend.base_url={fake_openai.base_url}",
            f"paths.runs_dir={runs}",
            *OPENAI_TEST_SETTINGS,
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"refused the API key read from {source}" in lines[0]
    assert not leaks(err)
    assert snapshot(runs) == before == {}
    assert not [r for r in fake_openai.api.requests if r[0] == "POST"]  # no upload, no job


@pytest.mark.parametrize(
    "text, shown",
    [
        ("postgresql+psycopg2://user:pa/ss@127.0.0.1:5432/test", "user:***@127.0.0.1:5432/test"),
        ("mysql://u:p%40ss%2Fw@h/db", "mysql://u:***@h/db"),
        ("postgresql://h/db?sslmode=require&SSLPassword=x1&application_name=a", "SSLPassword=***&"),
        ("http://h/v1?access_token=x2&api_key=x3", "access_token=***&api_key=***"),
        ("host=db password='a b' max_new_tokens=32", "password=*** max_new_tokens=32"),
        ("sqlite:////tmp/x/mlflow.db and http://127.0.0.1:5000", "sqlite:////tmp/x/mlflow.db"),
    ],
)
def test_redaction_reads_urls_as_a_url_parser_does(text, shown):
    from harness.secrets import redact_text

    redacted = redact_text(text)
    assert shown in redacted
    for secret in ("pa/ss", "p%40ss", "x1", "x2", "x3", "'a b'"):
        assert secret not in redacted


@pytest.mark.parametrize(
    "password",
    ["Pq60Zk Pq61Zk", "Pq62Zk#Pq63Zk", "Pq64Zk:Pq65Zk?Pq66Zk", "Pq67Zk%20Pq68Zk"],
)
def test_a_password_the_patterns_cannot_delimit_is_masked_as_sqlalchemy_reads_it(
    password, runs, capsys
):
    """A raw space ends a URL for any pattern, not for SQLAlchemy, which reads the password
    up to the '@': the config's own passwords are masked wherever they show."""
    url = f"postgresql://postgres:{password}@127.0.0.1:1/test"
    assert main(["sweep", "backend=fake", f"storage.url='{url}'", f"paths.runs_dir={runs}",
                 "--cfg", "job"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "url: postgresql://postgres:***@127.0.0.1:1/test" in printed, printed
    assert not leaks(printed)


def test_a_tracking_uri_password_never_shows_in_its_reachability_error(runs, capsys):
    """http.client reads `user:a/b@host` as the host `user` with the port `a`: that piece of
    the password is masked too."""
    uri = f"http://user:Pq76Zk/Pq77Zk@127.0.0.1:{free_port()}"
    assert main(["sweep", "backend=fake", f"tracking.uri={uri}", f"paths.runs_dir={runs}"]) == 2
    captured = capsys.readouterr()
    assert "cannot reach the MLflow tracking server at http://user:***@127.0.0.1" in captured.err
    assert not leaks(captured.out + captured.err), captured.err


def test_a_password_sharing_words_with_the_overrides_leaves_them_as_written(postgres, runs):
    """Stored overrides are replayed (`+from_best`, reproduce commands): a password whose
    pieces are also words of them (`train`, `2024`) masks the URL's password, not the words."""
    url = pg_url("train/2024")
    words = ["backend=fake", "sweep.n_trials=1", "seed=2024", "train.epochs=1"]
    words += [f"storage.url={url}", f"name=words_{uuid.uuid4().hex[:8]}", f"paths.runs_dir={runs}"]
    assert main(["sweep", "--quiet", *words]) == 0
    study = existing_study(load_config(words))
    assert study is not None
    stored = study.user_attrs["overrides"]
    assert "seed=2024" in stored and "train.epochs=1" in stored, stored
    assert f"storage.url={pg_url('***')}" in stored, stored
    assert not any("train/2024" in o for o in stored), stored
