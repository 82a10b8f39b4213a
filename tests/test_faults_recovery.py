"""Fault injection (issue 11, items 3, 4 and 6): kill -9 at any moment of a trial, a trial left
RUNNING before harness could name its owner, the Optuna storage gone mid-study (its folder
removed, a PostgreSQL outage longer than the retry window), an MLflow store that cannot be
written, and failing trials. After each, the same command resumes to exactly sweep.n_trials
finished trials, with nothing left RUNNING in Optuna or MLflow."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import load_config
from harness.storage import existing_study, journal_path, storage_for
from harness.tracking import tracking_uri
from tests.helpers import (
    cli_env,
    one_error_line,
    past_the_first_trial,
    snapshot,
    start_cli,
    study_runs,
    wait_for_running,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # the slow tier (pyproject.toml)

POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
FAKE = ("backend=fake", "pruner=none", "sampler=random")
# a slow trial (3 evaluations, 0.05 s apart): a kill lands in its middle as often as at its ends
SLOW = ("backend.seconds_per_epoch=0.05", "train.epochs=3")
# a trial long enough (1.5 s) that polls of the study (every 0.3 s, each slow on a busy machine)
# see it running: with SLOW's, a whole study could end between two polls, and the wait with it
WATCHED = ("backend.seconds_per_epoch=0.5", "train.epochs=3")
ENV = cli_env()


def command(runs: Path, *overrides: str) -> list[str]:
    return [*FAKE, f"paths.runs_dir={runs}", *overrides]


def start(words: list[str]) -> subprocess.Popen[str]:
    """`harness sweep WORDS` in its own process, which a test may kill."""
    return start_cli("sweep", *words, stderr=subprocess.PIPE)


def stopped(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Waits (bounded) for ``process`` to end: its exit code, stdout and stderr."""
    try:
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def check_whole(words: list[str], n_trials: int) -> optuna.Study:
    """The study of ``words`` has exactly ``n_trials`` finished trials, none RUNNING; MLflow has
    no RUNNING run, one run per trial number, and a FINISHED run for each finished trial."""
    cfg = load_config(words)
    study = existing_study(cfg)
    assert study is not None
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == n_trials, states
    assert states["RUNNING"] == 0, states
    runs = study_runs(cfg).runs
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    numbers = [
        r.data.tags["optuna.trial_number"] for r in runs if "optuna.trial_number" in r.data.tags
    ]
    assert [n for n, k in Counter(numbers).items() if k > 1] == []  # no trial recorded twice
    finished = {str(t.number) for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
    by_number = {r.data.tags.get("optuna.trial_number"): r for r in runs}
    assert {n for n in finished if by_number[n].info.status != "FINISHED"} == set()
    failed = {str(t.number) for t in study.trials if t.state.name == "FAIL"}
    assert {n for n in failed if n in by_number and by_number[n].info.status == "FINISHED"} == set()
    parents = [r for r in runs if "optuna.trial_number" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FINISHED"]
    return study


def ask_in_a_process_that_dies(words: list[str], code: str = "") -> None:
    """A process opens the study's storage as harness does, runs ``code`` (may be empty), asks
    Optuna for a trial and dies at once (os._exit: no clean-up)."""
    script = (
        "import os, sys, optuna\n"
        "from harness.config import load_config\n"
        "from harness.storage import storage_for\n"
        "cfg = load_config(sys.argv[1:])\n"
        "study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))\n"
        f"{code}\n"
        "study.ask()\n"
        "os._exit(9)\n"
    )
    died = subprocess.run(
        [sys.executable, "-c", script, *words], env=ENV, capture_output=True, text=True
    )
    assert died.returncode == 9, died.stderr


def test_a_trial_asked_and_never_tagged_is_failed_and_retried(runs, capsys):
    """Item 3's reproduction: 3 trials, then a process creates a trial through the storage as
    harness opens it and dies before anything else (as a kill -9 right after Optuna's ask did);
    the sweep for 5 trials ends with exactly 5, the parent run closed, counts that add up."""
    words = command(runs)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=3"]) == 0
    ask_in_a_process_that_dies(words)
    capsys.readouterr()
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=5"]) == 0
    assert "6 trials: 5 complete, 0 pruned, 1 failed" in capsys.readouterr().out
    study = check_whole([*words], 5)
    assert study.trials[3].state.name == "FAIL"
    retry = next(t for t in study.trials if "harness_retry_of" in t.user_attrs)
    assert retry.user_attrs["harness_retry_of"] == 3  # it had no params yet: the retry samples


def test_a_queued_trial_popped_by_a_process_that_died_before_naming_itself(runs):
    """A retry (a queued trial) becomes RUNNING in Optuna's own write; its process dies before
    it writes its "worker": the claim it left first says whose it was."""
    words = command(runs)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=2"]) == 0
    study = existing_study(load_config(words))
    assert study is not None
    study.enqueue_trial(study.trials[0].params)
    die_at_tag = (
        "from harness.storage import OwnedTrialsJournalStorage as owned\n"
        "real = owned.set_trial_user_attr\n"
        "def tag(self, trial_id, key, value):\n"
        "    if key == 'worker':\n"
        "        os._exit(9)\n"
        "    real(self, trial_id, key, value)\n"
        "owned.set_trial_user_attr = tag\n"
    )
    ask_in_a_process_that_dies(words, die_at_tag)
    popped = existing_study(load_config(words)).trials[2]  # type: ignore[union-attr]
    assert popped.state.name == "RUNNING" and "worker" not in popped.user_attrs
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=4"]) == 0
    study = check_whole(words, 4)
    assert study.trials[2].state.name == "FAIL"


def ownerless_trial(cfg, started: datetime.datetime) -> None:
    """A RUNNING trial that names no owner, as a script's own study.ask() or an older harness
    made it, started at ``started``."""
    plain = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal_path(cfg)))
    )
    study = optuna.load_study(study_name=cfg.name, storage=plain)
    template = optuna.trial.FrozenTrial(
        number=-1,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        datetime_start=started,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    plain.create_new_trial(plain.get_study_id_from_name(study.study_name), template_trial=template)


def test_a_trial_with_no_owner_at_all_is_stale_after_the_grace_time(runs, capsys):
    """A RUNNING trial that records no owner is left alone while it may be live (it counts as
    another process's), and failed and retried once it has been RUNNING for storage.grace_s."""
    words = command(runs)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=2"]) == 0
    cfg = load_config(words)
    now = datetime.datetime.now()
    ownerless_trial(cfg, now - datetime.timedelta(minutes=2))
    capsys.readouterr()
    assert main(["sweep", "--quiet", *words, "storage.grace_s=600", "sweep.n_trials=3"]) == 0
    assert "3 trials: 2 complete, 0 pruned, 0 failed, 1 running" in capsys.readouterr().out
    ownerless_trial(cfg, now - datetime.timedelta(hours=1))
    assert main(["sweep", "--quiet", *words, "storage.grace_s=1800", "sweep.n_trials=3"]) == 0
    states = [t.state.name for t in existing_study(cfg).trials]  # type: ignore[union-attr]
    assert states[2:4] == ["RUNNING", "FAIL"], states  # 2 minutes: may be live; an hour: gone
    assert main(["sweep", "--quiet", *words, "storage.grace_s=60", "sweep.n_trials=3"]) == 0
    check_whole(words, 3)


def test_a_run_closed_before_optuna_recorded_its_trial_fails_with_it(runs):
    """A kill -9 after a trial's MLflow run was closed FINISHED and before Optuna recorded the
    result: the resume fails the trial (its process is gone) and retries it; the run fails
    too, saying why, so MLflow does not count a result Optuna threw away."""
    words = command(runs)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=2"]) == 0
    cfg = load_config(words)
    ownerless_trial(cfg, datetime.datetime.now() - datetime.timedelta(hours=1))  # trial 2
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.name)
    closed = client.create_run(
        experiment.experiment_id,
        run_name="trial-0002",
        tags={
            "harness.study": cfg.name,
            "harness.role": "trial",
            "optuna.trial_number": "2",
            "optuna.trial_state": "COMPLETE",
        },
    )
    client.set_terminated(closed.info.run_id, "FINISHED")
    assert main(["sweep", "--quiet", *words, "storage.grace_s=60", "sweep.n_trials=3"]) == 0
    run = client.get_run(closed.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.trial_state"] == "FAIL"
    assert "before Optuna recorded this result" in run.data.tags["harness.failure_reason"]
    check_whole(words, 3)


# A process that imports harness once, then forks a `harness sweep` per line of arguments on
# its stdin (answering the child's pid) and reaps it when told (answering its wait status): a
# kill -9 loop without ~3 s (10 s on a busy machine) of imports per kill. A child is a
# harness process as any other: its own pid, main() from the start, its output to /dev/null.
FORKER = """
import json, os, sys
import harness.cli, harness.study, harness.tracking, mlflow.tracking, optuna  # once
for line in sys.stdin:
    args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        code = 70
        try:
            code = harness.cli.main(args)
        finally:
            os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # "reap": the child stays a zombie until then, its pid not reused
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def test_kill_9_at_random_moments_of_trials_then_the_same_command_resumes(runs):
    """A seeded loop of at least 20 kill -9s at random moments of a study's trials (asking,
    sampling, the MLflow run's start, training, Optuna's tell, the callbacks). Each is followed
    by the same command: killed again at another moment, then let run, it resumes to exactly
    n_trials with nothing RUNNING and no trial recorded twice."""
    rng = random.Random(11)
    kills, n_trials = 0, 0
    words = command(runs, *SLOW)
    cfg = load_config(words)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=1"]) == 0  # the stores exist
    journal = journal_path(cfg)
    forker = subprocess.Popen(
        [sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env=ENV,
    )  # fmt: skip
    assert forker.stdin is not None and forker.stdout is not None

    def tell(line: str) -> int:
        forker.stdin.write(line + "\n")  # type: ignore[union-attr]
        forker.stdin.flush()  # type: ignore[union-attr]
        return int(forker.stdout.readline())  # type: ignore[union-attr]

    try:
        for _ in range(30):
            n_trials += 3
            same = [*words, f"sweep.n_trials={n_trials}"]
            for _kill in range(2):
                size = journal.stat().st_size
                pid = tell(json.dumps(["sweep", "--quiet", *same]))
                deadline = time.monotonic() + 120
                while journal.stat().st_size == size:
                    assert time.monotonic() < deadline, "the sweep wrote nothing to its journal"
                    time.sleep(0.01)  # polls for its first write, the study's attrs
                # the kill's moment, drawn: from the tracker's start through trials and tells
                time.sleep(rng.uniform(0.0, 1.0))
                os.kill(pid, signal.SIGKILL)  # a zombie already, if it ended: nothing happens
                status = tell("reap")
                kills += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert main(["sweep", "--quiet", *same]) == 0
            check_whole(same, n_trials)
            if kills >= 20:
                break
    finally:
        forker.kill()
        forker.communicate(timeout=60)
    assert kills >= 20


def test_the_storage_folder_removed_mid_study_stops_it_with_one_message(runs, tmp_path):
    words = command(runs, *WATCHED, "sweep.n_trials=6", "storage.retry_s=0.7")
    cfg = load_config(words)
    process = start(words)
    away = tmp_path / "optuna-away"
    try:
        wait_for_running(
            cfg.name, storage_for(cfg), past_the_first_trial, "the second trial has reported"
        )
        shutil.move(journal_path(cfg).parent, away)
        code, out, err = stopped(process)
    finally:
        process.kill()
    message = one_error_line("sweep", code, out, err)
    assert f"the Optuna storage {journal_path(cfg)} failed during the study" in message
    assert "Run the same command again when the storage is back: it resumes." in message
    statuses = study_runs(cfg).statuses
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses[cfg.name] == "FAILED"  # the parent
    shutil.move(away, journal_path(cfg).parent)  # the storage is back
    assert main(["sweep", "--quiet", *words]) == 0
    check_whole(words, 6)


class CuttableProxy:
    """A loopback TCP proxy to PostgreSQL that a test cuts (refusing and dropping every
    connection, as a database server that is down) and restores on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def postgres_proxy(postgres):
    """A CuttableProxy in front of the machine's PostgreSQL."""
    proxy = CuttableProxy((POSTGRES_HOST, POSTGRES_PORT))
    try:
        yield proxy
    finally:
        proxy.cut()


