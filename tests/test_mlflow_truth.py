"""What the MLflow runs say is so: each run's own duration, an objective for every trial
(pruned ones too), pruned runs apart from failed ones, the data files as dataset inputs, and
the default SQLite store in WAL mode. Sweeps run through the CLI, as a user starts them."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import load_config
from harness.data import resolve_path
from harness.study import load_study
from tests.helpers import study_runs, write

FLAKY_PRUNED = (
    "backend=fake",
    "backend._target_=tests.helpers.FlakyBackend",  # fails every trial of batch size 8
    "sampler=random",
    "pruner=median",
    "pruner.n_startup_trials=2",
    "pruner.n_warmup_steps=0",
    "sweep.n_trials=12",
)


def sweep(
    runs: Path, *overrides: str, code: int = 0
) -> tuple[optuna.Study, MlflowClient, dict[str, object]]:
    """`harness sweep OVERRIDES` into ``runs``, exiting with ``code`` (1: short of n_trials):
    the Optuna study, a client on its MLflow store and the study's runs by name."""
    args = [*overrides, f"paths.runs_dir={runs}"]
    assert main(["sweep", *args]) == code
    cfg = load_config(args)
    found = study_runs(cfg)
    return load_study(cfg), found.client, found.by_name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs(run) -> set[tuple[str, str, str, str]]:
    """(name, digest, file, context) of each dataset input of a run."""
    return {
        (
            i.dataset.name,
            i.dataset.digest,
            json.loads(i.dataset.source)["uri"],
            {t.key: t.value for t in i.tags}["mlflow.data.context"],
        )
        for i in run.inputs.dataset_inputs
    }


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    """A fake-backend sweep with complete, pruned and failed trials (seconds)."""
    runs = tmp_path_factory.mktemp("truth") / "runs"
    study, client, by_name = sweep(runs, *FLAKY_PRUNED, code=1)  # failed trials: short
    states = {t.state.name for t in study.trials}
    assert states == {"COMPLETE", "PRUNED", "FAIL"}, states  # the seed gives all three
    return runs, study, client, by_name


def test_pruned_trials_carry_their_last_objective_and_finish(mixed_sweep):
    _, study, client, by_name = mixed_sweep
    for trial in study.trials:
        run = by_name[f"trial-{trial.number:04d}"]
        assert run.data.tags["optuna.trial_state"] == trial.state.name
        if trial.state.name == "PRUNED":
            last_step = max(trial.intermediate_values)
            # Optuna's value of a pruned trial is its last intermediate value; MLflow's too
            assert trial.value == trial.intermediate_values[last_step]
            assert run.data.metrics["objective"] == pytest.approx(trial.value)
            # at the step of that evaluation: the last eval/f1 point
            objective = client.get_metric_history(run.info.run_id, "objective")
            f1 = client.get_metric_history(run.info.run_id, "eval/f1")
            assert [m.step for m in objective] == [f1[-1].step]
            assert "pruned at evaluation" in run.data.tags["harness.pruned_reason"]
            # FINISHED: MLflow's runs table draws KILLED with FAILED's red cross
            assert run.info.status == "FINISHED"
        elif trial.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["objective"] == pytest.approx(trial.value)
        else:
            assert run.info.status == "FAILED"
            assert "out of memory (simulated" in run.data.tags["harness.failure_reason"]
            assert "objective" not in run.data.metrics


def test_every_run_lists_the_data_file_as_its_dataset_inputs(mixed_sweep):
    _, _, _, by_name = mixed_sweep
    data = resolve_path(load_config([]).data.path)
    digest = sha256(data)[:36]  # as much of the sha256 as MLflow keeps
    expected = {
        (f"{data.name}:{split}", digest, str(data), context)
        for split, context in (
            ("train", "training"),
            ("validation", "validation"),
            ("test", "test"),
        )
    }
    assert len(by_name) == 13  # the parent and 12 trials, failed ones included
    for name, run in by_name.items():
        assert inputs(run) == expected, name


def test_split_files_are_inputs_of_their_own_context(tmp_path, runs):
    lines = resolve_path(load_config([]).data.path).read_text().splitlines(keepends=True)
    train = write(tmp_path / "train.jsonl", "".join(lines[:100]))
    valid = write(tmp_path / "valid.jsonl", "".join(lines[100:]))
    _, _, by_name = sweep(
        runs,
        "backend=fake",
        "sweep.n_trials=1",
        "data.path=null",
        f"data.train={train}",
        f"data.validation={valid}",
    )
    # no test file: test metrics are measured on the validation file, so it is the test input
    assert inputs(by_name["trial-0000"]) == {
        ("train.jsonl:train", sha256(train)[:36], str(train), "training"),
        ("valid.jsonl:validation", sha256(valid)[:36], str(valid), "validation"),
        ("valid.jsonl:test", sha256(valid)[:36], str(valid), "test"),
    }


