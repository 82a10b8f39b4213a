"""What `harness sweep` shows: bars on a terminal, plain lines in a log, a summary if --quiet."""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import time

import pytest

from tests.helpers import cli_env, run_cli, run_in_process, start_cli

# pruner=median: it prunes none of 3 trials (no bar or line is cut short)
FAST = ("backend=fake", "tracking.log_best_model=false", "sweep.n_trials=3", "pruner=median")
# a trial's progress bar as rich draws it: "trial 3 ━━━━━╸━━━━━  55/220"
TRIAL_BAR = re.compile(r"trial \d+ [━╸╺]+ +\d+/\d+")


def test_off_a_terminal_each_trial_is_one_plain_line(tmp_path):
    done = run_in_process("sweep", *FAST, runs=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if re.match(r"trial +\d+ ", line)]
    assert len(lines) == 3 and all("objective=" in line for line in lines)
    assert not TRIAL_BAR.search(done.stdout) and "\x1b[" not in done.stdout  # a log stays plain
    assert "best 3 of 3 completed trials" in done.stdout


def test_quiet_prints_the_summary_only(tmp_path):
    done = run_in_process("sweep", *FAST, "--quiet", runs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"^trial +\d+ ", done.stdout, re.M)
    assert "optuna storage" not in done.stdout
    assert "best trial: " in done.stdout and "reproduce with:" in done.stdout


@pytest.mark.slow  # a sweep process on a pseudo-terminal, slowed for the bar to be drawn
def test_on_a_terminal_a_bar_follows_the_running_trial(tmp_path):
    """The sweep runs on a pseudo-terminal, as in a user's shell."""
    leader, follower = os.openpty()
    process = start_cli(
        "sweep",
        *FAST,
        "backend.seconds_per_epoch=0.4",  # long enough for the bar to be drawn
        runs=tmp_path,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=cli_env(COLUMNS="160", TERM="xterm"),
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the process is done
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode("utf-8", "replace"))
    # a bar per trial: "trial N", steps done of the total, the loss and the last evaluation
    assert TRIAL_BAR.search(text)
    assert re.search(r"trial 0 .*\d+/\d+ .*loss \d\.\d{4}", text)
    assert re.search(r"trials [━╸╺]+ +[0-3]/3", text)  # and the study's own
    assert re.search(r"eval/f1 \d\.\d{4}", text)
    assert len(re.findall(r"trial +\d+ +COMPLETE", text)) == 3  # the lines stay above the bars


def piped(*args: str) -> subprocess.CompletedProcess:
    """`harness ...` as CI runs it: stdout a pipe, and no COLUMNS a terminal would set."""
    return run_cli(*args, env=cli_env(COLUMNS=None, LINES=None, FORCE_COLOR=None))


def long_runs_dir(tmp_path):
    """A runs folder whose name alone takes a command past 80 columns."""
    return tmp_path / "a-runs-folder-named-so-that-each-line-naming-it-runs-past-eighty-columns"


@pytest.mark.slow  # three CLI processes; the champion's line below checks the same in the fast tier
def test_off_a_terminal_commands_and_paths_are_never_wrapped(tmp_path):
    from harness.config import load_config
    from harness.display import short
    from harness.study import best_trial, describe_storage, load_study, reproduce_command

    runs = long_runs_dir(tmp_path)
    overrides = [*FAST, f"paths.runs_dir={runs}"]
    done = piped("sweep", *overrides)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    study = load_study(load_config(overrides))
    best = best_trial(study)
    command = reproduce_command("train", best.user_attrs["overrides"], best.params)
    assert len(command) > 80
    assert lines[lines.index("reproduce with:") + 1] == command
    assert f"optuna storage: {describe_storage(load_config(overrides))}" in lines
    report = reproduce_command("report", best.user_attrs["overrides"], {})
    assert f"plots and summary.md: {report}" in lines
    for trial in study.trials:  # the table is as wide as its rows: each trial's params whole
        assert any(short(trial.params) in line for line in lines)

    # pasted back, the printed commands work: the best trial again, the report of the study
    again = piped(*shlex.split(command)[1:])
    assert again.returncode == 0, again.stderr
    assert f"objective (eval/f1) = {best.value:.8f}" in again.stdout.splitlines()
    made = piped(*shlex.split(report)[1:])
    assert made.returncode == 0, made.stderr
    folder = runs / "reports" / "sentiment_tiny"
    lines = made.stdout.splitlines()
    assert f"report of study sentiment_tiny written to {folder}" in lines
    assert f"  {folder / 'summary.md'}" in lines
    assert command in (folder / "summary.md").read_text().splitlines()  # the report's own copy


