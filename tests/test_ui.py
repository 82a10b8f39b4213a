"""`harness ui` as a user meets it: a subprocess that starts a real server on 127.0.0.1 for a
finished study, which is then read the way its UI reads it, and stopped with SIGINT (Ctrl-C).

The test notes every process `harness ui` starts (its descendants, with psutil), so it can
tell whether stopping harness left any of them running, and kill whatever did in a `finally`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import (
    CHROMIUM_ARGS,
    UI,
    descendants,
    harness_ui,
    playwright_and_chromium,
    refuses,
    run_cli,
    running,
    ui_env,
    wait_for,
)

STUDY = "sentiment_tiny"  # the default study's name: its MLflow experiment and Optuna study
N_TRIALS = 6


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-trial sweep with the fake backend (seconds): its runs directory. The
    servers only read it, so the tests of this module share it."""
    runs = tmp_path_factory.mktemp("ui") / "runs"
    done = run_cli(
        "sweep",
        "backend=fake",
        f"sweep.n_trials={N_TRIALS}",
        "tracking.log_best_model=false",
        f"paths.runs_dir={runs}",
        env=ui_env(),
    )
    assert done.returncode == 0, done.stderr
    assert (runs / "mlflow.db").exists() and (runs / "optuna" / f"{STUDY}.log").exists()
    return runs


# --- `harness ui` stopped -------------------------------------------------------------------


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return f"{process.pid}: (gone)"


def assert_stopped_cleanly(ui: UI, code: int) -> None:
    """Exit code 0 (Ctrl-C is how a server is meant to stop), the port refuses connections,
    and every process harness started is gone: the server and its workers, no orphans."""
    assert code == 0, ui.output()
    assert refuses(ui.port), "the port still accepts connections after harness ui exited"
    deadline = time.monotonic() + 5
    while left := {server for server in ui.servers if running(server)}:
        if time.monotonic() > deadline:
            commands = [describe(server) for server in left]
            pytest.fail(f"harness ui exited, leaving these running: {commands}\n{ui.output()}")
        time.sleep(0.2)


# --- MLflow's REST API, as the UI calls it ----------------------------------------------


def search_runs(ui: UI, experiment_id: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    body: dict[str, Any] = {"experiment_ids": [experiment_id], "max_results": 1000}
    for _ in range(20):  # pages of 1000: far more than a test study has
        page = ui.post("/api/2.0/mlflow/runs/search", body)
        runs.extend(page.get("runs", []))
        if not page.get("next_page_token"):
            return runs
        body["page_token"] = page["next_page_token"]
    pytest.fail("runs/search kept returning pages")


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metric_history(ui: UI, run_id: str, key: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 25000})
    return list(ui.get(f"/api/2.0/mlflow/metrics/get-history?{query}").get("metrics", []))