def test_a_postgres_outage_longer_than_the_retry_window_stops_then_resumes(
    postgres, postgres_proxy, runs
):
    name = f"outage_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://postgres@127.0.0.1:{postgres_proxy.port}/test"
    words = command(runs, *WATCHED, f"name={name}", f"storage.url={url}", "sweep.n_trials=5")
    words.append("storage.retry_s=0.7")  # the outage outlasts 0.7 s of retries
    cfg = load_config(words)
    process = start(words)
    try:
        wait_for_running(name, postgres, past_the_first_trial, "the second trial has reported")
        postgres_proxy.cut()
        code, out, err = stopped(process)
    finally:
        process.kill()
    assert "failed during the study" in one_error_line("sweep", code, out, err), err
    statuses = [r.info.status for r in study_runs(cfg, name).runs]
    assert "RUNNING" not in statuses, statuses
    postgres_proxy.restore()  # the database is back
    assert main(["sweep", "--quiet", *words]) == 0
    check_whole(words, 5)


def writable(path: Path) -> bool:
    try:
        with path.open("r+b"):
            return True
    except OSError:
        return False


def make_read_only(path: Path) -> None:
    """``path`` read-only for this user; root ignores file modes, so there also the immutable
    attribute (chattr +i). Skips where neither holds."""
    path.chmod(0o444)
    if writable(path) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if writable(path):
        pytest.skip("cannot make a file read-only here (root, and no chattr +i)")