def test_off_a_terminal_the_champions_model_id_is_one_line(tmp_path, fake_openai):
    from mlflow.tracking import MlflowClient

    from harness.config import load_config
    from harness.study import Sweep, best_trial, load_study
    from harness.tracking import tracking_uri
    from tests.helpers import OPENAI_TEST_SETTINGS

    overrides = [
        "study=tickets_openai",
        f"backend.base_url={fake_openai.base_url}",
        *OPENAI_TEST_SETTINGS,
        f"paths.runs_dir={long_runs_dir(tmp_path)}",
        "train.batch_size=16",
        "train.epochs=2",
    ]
    cfg = load_config(overrides)
    Sweep(load_config([*overrides, "sweep.n_trials=1"]), overrides).run()
    done = piped("train", *overrides, "+from_best=true")
    assert done.returncode == 0, done.stderr
    best = best_trial(load_study(cfg))
    run = MlflowClient(tracking_uri(cfg)).get_run(best.user_attrs["mlflow_run_id"])
    model_id = run.data.tags["harness.hosted_model"]
    lines = done.stdout.splitlines()
    champion = f"champion: {model_id} (the fine-tuned model of trial {best.number}; no new job)"
    assert len(champion) > 80 and champion in lines
    assert f"  OpenAI().chat.completions.create(model={model_id!r}, messages=[...])" in lines


def test_a_trial_line_prints_brackets_in_its_reason_and_params_as_they_are():
    import io

    from rich.console import Console

    from harness.display import SweepDisplay
    from harness.study import TrialOutcome

    console = Console(file=io.StringIO(), width=10_000, highlight=False)
    display = SweepDisplay(console, "eval/f1", 3, done=0, quiet=False, bars=False)
    reason = "OSError: [Errno 28] No space left on device: '/runs/[x]/checkpoints'"
    display.on_trial(TrialOutcome(4, "FAIL", {"data.files": "[a.csv,b.csv]"}, None, 0.5, reason))
    line = console.file.getvalue().rstrip("\n")
    # read as markup, [a.csv,b.csv] and [x] vanished
    assert line.endswith(f"files=[a.csv,b.csv] {reason}")


@pytest.mark.slow
def test_off_a_terminal_the_best_model_and_the_local_champion_are_one_line(tmp_path):
    """The local backend logs a model: its line, and the champion's, stay whole in a log."""
    from mlflow.tracking import MlflowClient

    from harness.config import load_config
    from harness.study import load_study
    from harness.tracking import tracking_uri

    name = "a-study-named-long-enough-that-its-model-lines-pass-eighty-columns"
    overrides = [f"name={name}", f"paths.runs_dir={tmp_path}", "train.epochs=1"]
    overrides += ["train.batch_size=32", "train.max_length=32"]
    swept = piped("sweep", *overrides, "sweep.n_trials=1")
    assert swept.returncode == 0, swept.stderr
    cfg = load_config(overrides)
    model = f"best model: {load_study(cfg).user_attrs['best_model_uri']}"
    assert len(model) > 80 and model in swept.stdout.splitlines()

    done = piped("train", *overrides, "+from_best=true")
    assert done.returncode == 0, done.stderr
    version = MlflowClient(tracking_uri(cfg)).get_model_version_by_alias(name, "champion")
    champion = (
        f"champion: models:/{name}@champion (version {version.version}, run {version.run_id})"
    )
    assert champion in done.stdout.splitlines()
