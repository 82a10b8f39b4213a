"""Bad input at the edges of a study: stores that cannot be reached. Each is one clear error
before any trial, and nothing is written."""

from __future__ import annotations

import socket

import pytest

from harness.config import ConfigError
from harness.study import Sweep
from tests.helpers import study_runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_storage_is_one_clear_error_without_the_password(make_cfg, runs):
    url = f"postgresql://harness:hunter2@127.0.0.1:{free_port()}/nowhere"
    cfg = make_cfg("backend=fake", f"storage.url={url}")
    with pytest.raises(ConfigError, match="cannot open the Optuna storage") as error:
        Sweep(cfg, []).run()
    assert "hunter2" not in str(error.value)
    assert "harness:***@127.0.0.1" in str(error.value)
    assert not (runs / "mlflow.db").exists()  # nothing recorded for a study that never began


def test_unreachable_tracking_server_is_one_clear_error(make_cfg, runs):
    cfg = make_cfg("backend=fake", f"tracking.uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking server") as error:
        Sweep(cfg, []).run()
    assert "mlflow server" in str(error.value)


def test_disk_full_while_logging_artifacts_stops_the_study_and_the_command_resumes(
    make_cfg, monkeypatch
):
    """A full disk (simulated: the artifact write raises ENOSPC) fails that trial with a clear
    reason and stops the study with one message (every next trial would fail the same way);
    both stores stay readable and, space freed, the same command resumes to n_trials."""
    import errno

    from harness.storage import DiskFullError
    from harness.study import load_study
    from harness.tracking import TrialRun

    real_log_artifact = TrialRun.log_artifact

    def log_artifact(self, path, folder=None):
        if path.read_text() == "trial 1\n":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log_artifact(self, path, folder)

    monkeypatch.setattr(TrialRun, "log_artifact", log_artifact)
    overrides = [
        "backend=fake",
        "backend._target_=tests.helpers.ArtifactBackend",
        "sweep.n_trials=3",
        "pruner=none",
    ]
    cfg = make_cfg(*overrides)
    with pytest.raises(DiskFullError, match=r"is full .*run the same command again: it resumes"):
        Sweep(cfg, overrides).run()
    study = load_study(cfg)  # readable
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert "the disk is full" in study.trials[1].user_attrs["fail_reason"]
    runs = study_runs(cfg).by_name
    assert runs["trial-0001"].info.status == "FAILED"
    assert "No space left on device" in runs["trial-0001"].data.tags["harness.failure_reason"]

    monkeypatch.setattr(TrialRun, "log_artifact", real_log_artifact)  # space freed
    Sweep(cfg, overrides).run()
    states = [t.state.name for t in load_study(cfg).trials]
    assert states.count("COMPLETE") == 3 and "RUNNING" not in states


def test_storage_blip_mid_study_is_ridden_out(make_cfg, monkeypatch):
    """The storage failing for a moment (simulated: a few journal writes fail) costs a wait
    and a retried trial, not the study: it still ends with n_trials finished trials."""
    from harness.storage import TrialSyncedJournal as JournalFileBackend  # the one harness uses
    from harness.study import load_study

    real_append = JournalFileBackend.append_logs
    tells = {"n": 0}

    def append_logs(self, logs):
        # the blip hits Optuna's tell of the third trial, and its first retry
        if any(log["op_code"] == 6 and log["state"] == 1 for log in logs):  # -> COMPLETE
            tells["n"] += 1
            if 3 <= tells["n"] <= 4:
                raise OSError(5, "Input/output error")
        return real_append(self, logs)

    overrides = ["backend=fake", "sweep.n_trials=6", "pruner=none"]
    cfg = make_cfg(*overrides)
    monkeypatch.setattr(JournalFileBackend, "append_logs", append_logs)
    Sweep(cfg, overrides).run()
    states = [t.state.name for t in load_study(cfg).trials]
    assert tells["n"] > 4  # the failures happened
    assert states.count("COMPLETE") == 6


@pytest.mark.slow  # a fault: test_faults_recovery removes a storage mid-study too
def test_storage_gone_mid_study_stops_it_with_a_clear_message(make_cfg, monkeypatch):
    """The Optuna storage failing between trials (simulated: its journal file can no longer be
    written) stops the study with one message saying how to resume; finished trials stay."""
    from harness.storage import StorageGoneError
    from harness.storage import TrialSyncedJournal as JournalFileBackend  # the one harness uses
    from harness.study import load_study

    real_append = JournalFileBackend.append_logs
    calls = {"n": 0}

    def append_logs(self, logs):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(5, "Input/output error")
        return real_append(self, logs)

    overrides = ["backend=fake", "sweep.n_trials=10", "pruner=none"]
    cfg = make_cfg(*overrides)
    monkeypatch.setattr(JournalFileBackend, "append_logs", append_logs)
    with pytest.raises(StorageGoneError, match=r"failed during the study.*Run the same command"):
        Sweep(cfg, overrides).run()
    monkeypatch.setattr(JournalFileBackend, "append_logs", real_append)
    finished = [t for t in load_study(cfg).trials if t.state.name == "COMPLETE"]
    assert 0 < len(finished) < 10  # kept; the rest is for the resumed run


def test_passwords_in_urls_and_query_strings_are_redacted():
    from harness.secrets import redact_text

    assert redact_text("postgresql://u:pw1@db/x") == "postgresql://u:***@db/x"
    assert redact_text("host=db dbname=x password=pw2 sslmode=require") == (
        "host=db dbname=x password=*** sslmode=require"
    )
    assert (
        redact_text("postgresql://db/x?user=u&password=pw3")
        == "postgresql://db/x?user=u&password=***"
    )


def test_a_malformed_tracking_url_is_a_clear_error_without_its_password(make_cfg):
    cfg = make_cfg("backend=fake", "tracking.uri=http://user:pw-77@bad host:5000")
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking server") as error:
        Sweep(cfg, []).run()
    assert "pw-77" not in str(error.value)
