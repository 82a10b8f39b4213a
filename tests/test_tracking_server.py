"""`tracking.uri=http://...`: a sweep recorded by a real `mlflow server` on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.study import Sweep
from tests.helpers import study_runs


def test_sweep_records_to_a_tracking_server(mlflow_server, make_cfg, runs):
    overrides = ["backend=fake", "sweep.n_trials=3", f"tracking.uri={mlflow_server}"]
    cfg = make_cfg(*overrides)
    Sweep(cfg, overrides).run()
    found = study_runs(mlflow_server, cfg.name)
    client, parents, trials = found.client, found.parents, found.trials
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    config_path = client.download_artifacts(trials[0].info.run_id, "config.yaml")
    assert "name: sentiment_tiny" in Path(config_path).read_text()
    assert not (runs / "mlflow.db").exists()  # nothing went to the local default store


@pytest.mark.slow  # a fault: test_faults_tracking kills a server mid-study too
def test_tracking_server_gone_mid_study_stops_it_with_a_clear_message(mlflow_server, make_cfg):
    """The server stops answering after trial 1: the next trial fails (after MLflow's own
    retries, bounded by tracking.server_timeout_s), and the study stops at once with one
    message, rather than failing every remaining trial slowly. The Optuna storage keeps what
    finished."""
    from harness.study import TrialOutcome, load_study
    from harness.tracking import TrackingServerError

    overrides = ["backend=fake", "sweep.n_trials=6", "pruner=none", f"tracking.uri={mlflow_server}",
                 "tracking.server_timeout_s=2"]  # fmt: skip
    cfg = make_cfg(*overrides)

    def on_trial(outcome: TrialOutcome) -> None:
        if outcome.number == 1:
            mlflow_server.process.terminate()
            mlflow_server.process.wait(timeout=20)

    with pytest.raises(TrackingServerError, match=r"stopped answering.*run the same command"):
        Sweep(cfg, overrides, on_trial).run()
    states = [t.state.name for t in load_study(cfg).trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