def make_writable(path: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o644)


def test_a_read_only_mlflow_store_is_refused_before_the_first_trial(runs, capsys):
    words = command(runs)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=2"]) == 0
    store = runs / "mlflow.db"
    make_read_only(store)
    try:
        before = snapshot(runs)
        capsys.readouterr()
        assert main(["sweep", "--quiet", *words, "sweep.n_trials=4"]) == 2
        err = capsys.readouterr().err
        assert f"the MLflow store {store} cannot be written" in err
        assert "chmod u+w" in err and "run the same command again" in err
        assert snapshot(runs) == before  # refused before any write: no trial burned
    finally:
        make_writable(store)
    assert main(["sweep", "--quiet", *words, "sweep.n_trials=4"]) == 0
    check_whole(words, 4)


def test_an_mlflow_store_turning_read_only_mid_study_stops_it(runs, capsys, monkeypatch):
    """The store refusing writes mid-study (a disk remounted read-only) fails one trial and
    stops the study with one message, instead of failing every trial left."""
    from mlflow.exceptions import MlflowException

    from harness.tracking import MLflowTracker

    real = MLflowTracker.start_run
    calls = {"n": 0}

    def start_run(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")
        return real(self, *args, **kwargs)

    words = command(runs, "sweep.n_trials=8")
    monkeypatch.setattr(MLflowTracker, "start_run", start_run)
    assert main(["sweep", "--quiet", *words]) == 2
    err = capsys.readouterr().err
    assert err.count(f"the MLflow store {runs / 'mlflow.db'} cannot be written") == 1, err
    states = Counter(t.state.name for t in existing_study(load_config(words)).trials)  # type: ignore[union-attr]
    assert states == {"COMPLETE": 2, "FAIL": 1}, states
    monkeypatch.setattr(MLflowTracker, "start_run", real)
    assert main(["sweep", "--quiet", *words]) == 0
    check_whole(words, 8)


def test_failed_trials_are_summarised_and_a_short_study_exits_non_zero(runs, capsys):
    words = [
        "backend=fake",
        "backend._target_=tests.helpers.FlakyBackend",  # batch size 8 fails
        "sampler=grid",
        "search=none",
        "train.batch_size=choice(8, 16, 32)",
        "pruner=none",
        f"paths.runs_dir={runs}",
        "sweep.n_trials=3",
    ]
    assert main(["sweep", *words]) == 1
    out = capsys.readouterr().out
    failed = next(t for t in existing_study(load_config(words)).trials if t.state.name == "FAIL")  # type: ignore[union-attr]
    assert "3 trials: 2 complete, 0 pruned, 1 failed" in out
    assert (
        f"2 of 3 trials finished; 1 failed (trial {failed.number}: RuntimeError: out of memory "
        "(simulated for batch size 8)). Run the same command to try again" in out
    )
