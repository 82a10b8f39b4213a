"""The command line as a user meets it: a subprocess per command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import (
    reported,
    run_cli,
    start_cli,
    study_runs,
    wait_for_running,
    write,
)


def test_help_lists_the_commands_without_heavy_imports():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("sweep", "train", "best", "validate"):
        assert f"  {command}" in done.stdout
    code = (
        "import sys, harness.cli; "
        "print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        == "[]"
    )


def test_cfg_job_prints_the_composed_config_with_overrides():
    done = run_cli("sweep", "study=spam_tiny", "train.max_length=48", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "name: spam_tiny" in done.stdout and "max_length: 48" in done.stdout


def test_unknown_key_and_bad_expression_are_clear_errors(tmp_path):
    done = run_cli("sweep", "train.learnin_rate=0.1", runs=tmp_path)
    assert done.returncode == 2 and "train.learnin_rate" in done.stderr
    done = run_cli("sweep", "backend=fake", "train.dropout=interval(0.3)", runs=tmp_path)
    assert done.returncode == 2
    assert "train.dropout" in done.stderr and "interval(0.3)" in done.stderr
    assert "Traceback" not in done.stderr


def test_sweep_then_best_then_train_with_the_fake_backend(tmp_path):
    done = run_cli("sweep", "backend=fake", "sweep.n_trials=5", runs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "best trial" in done.stdout and "reproduce with:" in done.stdout
    assert done.stdout.count("trial ") >= 5
    best = run_cli("best", "backend=fake", runs=tmp_path)
    assert best.returncode == 0, best.stderr
    command = best.stdout.split("reproduce with:")[1].strip().splitlines()[0]
    assert command.startswith("harness train backend=fake")
    args = command.split()[2:]
    train = run_cli("train", *args, runs=tmp_path)
    assert train.returncode == 0, train.stderr
    objective = float(train.stdout.split("objective (eval/f1) = ")[1].split()[0])
    assert f"(eval/f1 = {objective:.4f})" in best.stdout


def test_best_without_a_study_says_what_to_run(tmp_path):
    done = run_cli("best", "study=spam_tiny", runs=tmp_path)
    assert done.returncode == 2 and "harness sweep study=spam_tiny" in done.stderr


def test_validate_describes_a_dataset_and_reports_bad_lines(tmp_path):
    done = run_cli("validate", "data=spam", runs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "rows: train" in done.stdout
        and "ham" in done.stdout
        and "tokens per example" in done.stdout
    )
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine", "label": "a"}\n{"text": oops}\n')
    done = run_cli("validate", str(bad), runs=tmp_path)
    assert done.returncode == 2 and f"{bad}:2: malformed JSON" in done.stderr


@pytest.mark.slow
def test_default_sweep_runs_offline_end_to_end(tmp_path):
    done = run_cli("sweep", "sweep.n_trials=3", runs=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "best trial" in done.stdout and (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "optuna" / "sentiment_tiny.log").exists()


def test_ctrl_c_stops_the_trial_closes_its_runs_and_exits(runs):
    """SIGINT mid-trial: the trial is recorded as failed, its run FAILED, the parent KILLED,
    and the process exits with 130 and a hint to resume."""
    import signal

    import optuna

    from harness.config import load_config
    from harness.storage import storage_for

    overrides = ["backend=fake", "backend.seconds_per_epoch=1", "sweep.n_trials=3"]
    cfg = load_config([*overrides, f"paths.runs_dir={runs}"])
    process = start_cli("sweep", *overrides, runs=runs)
    wait_for_running(cfg.name, storage_for(cfg), reported, "a trial has reported")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "run the same command again to resume" in output
    study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg))
    assert study.trials[-1].state.name == "FAIL"
    statuses = study_runs(cfg).statuses
    assert statuses[f"trial-{study.trials[-1].number:04d}"] == "FAILED"
    assert statuses[cfg.name] == "KILLED"
    assert "RUNNING" not in statuses.values()


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
    import signal

    from harness import cli
    from tests.helpers import MLFLOW_CLIENT_ENV

    for name in MLFLOW_CLIENT_ENV:  # the first interrupt hurries MLflow's requests: undone after
        monkeypatch.delenv(name, raising=False)
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    previous = signal.getsignal(signal.SIGINT)
    try:
        cli._exit_on_second_interrupt()
        handler = signal.getsignal(signal.SIGINT)
        first = None
        try:
            handler(signal.SIGINT, None)  # the first: a KeyboardInterrupt to clean up with
        except KeyboardInterrupt as exc:
            first = exc
        assert isinstance(first, KeyboardInterrupt) and exits == []
        handler(signal.SIGINT, None)  # the second, during the cleanup: exit now
        assert exits == [130]
    finally:
        signal.signal(signal.SIGINT, previous)
