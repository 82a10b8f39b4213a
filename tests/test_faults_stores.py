"""Fault injection on the stores (issue 11, items 1 and 2): kill -9 and Ctrl-C at many moments
of a study's first start, four processes starting together in an empty folder, a full disk,
and a journal with a torn last line. After each, the same command resumes to exactly n_trials,
nothing RUNNING in Optuna or MLflow, no trial number twice.

The kill loop runs `harness sweep` in processes forked from a process that has already imported
harness and its libraries (``Forker``): a process then reaches the stores in milliseconds, not
after seconds of imports, so many kills fit in a short test and each lands while the stores are
being built or written. Each forked process runs ``harness.cli.main``, exactly what
``python -m harness.cli`` runs.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from harness.cli import main
from tests.helpers import study_runs

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # the slow tier (pyproject.toml)

STUDY = "sentiment_tiny"  # the default study
FAKE = ("backend=fake", "sampler=random", "--quiet")


def sweep_args(runs: Path, n_trials: int, *more: str) -> list[str]:
    return ["sweep", *FAKE, f"sweep.n_trials={n_trials}", f"paths.runs_dir={runs}", *more]


# A process that imports harness once, then forks a child per command: {"argv": [...], "out":
# file} -> "pid N"; "wait N" -> "rc R" (R < 0: killed by signal -R). One command at a time.
FORKER = r"""
import json, os, sys, traceback
import harness.cli, harness.study, harness.backends.fake, harness.mlflow_store  # noqa
import mlflow, mlflow.store.db.utils, mlflow.store.tracking.sqlalchemy_store, alembic  # noqa
import optuna, sqlalchemy  # noqa
mlflow.store.db.utils._get_latest_schema_revision()  # reads alembic's scripts: in the parent
print("ready", flush=True)
for line in sys.stdin:
    command, _, rest = line.strip().partition(" ")
    if command == "run":
        job = json.loads(rest)
        pid = os.fork()
        if pid == 0:
            out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            code = 1
            try:
                code = harness.cli.main(job["argv"]) or 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
    elif command == "wait":
        _, status = os.waitpid(int(rest), 0)
        print(f"rc {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class Forker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        assert self._answer() == "ready"

    def _answer(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line, "the forking process ended"
        return line

    def _send(self, line: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._answer()

    def start(self, argv: list[str], out: Path) -> int:
        return int(self._send("run " + json.dumps({"argv": argv, "out": str(out)})).split()[1])

    def wait(self, pid: int) -> int:
        return int(self._send(f"wait {pid}").split()[1])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def forker():
    forking = Forker()
    try:
        yield forking
    finally:
        forking.close()


def journal(runs: Path) -> Path:
    return runs / "optuna" / f"{STUDY}.log"


def load(runs: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal(runs)))
    )
    return optuna.load_study(study_name=STUDY, storage=storage)


def mlflow_runs(runs: Path) -> list:
    return study_runs(f"sqlite:///{runs / 'mlflow.db'}", STUDY).runs


def assert_resumed_whole(runs: Path, n_trials: int, what: str) -> None:
    """Exactly n_trials finished, nothing RUNNING in Optuna or MLflow, no trial number twice."""
    trials = load(runs).trials
    states = collections.Counter(t.state.name for t in trials)
    assert states["COMPLETE"] + states["PRUNED"] == n_trials, (what, states)
    assert states["RUNNING"] == 0, (what, states)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), (what, numbers)
    recorded = mlflow_runs(runs)
    assert [r.info.status for r in recorded if r.info.status == "RUNNING"] == [], what
    roles = collections.Counter(r.data.tags.get("harness.role") for r in recorded)
    assert roles["study"] == 1, (what, roles)
    finished = [
        r.data.tags["optuna.trial_number"]
        for r in recorded
        if r.data.tags.get("harness.role") == "trial" and r.info.status == "FINISHED"
    ]
    assert len(finished) == len(set(finished)), (what, finished)
    # a kill between a run's end in MLflow and Optuna's record of it: the resume fails that
    # trial and its run (fail_stale_run), and retries it under a new number
    done = {str(t.number) for t in trials if t.state.name in ("COMPLETE", "PRUNED")}
    assert done == set(finished), (what, done, finished)


