"""The MLflow writer process (harness.tracking.mlflow_writer): a trial run's writes after its
creation, made in order by a forked process; nothing sent is lost when the sweep's process is
killed; the next sweep waits for what an ended one sent; runs a killed writer left open are
closed with the metrics Optuna recorded."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.tracking import MLflowTracker, mlflow_writer, tracking_uri
from harness.tracking.mlflow_writer import writers_folder

FAST = ("backend=fake",)


def trial_runs(cfg) -> list:
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.name)
    return [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if run.data.tags.get("harness.role") == "trial"
    ]


def test_a_trial_runs_writes_go_through_the_writer_in_order(make_cfg):
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None and tracker.writes.pid  # forked before the store opened
    writer = tracker.writes.pid
    run = tracker.start_run("trial-0000", {"train.lr": 0.1}, {"optuna.trial_number": "0"}, cfg)
    run.log_metrics(1, {"eval/f1": 0.5})
    run.log_metrics(2, {"eval/f1": 0.6, "objective": 0.6}, buffered=True)
    run.set_tags({"harness.note": "first"})
    run.set_tags({"harness.note": "last"})  # set twice: the last value wins, as in place
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    # any other request through the tracker waits for the writes sent before it
    assert tracker.run_tags(run.run_id)["harness.note"] == "last"
    tracker.close_writes()
    with pytest.raises(ChildProcessError):  # reaped: it ended with its input
        os.waitpid(writer, os.WNOHANG)
    [logged] = trial_runs(cfg)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"train.lr": "0.1"}
    assert logged.data.metrics == {"eval/f1": 0.6, "objective": 0.6}
    assert logged.data.tags["harness.note"] == "last"
    assert logged.data.tags["optuna.trial_state"] == "COMPLETE"
    assert logged.inputs.dataset_inputs  # the data files as dataset inputs
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(logged.info.run_id, "eval/f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]
    assert list(writers_folder(Path(tracking_uri(cfg).removeprefix("sqlite:///"))).iterdir()) == []


def test_a_process_that_opened_the_store_already_writes_in_place(make_cfg):
    """Forking while this process holds a connection to the SQLite file could corrupt it:
    a second tracker on the store in one process makes its requests itself."""
    cfg = make_cfg(*FAST)
    first = MLflowTracker(cfg)
    first.close_writes()
    second = MLflowTracker(cfg)
    assert second.writes is None
    run = second.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    [logged] = trial_runs(cfg)
    assert (logged.info.status, logged.data.params) == ("FINISHED", {"x": "1"})


SENDS_THEN_DIES = textwrap.dedent(
    """
    import os, signal, sys
    from harness.config import load_config
    from harness.tracking import MLflowTracker
    cfg = load_config(sys.argv[1:])
    tracker = MLflowTracker(cfg)
    for number in range(150):
        run = tracker.start_run(f"trial-{number:04d}", {"n": number},
                                {"optuna.trial_number": str(number)}, cfg)
        run.log_metrics(1, {"objective": number / 150})
        run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    print(tracker.writes.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no exit handler: the writer is left to finish
    """
)


@pytest.mark.slow
def test_the_writes_of_a_killed_sweep_are_made_and_the_next_sweep_waits_for_them(runs):
    """kill -9 of the sweep's process: its writer makes what it was sent (it reads to the end
    of its input), and a tracker opened on the store meanwhile waits for it (its lock)."""
    overrides = ["backend=fake", f"paths.runs_dir={runs}", "name=killed"]
    errors = runs.parent / "stderr.txt"  # a file: the writer holds it open after the kill
    with errors.open("w") as stderr:
        process = subprocess.run(
            [sys.executable, "-c", SENDS_THEN_DIES, *overrides],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
    assert process.returncode == -signal.SIGKILL, errors.read_text()
    assert int(process.stdout.split()[0])  # it had a writer
    from harness.config import load_config

    cfg = load_config(overrides)
    MLflowTracker(cfg, defer_writes=False)  # waits for the writer of the killed process
    store = Path(tracking_uri(cfg).removeprefix("sqlite:///"))
    assert list(writers_folder(store).iterdir()) == []  # it finished: its lock file is gone
    logged = trial_runs(cfg)
    assert len(logged) == 150
    assert {run.info.status for run in logged} == {"FINISHED"}
    assert sum("objective" in run.data.metrics for run in logged) == 150


HOLDS_A_WRITERS_LOCK = textwrap.dedent(
    """
    import fcntl, sys
    from pathlib import Path
    with open(sys.argv[1], "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.readline()  # still writing until told: the next sweep is waiting by then
        Path(sys.argv[2]).write_text("made")
    """
)


class FlockReleasingTheHolder:
    """mlflow_writer's fcntl, but the first lock refused to the waiter tells the holder (on its
    stdin) to make its last write and let go: the wait is seen to happen, with no clock."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        self.holder = holder
        self.refusals = 0

    def flock(self, fd, operation) -> None:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            self.refusals += 1
            if self.refusals == 1 and self.holder.stdin is not None:
                self.holder.stdin.write("go\n")
                self.holder.stdin.flush()
            raise

    def __getattr__(self, name: str):
        return getattr(fcntl, name)


