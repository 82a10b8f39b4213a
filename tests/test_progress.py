"""What `harness sweep` shows: bars on a terminal, plain lines in a log, a summary if --quiet."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

from tests.test_cli import harness

FAST = ("backend=fake", "tracking.log_best_model=false", "sweep.n_trials=3")
# a trial's progress bar as rich draws it: "trial 3 ━━━━━╸━━━━━  55/220"
TRIAL_BAR = re.compile(r"trial \d+ [━╸╺]+ +\d+/\d+")


def test_off_a_terminal_each_trial_is_one_plain_line(tmp_path):
    done = harness("sweep", *FAST, runs=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if re.match(r"trial +\d+ ", line)]
    assert len(lines) == 3 and all("objective=" in line for line in lines)
    assert not TRIAL_BAR.search(done.stdout) and "\x1b[" not in done.stdout  # a log stays plain
    assert "best 3 of 3 completed trials" in done.stdout


def test_quiet_prints_the_summary_only(tmp_path):
    done = harness("sweep", *FAST, "--quiet", runs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"^trial +\d+ ", done.stdout, re.M)
    assert "optuna storage" not in done.stdout
    assert "best trial: " in done.stdout and "reproduce with:" in done.stdout


def test_on_a_terminal_a_bar_follows_the_running_trial(tmp_path):
    """The sweep runs on a pseudo-terminal, as in a user's shell."""
    leader, follower = os.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "sweep",
            *FAST,
            "backend.seconds_per_epoch=0.4",  # long enough for the bar to be drawn
            f"paths.runs_dir={tmp_path}",
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
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
