"""What the MLflow runs say is so: each run's own duration, an objective for every trial
(pruned ones too), pruned runs apart from failed ones, the data files as dataset inputs, and
the default SQLite store in WAL mode. Sweeps run through the CLI, as a user starts them."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import load_config
from harness.study import load_study
from harness.tracking import tracking_uri


def sweep(runs: Path, *overrides: str) -> tuple[optuna.Study, MlflowClient, dict[str, object]]:
    """`harness sweep OVERRIDES` into ``runs``: the Optuna study, a client on its MLflow store
    and the study's runs by name."""
    args = [*overrides, f"paths.runs_dir={runs}"]
    assert main(["sweep", *args]) == 0
    cfg = load_config(args)
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.name)
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return load_study(cfg), client, {r.info.run_name: r for r in found}


@pytest.mark.slow
def test_the_best_run_keeps_its_duration_when_its_model_is_logged(runs):
    """The best trial's model is logged at the end of the sweep, after every trial: its run's
    end (and so its duration in the UI) stays the trial's own."""
    study, client, by_name = sweep(
        runs,
        "sweep.n_trials=2",
        "train.epochs=1",
        "tracking.register_best_model=false",
    )
    best = study.best_trial
    run = client.get_run(by_name[f"trial-{best.number:04d}"].info.run_id)
    assert run.data.tags["harness.model_logged"] == "true"
    assert run.outputs.model_outputs, "no model logged in the best trial's run"
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert model.experiment_id == run.info.experiment_id  # the study's, not MLflow's Default
    assert run.info.status == "FINISHED"

    def ms(moment) -> int:
        return int(moment.timestamp() * 1000)

    # the run lies within its trial: created after the trial began, ended before it was told
    # complete, so before the model logging that follows every trial
    assert ms(best.datetime_start) <= run.info.start_time <= run.info.end_time
    assert run.info.end_time <= ms(best.datetime_complete)
    parent = by_name[load_config([]).name]
    assert run.info.end_time < parent.info.end_time