def test_the_mlflow_store_is_in_wal_mode_and_an_optuna_sqlite_storage_is_not(
    mixed_sweep, tmp_path, runs
):
    store = mixed_sweep[0] / "mlflow.db"
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: a plain connection
    # every SQLAlchemy connection this process opens to the store (MLflow's among them) syncs
    # at checkpoints only
    engine = sqlalchemy.create_engine(f"sqlite:///{store}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    engine.dispose()
    # an Optuna SQLite storage opened in the same process keeps SQLite's default journal
    optuna_db = tmp_path / "optuna.db"
    sweep(runs, "backend=fake", "sweep.n_trials=1", f"storage.url=sqlite:///{optuna_db}")
    with sqlite3.connect(optuna_db) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    with sqlite3.connect(runs / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


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


def test_the_optuna_journal_syncs_at_trial_boundaries_and_reads_as_optuna_writes_it(
    runs, monkeypatch
):
    """The journal file is synced once per study operation, trial creation and trial end, not
    for each param, reported value and attribute; a plain Optuna reader (optuna-dashboard,
    another tool) reads the same study from it."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    synced: list[int] = []  # inode of each file synced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    study, _, _ = sweep(runs, "backend=fake", "sweep.n_trials=3")
    journal = runs / "optuna" / f"{study.study_name}.log"
    ops = [json.loads(line)["op_code"] for line in journal.read_text().splitlines()]
    at_boundaries = sum(op in (0, 2, 4, 6) for op in ops)  # study, its attrs, trial start/end
    assert synced.count(journal.stat().st_ino) == at_boundaries < len(ops) / 2
    plain = optuna.load_study(
        study_name=study.study_name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )

    def seen(trials):
        return [(t.state, t.params, t.intermediate_values, t.user_attrs) for t in trials]

    assert seen(plain.trials) == seen(study.trials) and len(plain.trials) == 3


@pytest.mark.slow
def test_the_runs_table_shows_pruned_runs_unlike_failed_ones_and_the_datasets(
    mixed_sweep, tmp_path
):
    """In MLflow's runs table, in Chromium: each row's status icon (in the "Created" cell) is
    the same for pruned and complete trials and differs from failed ones' (KILLED got FAILED's
    red cross), and the Dataset column names the data file's training split."""
    from tests.helpers import CHROMIUM_ARGS, harness_ui, playwright_and_chromium

    sync_playwright, chromium = playwright_and_chromium()

    runs, study, _, by_name = mixed_sweep
    parent = by_name[study.study_name]
    trials = {f"trial-{t.number:04d}": t.state.name for t in study.trials}
    data = resolve_path(load_config([]).data.path)
    with harness_ui(runs, tmp_path, health="/health") as ui, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(30_000)
            experiment = parent.info.experiment_id
            page.goto(
                f"{ui.url}/#/experiments/{experiment}/runs?workflowType=machine_learning",
                timeout=60_000,
            )

            def cell(run_id: str, column: str):
                return page.locator(f'[role="row"][row-id="{run_id}"] [col-id="{column}"]')

            expander = cell(parent.info.run_id, "attributes.`Run Name`").locator("button")
            expander.wait_for(state="visible", timeout=60_000)
            expander.click()
            icons: dict[str, set[tuple[str, str]]] = {}
            for name, state in trials.items():
                run_id = by_name[name].info.run_id
                cell(run_id, "attributes.`Run Name`").first.wait_for(state="visible")
                icon = cell(run_id, "runDateAndNestInfo").locator('[role="img"]')
                shape = icon.locator("svg path").first.get_attribute("d") or ""
                colour = icon.evaluate("e => getComputedStyle(e).color")
                icons.setdefault(state, set()).add((shape, colour))
                dataset = cell(run_id, "attributes.`Dataset`").inner_text()
                assert f"{data.name}:train" in dataset and "Training" in dataset, dataset
        finally:
            browser.close()
    assert len(icons["COMPLETE"]) == 1, icons  # one icon for one state
    assert icons["PRUNED"] == icons["COMPLETE"], icons
    assert icons["FAIL"].isdisjoint(icons["COMPLETE"]), icons


def test_train_loss_is_logged_as_its_mean_over_each_window_of_steps(tmp_path):
    """tracking.log_every_steps=10: a loss reported at steps 1..25 is in MLflow at steps 10,
    20 and 25, each the mean of its window (the last window partial, closed with the run)."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import TrialRun

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("windows"))
    trial_run = TrialRun(client, run.info.run_id, run.info.artifact_uri, 5.0, 10)
    for step in range(1, 26):
        trial_run.log_metrics(step, {"train/loss": float(step)}, buffered=True)
    trial_run.log_metrics(25, {"eval/f1": 0.5}, buffered=True)  # other metrics as they come
    trial_run.end("FINISHED")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 5.5), (20, 15.5), (25, 23.0)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/f1")] == [25]
