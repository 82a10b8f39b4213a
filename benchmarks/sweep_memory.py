"""Wall time and resident memory of the default sweep, measured in-process.

    python benchmarks/sweep_memory.py [overrides...]

Runs `harness sweep` (the default study unless overrides say otherwise) in a fresh runs folder
and prints the process's resident set size after every trial, then the wall time and the growth
between trial 3 and the last trial. Goal: a long sweep does not grow (within 10%), because each
trial's model, optimizer and batches are released when it ends.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil

from harness.cli import _quiet_libraries
from harness.config import load_config
from harness.study import Sweep, TrialOutcome


def main() -> None:
    _quiet_libraries()
    process = psutil.Process()
    rss: list[float] = []

    def on_trial(outcome: TrialOutcome) -> None:
        rss.append(process.memory_info().rss / 2**20)
        print(
            f"trial {outcome.number:3d} {outcome.state:8s} {outcome.seconds:6.1f}s  "
            f"rss {rss[-1]:7.1f} MiB",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as runs:
        overrides = [*sys.argv[1:], f"paths.runs_dir={runs}"]
        started = time.perf_counter()
        Sweep(load_config(overrides), overrides, on_trial).run()
        wall = time.perf_counter() - started
    print(f"\nwall time {wall:.1f}s for {len(rss)} trials (incl. data, tokenizer, model logging)")
    if len(rss) >= 3:
        growth = rss[-1] / rss[2] - 1
        print(
            f"rss after trial 3: {rss[2]:.1f} MiB; after trial {len(rss)}: {rss[-1]:.1f} MiB; "
            f"growth {growth:+.1%} (goal: within 10%)"
        )


if __name__ == "__main__":
    main()