def optuna_study(runs: Path) -> Any:
    """The study as Optuna recorded it (the journal file beside the MLflow store)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(runs / "optuna" / f"{STUDY}.log")))
    return optuna.load_study(study_name=STUDY, storage=storage)


def study_runs(ui: UI) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """The experiment id, the study's parent run and its trial runs (by name), through the
    REST API; asserts the nesting: one top-level run, every other run its child."""
    experiment = ui.get(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={STUDY}")
    experiment = experiment["experiment"]
    assert experiment["lifecycle_stage"] == "active"
    found = search_runs(ui, experiment["experiment_id"])
    parents = [r for r in found if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1, [r["info"]["run_name"] for r in parents]
    parent = parents[0]
    children = sorted(
        (r for r in found if r is not parent), key=lambda r: str(r["info"]["run_name"])
    )
    assert len(children) == N_TRIALS
    assert {tags(r)["mlflow.parentRunId"] for r in children} == {parent["info"]["run_id"]}
    return str(experiment["experiment_id"]), parent, children


# --- the tests --------------------------------------------------------------------------


@pytest.mark.slow  # harness ui, mlflow server and its workers
def test_ui_serves_the_study_nested_and_sigint_stops_it(finished_sweep, tmp_path):
    trials = optuna_study(finished_sweep).trials
    with harness_ui(finished_sweep, tmp_path, health="/health") as ui:
        assert f"open {ui.url}" in ui.output()

        _, parent, children = study_runs(ui)
        assert parent["info"]["run_name"] == STUDY
        assert parent["info"]["status"] == "FINISHED"
        assert tags(parent).get("harness.role") == "study"

        assert [r["info"]["run_name"] for r in children] == [
            f"trial-{n:04d}" for n in range(N_TRIALS)
        ]
        assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
        # a pruned trial's run ends FINISHED too (KILLED gets FAILED's red cross in the table)
        assert {r["info"]["status"] for r in children} == {"FINISHED"}
        assert [tags(r)["optuna.trial_state"] for r in children] == [t.state.name for t in trials]
        param_keys = [{p["key"] for p in r["data"].get("params", [])} for r in children]
        assert param_keys[0] and all(keys == param_keys[0] for keys in param_keys)

        for run, trial in zip(children, trials, strict=True):
            run_id = run["info"]["run_id"]
            history = metric_history(ui, run_id, "eval/f1")
            steps = [m["step"] for m in history]
            # one point per evaluation: Optuna got the same values, one per report
            assert len(history) == len(trial.intermediate_values) >= 1, run["info"]["run_name"]
            assert steps == sorted(set(steps)), steps
            expected = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
            assert [m["value"] for m in history] == pytest.approx(expected)
            if trial.state.name == "COMPLETE":
                assert trial.user_attrs["mlflow_run_id"] == run_id
            # every trial has its objective: a pruned one, the last value Optuna judged it by
            objective = metric_history(ui, run_id, "objective")
            assert [m["value"] for m in objective] == pytest.approx([trial.value])

        assert_stopped_cleanly(ui, ui.interrupt())  # `kill -INT PID`


@pytest.mark.slow  # harness ui and optuna-dashboard processes
def test_ui_optuna_serves_the_dashboard_and_ctrl_c_stops_it(finished_sweep, tmp_path):
    recorded = optuna_study(finished_sweep)
    trials = recorded.trials
    with harness_ui(finished_sweep, tmp_path, "--optuna", health="/api/meta") as ui:
        assert f"open {ui.url}" in ui.output()

        summaries = ui.get("/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == [STUDY]
        assert summaries[0]["directions"] == [d.name.lower() for d in recorded.directions]
        study = ui.get(f"/api/studies/{summaries[0]['study_id']}?after=0")
        assert [t["number"] for t in study["trials"]] == [t.number for t in trials]
        states = {"COMPLETE": "Complete", "PRUNED": "Pruned"}
        assert [t["state"] for t in study["trials"]] == [states[t.state.name] for t in trials]

        assert_stopped_cleanly(ui, ui.interrupt(terminal=True))  # Ctrl-C


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), r"no MLflow store at .*mlflow\.db: run `harness sweep` first"),
        (("--optuna",), rf"no Optuna journal at .*{STUDY}\.log: run `harness sweep study="),
        (("--port", "http"), "--port takes a number"),
        (("--port", "70000"), "not a TCP port"),
        (("--port=70000",), "not a TCP port"),  # the = spelling is the same flag
    ],
    ids=["no-mlflow-store", "no-optuna-journal", "bad-port", "port-out-of-range", "port-equals"],
)
def test_ui_without_a_store_or_with_a_bad_port_is_a_clear_error(tmp_path, flags, message):
    import re

    empty = tmp_path / "runs"
    done = run_cli("ui", *flags, f"paths.runs_dir={empty}", timeout=120, env=ui_env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert not (empty / "mlflow.db").exists()  # no empty store made on the way


def test_ui_refuses_a_port_in_use(finished_sweep):
    """Something else listens on the port: harness says so instead of printing the URL of
    another program (which might even answer the health check)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("ui", "--port", str(port), f"paths.runs_dir={finished_sweep}", env=ui_env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr
    assert "open http" not in done.stdout


def test_ui_with_a_tracking_server_starts_nothing(tmp_path):
    """tracking.uri is a server already: its URL is the UI; nothing to start or stop."""
    done = run_cli(
        "ui", "tracking.uri=http://127.0.0.1:5999", f"paths.runs_dir={tmp_path}", env=ui_env()
    )
    assert done.returncode == 0, done.stderr
    assert "tracking.uri is a server already: open http://127.0.0.1:5999" in done.stdout


WORKER = "import time; time.sleep(120)"  # a worker its server does not stop


@pytest.mark.parametrize("server_ignores_sigterm", [False, True], ids=["exits", "ignores"])
def test_stop_leaves_no_worker_behind(server_ignores_sigterm):
    """harness.ui.stop on a server (started as `serve` starts it, in a process group of its
    own) that does not stop its worker: it exits on SIGTERM, orphaning the worker, or ignores
    SIGTERM. Either way stop() returns in bounded time and leaves nothing running."""
    from harness.ui import stop

    server_code = (
        "import signal, subprocess, sys, time\n"
        f"if {server_ignores_sigterm}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"subprocess.Popen([sys.executable, '-c', {WORKER!r}])\n"
        "time.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", server_code], process_group=0)
    workers: set[psutil.Process] = set()
    try:

        def worker_started() -> bool:
            workers.update(descendants(server.pid))
            return bool(workers)

        wait_for(worker_started, 30, "the server starts its worker")
        started = time.monotonic()
        stop(server, timeout_s=2)
        assert time.monotonic() - started < 10
        assert server.returncode == (-signal.SIGKILL if server_ignores_sigterm else -signal.SIGTERM)
        wait_for(lambda: not any(running(w) for w in workers), 5, "the worker is gone")
    finally:
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