def test_a_new_tracker_waits_for_the_writer_of_an_ended_sweep(make_cfg, tmp_path, monkeypatch):
    """The lock file of a writer whose sweep is gone (its owner pid dead): a tracker opened on
    the store returns only once that writer let its lock go, after its last write."""
    cfg = make_cfg(*FAST)
    MLflowTracker(cfg, defer_writes=False)  # the store
    dead = subprocess.Popen(["true"])  # its pid: a sweep that ended
    dead.wait()
    store = Path(tracking_uri(cfg).removeprefix("sqlite:///"))
    writers_folder(store).mkdir(exist_ok=True)
    lock = writers_folder(store) / f"{dead.pid}-0.lock"
    made = tmp_path / "made"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDS_A_WRITERS_LOCK, str(lock), str(made)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        released = FlockReleasingTheHolder(holder)
        monkeypatch.setattr(mlflow_writer, "fcntl", released)
        MLflowTracker(cfg, defer_writes=False)
        assert released.refusals >= 1  # it found the lock held, and waited
        assert made.read_text() == "made"  # the writer's last write came before its return
        assert not lock.exists()
    finally:
        holder.kill()
        holder.wait()


def test_runs_a_killed_writer_left_open_are_closed_with_the_metrics_optuna_recorded(make_cfg):
    """A writer killed itself loses what it had not made: the next sweep closes the run of a
    completed trial with the final metrics Optuna recorded for it, at its last step."""
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg, defer_writes=False)
    run = tracker.start_run("trial-0003", {"x": 1}, {"optuna.trial_number": "3"}, cfg)
    kept = tracker.start_run("trial-0004", {"x": 2}, {"optuna.trial_number": "4"}, cfg)
    kept.log_metrics(7, {"objective": 0.9})  # its own: not overwritten
    finals = {3: (12, {"objective": 0.7, "test/f1": 0.6}), 4: (7, {"objective": 0.1})}
    trials = {3: ("COMPLETE", ""), 4: ("COMPLETE", "")}
    MLflowTracker(cfg, defer_writes=False).close_abandoned_runs(trials, finals)
    by_number = {r.data.tags["optuna.trial_number"]: r for r in trial_runs(cfg)}
    closed = by_number["3"]
    assert closed.info.status == "FINISHED"
    assert closed.data.metrics == {"objective": 0.7, "test/f1": 0.6}
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(run.run_id, "objective")
    assert [m.step for m in history] == [12]
    assert by_number["4"].data.metrics == {"objective": 0.9}
    assert by_number["4"].info.status == "FINISHED"


def test_a_sweep_whose_writer_died_makes_its_writes_itself(make_cfg, capfd):
    """The writer killed (the OOM killer, say): the next write notices, says so once, and the
    sweep goes on writing in place; the run still ends FINISHED with what was sent after."""
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None
    run = tracker.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    tracker.writes.sync()  # its params and inputs made
    assert tracker.writes.pid > 0
    os.kill(tracker.writes.pid, signal.SIGKILL)
    os.waitpid(tracker.writes.pid, 0)  # dead before the next write
    run.log_metrics(3, {"objective": 0.8})
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    later = tracker.start_run("trial-0001", {"x": 2}, {"optuna.trial_number": "1"}, cfg)
    later.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    tracker.close_writes()
    assert capfd.readouterr().err.count("MLflow writer process") == 1
    by_number = {r.data.tags["optuna.trial_number"]: r for r in trial_runs(cfg)}
    assert by_number["0"].info.status == "FINISHED"
    assert by_number["0"].data.metrics == {"objective": 0.8}
    assert (by_number["0"].data.params, by_number["1"].data.params) == ({"x": "1"}, {"x": "2"})
    assert by_number["1"].info.status == "FINISHED"