def wait_until(condition, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


def stop_at(forker: Forker, pid: int, moment: tuple[str, float | str], sig: int) -> int:
    """Sends ``sig`` to the forked sweep at ``moment`` (seconds after its start, or when a path
    appears), then waits for it; its exit code."""
    kind, value = moment
    deadline = time.monotonic() + 60
    if kind == "after":
        wait_until(lambda: False, time.monotonic() + float(value))
    else:  # a file appearing (or the process ending first): polled, bounded by the deadline
        wait_until(lambda: bool(glob.glob(str(value))) or ended(pid), deadline)
    try:
        os.kill(pid, sig)
        if sig == signal.SIGINT:  # Ctrl-C pressed twice, as an impatient user does
            wait_until(lambda: False, time.monotonic() + 0.05)
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
    return forker.wait(pid)


def ended(pid: int) -> bool:
    """The forked process has exited (a zombie until the forker waits for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def timed_run(forker: Forker, argv: list[str], out: Path) -> float:
    started = time.monotonic()
    pid = forker.start(argv, out)
    assert forker.wait(pid) == 0, out.read_text()
    return time.monotonic() - started


def test_kills_and_interrupts_during_the_first_start_always_resume(forker, tmp_path):
    """A seeded loop of kills (SIGKILL) and Ctrl-Cs (SIGINT) at moments spread over a first
    start: while the MLflow store is being built, as the journal appears, and at random delays
    over the whole run. Each study folder takes several stops in a row (the stopped command run
    again, and stopped again: a kill during the recovery of the last one), then the same command
    once more, which must resume to exactly n_trials."""
    n_trials = 2
    rng = random.Random(11)
    # How long a first start takes here, and a start that finds the stores made and runs every
    # trial: the windows the random delays spread over.
    calibration, out = tmp_path / "calibration" / "runs", tmp_path / "calibration.out"
    first_start = timed_run(forker, sweep_args(calibration, n_trials), out)
    later_start = timed_run(forker, sweep_args(calibration, 2 * n_trials), out)
    kills = interrupts = hits = 0
    for folder in range(4):
        runs = tmp_path / f"study{folder}" / "runs"
        out = tmp_path / f"study{folder}.out"
        for stop in range(6):
            choice = rng.random()
            if choice < 0.3 and not (runs / "mlflow.db").exists():
                # MLflow's schema being built in this process's temporary file
                moment: tuple[str, float | str] = ("file", f"{runs}/mlflow.db.building-{{pid}}")
            elif choice < 0.4 and not journal(runs).exists():
                moment = ("file", str(journal(runs)))
            else:
                window = later_start if (runs / "mlflow.db").exists() else first_start
                moment = ("after", rng.uniform(0.0, window))
            sig = signal.SIGINT if stop == folder + 1 else signal.SIGKILL
            pid = forker.start(sweep_args(runs, n_trials), out)
            code = stop_at(forker, pid, (moment[0], str(moment[1]).format(pid=pid)), sig)
            kills += sig == signal.SIGKILL
            interrupts += sig == signal.SIGINT
            hits += code != 0  # else the run was over before the signal came
            assert code in (0, 130, -signal.SIGKILL), (moment, sig, code, out.read_text())
            assert "Traceback" not in out.read_text(), out.read_text()
        # a build stopped part-way leaves no store, or a whole one: never a half-built file
        pid = forker.start(sweep_args(runs, n_trials), out)
        assert forker.wait(pid) == 0, out.read_text()
        assert_resumed_whole(runs, n_trials, f"folder {folder}")
        assert not list(runs.glob("mlflow.db.building-*"))
    print(f"{kills} kills and {interrupts} interrupts, {hits} while the command ran")
    assert kills >= 20 and interrupts >= 3
    # Most signals must land while the command still runs, or the loop tests nothing. The delays
    # spread over calibrated windows that a busy machine stretches or shrinks (CI once saw 17 of
    # 24), so the floor is a majority, not a count tuned to this machine.
    assert hits > (kills + interrupts) // 2, (hits, kills + interrupts)


def test_four_processes_starting_together_in_an_empty_folder(forker, tmp_path):
    """Four `harness sweep` processes at once on an empty folder: one builds the MLflow store,
    the others wait for it; together they run exactly n_trials."""
    runs = tmp_path / "runs"
    n_trials = 6
    outs = [tmp_path / f"worker{i}.out" for i in range(4)]
    pids = [forker.start(sweep_args(runs, n_trials), out) for out in outs]
    codes = [forker.wait(pid) for pid in pids]
    texts = [out.read_text() for out in outs]
    assert codes == [0, 0, 0, 0], texts
    assert all("Traceback" not in text for text in texts), texts
    assert not list(runs.glob("mlflow.db.building-*"))
    assert_resumed_whole(runs, n_trials, "four at once")
    # the store stays usable: the same command again has nothing left to run, and says so
    assert main(sweep_args(runs, n_trials)) == 0
    assert_resumed_whole(runs, n_trials, "after four at once")


def test_half_built_store_of_an_older_version_is_rebuilt(tmp_path, caplog):
    """A store an older harness left half-built (its schema migrations stopped part-way: no
    run in it) is moved aside and built again; the sweep runs."""
    import sqlite3

    runs = tmp_path / "runs"
    runs.mkdir()
    with sqlite3.connect(runs / "mlflow.db") as db:  # MLflow's first table, then a stop
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
    assert main(sweep_args(runs, 2)) == 0
    assert "mlflow.db was left half-built" in caplog.text  # logging's stderr, off pytest
    assert (runs / "mlflow.db.half-built").exists()
    assert_resumed_whole(runs, 2, "rebuilt store")


def test_store_of_another_schema_with_runs_is_refused_in_one_line(tmp_path, capsys):
    """A store holding runs under a schema this MLflow does not use is never moved or changed:
    one line says how to upgrade it."""
    import sqlite3

    runs = tmp_path / "runs"
    runs.mkdir()
    with sqlite3.connect(runs / "mlflow.db") as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT)")
        db.execute("INSERT INTO runs VALUES ('abc')")
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
    before = (runs / "mlflow.db").read_bytes()
    assert main(sweep_args(runs, 2)) == 2
    err = capsys.readouterr().err
    assert "mlflow db upgrade" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert (runs / "mlflow.db").read_bytes() == before


def test_a_torn_last_line_of_the_journal_is_cut_and_the_study_resumes(tmp_path):
    """A process stopped midway through a journal write leaves a last line without its end;
    the next run cuts it (instead of appending to it, which made every later read fail) and
    resumes."""
    runs = tmp_path / "runs"
    assert main(sweep_args(runs, 2)) == 0
    whole = journal(runs).read_bytes()
    with journal(runs).open("ab") as file:
        file.write(b'{"op_code":4,"worker_id":"w","trial_id":2,"param_na')
    assert main(sweep_args(runs, 4)) == 0
    assert journal(runs).read_bytes().startswith(whole)
    for line in journal(runs).read_bytes().splitlines():
        json.loads(line)  # every line whole
    assert_resumed_whole(runs, 4, "torn line")


def test_a_journal_an_older_version_appended_to_a_torn_line_is_repaired(tmp_path, caplog):
    """Older versions appended after a torn last line, joining the two: every read then failed
    (JSONDecodeError). The torn part is dropped, the whole record after it kept; resumes."""
    runs = tmp_path / "runs"
    assert main(sweep_args(runs, 2)) == 0
    lines = journal(runs).read_bytes().splitlines(keepends=True)
    torn = b'{"op_code":5,"worker_id":"w","trial_id":1,"user_attr":{"met'
    joined = [*lines[:-3], torn + lines[-3], *lines[-2:]]
    journal(runs).write_bytes(b"".join(joined))
    assert main(sweep_args(runs, 4)) == 0
    assert "repaired 1 line(s)" in caplog.text
    assert journal(runs).with_name(f"{STUDY}.log.damaged").read_bytes() == b"".join(joined)
    for line in journal(runs).read_bytes().splitlines():
        json.loads(line)
    assert_resumed_whole(runs, 4, "repaired journal")


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def test_a_full_disk_stops_the_study_with_one_message_and_the_command_resumes(tmp_path, capsys):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "8m")
    try:
        runs = disk / "runs"
        n_trials = 12
        assert main(sweep_args(runs, 2)) == 0  # the stores exist
        capsys.readouterr()
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        with filler.open("wb") as file:  # leave a few KB: the study fills them within trials
            file.write(b"\0" * (free - 48 * 1024))
        code = main(sweep_args(runs, n_trials))
        err = capsys.readouterr().err
        assert code == 2
        messages = [line for line in err.splitlines() if line.startswith("harness sweep: error")]
        assert len(messages) == 1, err
        assert (
            "the disk holding" in messages[0]
            and "is full" in messages[0]
            and "run the same command again" in messages[0]
        )
        assert "Traceback" not in err, err
        failed = collections.Counter(t.state.name for t in load(runs).trials)["FAIL"]
        assert failed <= 1  # the study stopped at the first trial the disk failed
        filler.unlink()
        assert main(sweep_args(runs, n_trials)) == 0
        for line in journal(runs).read_bytes().splitlines():
            json.loads(line)
        assert_resumed_whole(runs, n_trials, "after a full disk")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_ctrl_c_a_migration_buries_under_its_own_error_still_exits_as_an_interrupt(
    tmp_path, monkeypatch, capsys
):
    """Alembic's batch migrations run more SQL as their context exits: a Ctrl-C inside one
    surfaces as SQLAlchemy's PendingRollbackError (seen in the kill loop). It is still an
    interrupt: exit 130 with the resume hint, no traceback, no store or temporary file left."""
    import mlflow.store.db.utils

    def interrupted_migration(engine):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("Can't reconnect until invalid transaction is rolled back")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", interrupted_migration)
    runs = tmp_path / "runs"
    assert main(["sweep", "backend=fake", "sweep.n_trials=1", f"paths.runs_dir={runs}"]) == 130
    captured = capsys.readouterr()
    assert "run the same command again to resume" in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not list(runs.glob("mlflow.db*"))