# --- the MLflow UI itself, in a real browser ---------------------------------------------

RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'  # ag-grid's cell of the "Run Name" column


@pytest.mark.slow
def test_mlflow_ui_in_chromium_shows_the_trials_nested_under_the_study(finished_sweep, tmp_path):
    """Opens the experiment's runs table in headless Chromium: the study's run is the only
    top-level row; its expander reveals the trial rows, indented under it, and the trials have
    no expander of their own.

    MLflow 3.17 opens an experiment in its GenAI view (a traces overview): the runs table is in
    the "Model training" view, `?workflowType=machine_learning`. The table is an ag-grid: each
    row has role=row and row-id=<run id>; the "Run Name" cell (col-id "attributes.`Run Name`")
    holds the expander button (parent runs only) and a link to #/experiments/ID/runs/RUN_ID.
    Children are rendered as rows of their own, indented, once their parent is expanded."""
    sync_playwright, chromium = playwright_and_chromium()

    with harness_ui(finished_sweep, tmp_path, health="/health") as ui:
        experiment_id, parent, children = study_runs(ui)
        parent_id = parent["info"]["run_id"]
        child_ids = [r["info"]["run_id"] for r in children]

        def name_link(page: Any, run_id: str) -> Any:
            # rows carry the run id (ag-grid's row-id); the name cell links to the run page
            return page.locator(
                f'[role="row"][row-id="{run_id}"] {RUN_NAME_CELL} a[href$="/runs/{run_id}"]'
            )

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            try:
                page.set_default_timeout(30_000)
                page.goto(
                    f"{ui.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning",
                    timeout=60_000,
                )
                parent_link = name_link(page, parent_id)
                parent_link.wait_for(state="visible", timeout=60_000)
                assert parent_link.inner_text().strip() == STUDY
                # collapsed: the trials are not top-level rows of their own
                assert all(name_link(page, run_id).count() == 0 for run_id in child_ids)

                expander = page.locator(
                    f'[role="row"][row-id="{parent_id}"] {RUN_NAME_CELL} button'
                )
                assert expander.count() == 1, "the study's row has no expander"
                expander.click()
                for run_id in child_ids:
                    name_link(page, run_id).wait_for(state="visible")

                parent_box = parent_link.bounding_box()
                assert parent_box is not None
                for run, run_id in zip(children, child_ids, strict=True):
                    link = name_link(page, run_id)
                    assert link.inner_text().strip() == run["info"]["run_name"]
                    box = link.bounding_box()
                    assert box is not None
                    assert box["x"] > parent_box["x"] + 4, "a trial is not indented under the study"
                    assert box["y"] > parent_box["y"], "a trial is listed above the study"
                    trial_row = f'[role="row"][row-id="{run_id}"] {RUN_NAME_CELL} button'
                    assert page.locator(trial_row).count() == 0, "a trial has an expander"
                page.get_by_text(f"{N_TRIALS + 1} matching runs").wait_for(state="visible")

                shot = tmp_path / "mlflow-ui-nested-trials.png"
                page.screenshot(path=str(shot))
                if os.environ.get("HARNESS_UI_SCREENSHOT"):
                    target = Path(os.environ["HARNESS_UI_SCREENSHOT"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, target)
            except BaseException:
                with suppress(Exception):  # what the page showed, for whoever reads the failure
                    page.screenshot(path=str(tmp_path / "mlflow-ui-failure.png"), timeout=10_000)
                raise
            finally:
                browser.close()
        assert_stopped_cleanly(ui, ui.interrupt())