def test_a_writer_killed_before_the_sweep_closes_it_is_reported(make_cfg, capfd):
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None
    run = tracker.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    assert tracker.writes.pid > 0  # (0 would signal this whole process group)
    os.kill(tracker.writes.pid, signal.SIGKILL)
    tracker.close_writes()
    err = capfd.readouterr().err
    assert "ended before its last writes (killed by signal 9)" in err
    assert "the next sweep closes the runs it left open" in err


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP has taken effect)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def wait_until(condition, what: str, tries: int = 10_000) -> None:
    for _ in range(tries):  # bounded; each try is a read of /proc
        if condition():
            return
    raise AssertionError(f"never: {what}")


def test_a_sync_cut_short_leaves_no_acknowledgement_for_the_next_to_take(make_cfg):
    """A sync that timed out (or was cut by Ctrl-C) is acknowledged later: the next sync waits
    for its own acknowledgement, so it returns only once the writes sent before it are made."""
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None
    writer = tracker.writes.pid
    assert writer > 0
    run = tracker.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    os.kill(writer, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(writer), "the writer stopped")
        with pytest.raises(RuntimeError, match="did not finish its writes in 0 s"):
            tracker.writes.sync(timeout_s=0)
    finally:
        os.kill(writer, signal.SIGCONT)
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    tracker.writes.sync()
    [logged] = trial_runs(cfg)
    assert logged.info.status == "FINISHED"
    tracker.close_writes()


def test_writes_past_mlflows_limits_per_request_all_arrive(make_cfg):
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    params = {f"p{i}": i for i in range(150)}
    run = tracker.start_run("trial-0000", params, {"optuna.trial_number": "0"}, cfg)
    for step in range(3):
        run.log_metrics(step, {f"m{i}": float(i + step) for i in range(600)}, buffered=True)
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    tracker.close_writes()
    [logged] = trial_runs(cfg)
    assert len(logged.data.params) == 150
    assert len(logged.data.metrics) == 600 and logged.data.metrics["m599"] == 601.0
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(logged.info.run_id, "m7")
    assert [(m.step, m.value) for m in history] == [(0, 7.0), (1, 8.0), (2, 9.0)]


def test_a_run_its_live_sweep_is_still_writing_is_not_closed_by_another(make_cfg):
    """RUNNING while its trial is COMPLETE is normal for a moment with a writer: another sweep
    on the study (a worker starting) leaves the run to its own sweep, which closes it."""
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None
    run = tracker.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    other = MLflowTracker(cfg)  # in this process the store is open: it writes in place
    other.close_abandoned_runs({0: ("COMPLETE", "")}, {0: (3, {"objective": 0.1})})
    [logged] = trial_runs(cfg)
    assert (logged.info.status, logged.data.metrics) == ("RUNNING", {})
    run.log_metrics(3, {"objective": 0.8})
    run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    tracker.close_writes()
    [logged] = trial_runs(cfg)
    assert (logged.info.status, logged.data.metrics) == ("FINISHED", {"objective": 0.8})


def test_a_refused_write_costs_only_itself_when_writes_are_merged(make_cfg, capfd):
    """Writes that waited together go in one request; MLflow refusing it (a param's value
    changed) has each tried alone: the rest of the run's writes and its end are made."""
    cfg = make_cfg(*FAST)
    tracker = MLflowTracker(cfg)
    assert tracker.writes is not None and tracker.writes.pid > 0
    writer = tracker.writes.pid
    run = tracker.start_run("trial-0000", {"x": 1}, {"optuna.trial_number": "0"}, cfg)
    tracker.writes.sync()
    os.kill(writer, signal.SIGSTOP)  # what follows waits in the pipe, to be merged
    try:
        wait_until(lambda: stopped(writer), "the writer stopped")
        run.log_params({"x": 2})  # MLflow refuses to change a param
        run.log_metrics(4, {"objective": 0.7})
        run.end("FINISHED", {"optuna.trial_state": "COMPLETE"})
    finally:
        os.kill(writer, signal.SIGCONT)
    tracker.close_writes()
    assert "an MLflow write of run" in capfd.readouterr().err
    [logged] = trial_runs(cfg)
    assert logged.data.params == {"x": "1"}
    assert logged.data.metrics == {"objective": 0.7}
    assert (logged.info.status, logged.data.tags["optuna.trial_state"]) == ("FINISHED", "COMPLETE")
