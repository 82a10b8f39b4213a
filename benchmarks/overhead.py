"""What harness adds to each trial: Optuna storage, MLflow runs, config copies, bookkeeping.

    python benchmarks/overhead.py [--trials 200] [overrides...]

Runs one study of the fake backend (instant, deterministic) twice in this process: through
harness (journal-file Optuna storage and an SQLite MLflow store under a fresh runs folder, as
`harness sweep backend=fake` does), and as a bare Optuna loop (in-memory storage, no tracking)
calling the same fake objective with the same sampler, pruner and search space. Prints the
added time per trial in ms and as a share of a 2-second trial. Goal: under 50 ms per trial with
the default stores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna

from harness import search
from harness.backends.base import TrialSpec
from harness.backends.fake import FakeBackend
from harness.cli import _quiet_libraries
from harness.config import load_config, with_params
from harness.data import load_dataset
from harness.study import Sweep


class PruningReporter:
    """The bare loop's reporter: the objective metric to Optuna, nothing recorded."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric, self.evaluations = trial, metric, 0

    def set_total_steps(self, total: int) -> None:
        pass

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric in metrics:
            self.evaluations += 1
            self.trial.report(metrics[self.metric], self.evaluations)
            if self.trial.should_prune():
                raise optuna.TrialPruned()

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def bare_loop(cfg: Any, n_trials: int) -> float:
    distributions = search.to_distributions(dict(cfg.search.space))
    backend = FakeBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    study = optuna.create_study(
        direction=cfg.sweep.direction,
        sampler=search.make_sampler(
            cfg.sampler.name, cfg.seed, cfg.sampler.n_startup_trials, distributions
        ),
        pruner=search.pruner_from(cfg.pruner),
    )

    def objective(trial: optuna.Trial) -> float:
        params = search.suggest(trial, distributions)
        spec = TrialSpec(trial.number, with_params(cfg, params), prepared, Path("."), False)
        result = backend.run(spec, PruningReporter(trial, cfg.sweep.metric))
        return result.metrics[cfg.sweep.metric]

    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    return time.perf_counter() - start


def harness_sweep(overrides: list[str], runs: Path) -> float:
    cfg = load_config([*overrides, f"paths.runs_dir={runs}"])
    sweep = Sweep(cfg, overrides)
    start = time.perf_counter()
    sweep.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    args, extra = parser.parse_known_args()
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = ["backend=fake", f"sweep.n_trials={args.trials}", *extra]
    cfg = load_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: imports and first-use costs (MLflow's schema) belong to neither side
        harness_sweep([*overrides[:1], "sweep.n_trials=2", "name=warmup"], Path(tmp) / "warm")
        bare = bare_loop(cfg, args.trials)
        full = harness_sweep(overrides, Path(tmp) / "runs")
    added_ms = (full - bare) / args.trials * 1000
    print(f"{args.trials} trials of the fake backend ({cfg.sampler.name}, {cfg.pruner.name})")
    for label, seconds in (
        ("bare Optuna loop (in-memory, no tracking)", bare),
        ("harness (journal storage + MLflow SQLite)", full),
    ):
        print(f"  {label}: {seconds:7.2f} s  {seconds / args.trials * 1000:6.1f} ms/trial")
    print(
        f"  added by harness: {added_ms:.1f} ms per trial = {added_ms / 2000:.2%} of a 2-second "
        "trial (goal: under 50 ms)"
    )


if __name__ == "__main__":
    main()
