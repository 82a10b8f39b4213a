"""What harness adds to each trial: Optuna storage, MLflow runs, config copies, bookkeeping.

    python benchmarks/overhead.py [--trials 200] [--repeats 3] [overrides...]

Runs one study of the fake backend (instant, deterministic) both ways in this process, taking
turns ``--repeats`` times: through harness (journal-file Optuna storage and an SQLite MLflow
store under a fresh runs folder, as `harness sweep backend=fake` does), and as a bare Optuna loop
(in-memory storage, no tracking) calling the same fake objective with the same sampler, pruner
and search space. Taking turns and the median of each side keep a machine shared with other
work from favouring one side. Prints the added time per trial in ms and as a share of a
2-second trial. Goal: under 25 ms per trial with the default stores.

A third side splits what is added: the same sweep with the in-memory tracker (the fast tests'
harness.tracking.InMemoryStore) in place of MLflow, so the journal storage, config copies,
reporter and bookkeeping are timed without MLflow's SQLite store, and the difference is what
the store's requests cost (create the run, its dataset inputs, params, final metrics, end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
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
from harness.mlflow_store import ensure_store
from harness.pruning import make_pruner
from harness.study import Sweep
from harness.tracking import InMemoryStore, MLflowTracker, TrackerFactory, tracking_uri


class PruningReporter:
    """The bare loop's reporter: the objective metric to Optuna, nothing recorded."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric, self.evaluations = trial, metric, 0

    def set_total_steps(self, total: int) -> None:
        pass

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.metric in metrics:
            self.evaluations += 1
            self.trial.report(metrics[self.metric], self.evaluations)
            if self.trial.should_prune():
                raise optuna.TrialPruned()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass


def bare_loop(cfg: Any, n_trials: int) -> float:
    distributions = search.to_distributions(dict(cfg.search.space))
    backend = FakeBackend(seconds_per_epoch=cfg.backend.seconds_per_epoch)  # backend=fake
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    study = optuna.create_study(
        direction=cfg.sweep.direction,
        sampler=search.make_sampler(
            cfg.sampler.name, cfg.seed, cfg.sampler.n_startup_trials, distributions
        ),
        pruner=make_pruner(cfg.pruner),
    )

    def objective(trial: optuna.Trial) -> float:
        params = search.suggest(trial, distributions)
        spec = TrialSpec(
            trial.number,
            with_params(cfg, params),
            prepared,
            Path("."),
            False,
            metric=str(cfg.sweep.metric),
            direction=str(cfg.sweep.direction),
        )
        result = backend.run(spec, PruningReporter(trial, cfg.sweep.metric))
        return result.metrics[cfg.sweep.metric]

    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    return time.perf_counter() - start


def harness_sweep(
    overrides: list[str], runs: Path, tracker_factory: TrackerFactory = MLflowTracker
) -> float:
    """One `harness sweep` in this process, its runs in MLflow's store or ``tracker_factory``'s.
    The MLflow store is built before the clock starts (a first-use cost, ~1 s)."""
    cfg = load_config([*overrides, f"paths.runs_dir={runs}"])
    uri = tracking_uri(cfg)
    if tracker_factory is MLflowTracker and uri.startswith("sqlite:///"):
        ensure_store(Path(uri.removeprefix("sqlite:///")))
    sweep = Sweep(cfg, overrides, tracker_factory=tracker_factory)
    start = time.perf_counter()
    sweep.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, in turns")
    args, extra = parser.parse_known_args()
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = ["backend=fake", f"sweep.n_trials={args.trials}", *extra]
    cfg = load_config(overrides)
    bare: list[float] = []
    full: list[float] = []
    no_mlflow: list[float] = []
    memory = InMemoryStore()  # one for every run, as MLflow's one store below
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: imports and first-use costs belong to neither side. Each measured study has
        # a runs folder (and MLflow store) of its own, as a `harness sweep` process meets it:
        # one that has not opened the store yet (MLflowTracker's writer process is forked then)
        harness_sweep([*overrides[:1], "sweep.n_trials=2", "name=warmup"], Path(tmp) / "warmup")
        for repeat in range(args.repeats):
            runs = Path(tmp) / f"runs-{repeat}"
            bare.append(bare_loop(cfg, args.trials))
            full.append(harness_sweep([*overrides, f"name=overhead-{repeat}"], runs))
            no_mlflow.append(
                harness_sweep([*overrides, f"name=memory-{repeat}"], runs, memory.tracker)
            )
    bare_s, full_s = statistics.median(bare), statistics.median(full)
    no_mlflow_s = statistics.median(no_mlflow)
    added_ms = (full_s - bare_s) / args.trials * 1000
    print(
        f"{args.trials} trials of the fake backend ({cfg.sampler.name}, {cfg.pruner.name}), "
        f"median of {args.repeats} runs each"
    )
    for label, times in (
        ("bare Optuna loop (in-memory, no tracking)", bare),
        ("harness (journal storage + MLflow SQLite)", full),
        ("harness, in-memory tracker (no MLflow)", no_mlflow),
    ):
        seconds = statistics.median(times)
        each = " ".join(f"{s / args.trials * 1000:.1f}" for s in times)
        print(
            f"  {label + ':':43s} {seconds:7.2f} s  {seconds / args.trials * 1000:6.1f} ms/trial  "
            f"(runs: {each})"
        )
    print(
        f"  added by harness: {added_ms:.1f} ms per trial = {added_ms / 2000:.2%} of a 2-second "
        f"trial (goal: under 25 ms); harness/bare = {full_s / bare_s:.1f}x"
    )
    own_ms = (no_mlflow_s - bare_s) / args.trials * 1000
    print(
        f"    of which harness's own bookkeeping (journal storage, config copies, reporter): "
        f"{own_ms:.1f} ms; MLflow's SQLite store: {added_ms - own_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
