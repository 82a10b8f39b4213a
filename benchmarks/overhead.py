"""What harness adds to each trial: Optuna storage, MLflow runs, config copies, bookkeeping.

    python benchmarks/overhead.py [--trials 200] [--repeats 3] [overrides...]

Runs one study of the fake backend (instant, deterministic) both ways in this process, taking
turns ``--repeats`` times: through harness (journal-file Optuna storage and an SQLite MLflow
store under a fresh runs folder, as `harness sweep backend=fake` does), and as a bare Optuna loop
(in-memory storage, no tracking) calling the same fake objective with the same sampler, pruner
and search space. Taking turns and the median of each side keep a machine shared with other
work from favouring one side. Prints the added time per trial in ms and as a share of a
2-second trial. Goal: under 25 ms per trial with the default stores.

Two more sides split what is added. The same sweep with the in-memory tracker (the fast tests'
harness.tracking.InMemoryStore) in place of MLflow times the journal storage, config copies,
reporter and bookkeeping without MLflow's SQLite store; the difference is what the store's
requests cost (create the run, its dataset inputs, params, final metrics, end). And the same
sweep with every MLflow request made in the sweep's process (``defer_writes=False``: no writer
process, as before harness.tracking.mlflow_writer) shows what the writer takes off the trials'
path. CPU time (this process and the writer it forks) is printed beside the wall time: the
writer's requests still cost CPU, on another core.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
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


def bare_loop(cfg: Any, n_trials: int) -> tuple[float, float]:
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

    start, cpu = time.perf_counter(), cpu_seconds()
    study.optimize(objective, n_trials=n_trials)
    return time.perf_counter() - start, cpu_seconds() - cpu


def cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the writer process)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def harness_sweep(
    overrides: list[str], runs: Path, tracker_factory: TrackerFactory = MLflowTracker
) -> tuple[float, float]:
    """One `harness sweep` in this process, its runs in MLflow's store or ``tracker_factory``'s:
    (wall, CPU) seconds. The MLflow store is built before the clock starts (a first-use cost,
    ~1 s)."""
    cfg = load_config([*overrides, f"paths.runs_dir={runs}"])
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        ensure_store(Path(uri.removeprefix("sqlite:///")))
    sweep = Sweep(cfg, overrides, tracker_factory=tracker_factory)
    start, cpu = time.perf_counter(), cpu_seconds()
    sweep.run()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, in turns")
    args, extra = parser.parse_known_args()
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = ["backend=fake", f"sweep.n_trials={args.trials}", *extra]
    cfg = load_config(overrides)
    sides: dict[str, list[tuple[float, float]]] = {label: [] for label in LABELS.values()}
    memory = InMemoryStore()  # one for every run, as MLflow's one store below
    in_process = functools.partial(MLflowTracker, defer_writes=False)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: imports and first-use costs belong to neither side. Each measured study has
        # a runs folder (and MLflow store) of its own, as a `harness sweep` process meets it:
        # one that has not opened the store yet (MLflowTracker's writer process is forked then)
        harness_sweep([*overrides[:1], "sweep.n_trials=2", "name=warmup"], Path(tmp) / "warmup")
        for repeat in range(args.repeats):
            folder = Path(tmp) / f"runs-{repeat}"
            sides[LABELS["bare"]].append(bare_loop(cfg, args.trials))
            sides[LABELS["full"]].append(
                harness_sweep([*overrides, f"name=overhead-{repeat}"], folder)
            )
            sides[LABELS["in_process"]].append(
                harness_sweep([*overrides, f"name=in-process-{repeat}"], folder / "b", in_process)
            )
            sides[LABELS["memory"]].append(
                harness_sweep([*overrides, f"name=memory-{repeat}"], folder, memory.tracker)
            )
    print(
        f"{args.trials} trials of the fake backend ({cfg.sampler.name}, {cfg.pruner.name}), "
        f"median of {args.repeats} runs each; wall and CPU (this process and the MLflow writer "
        "process it forks) per trial"
    )
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for key, label in LABELS.items():
        runs = sides[label]
        wall[key] = statistics.median(w for w, _ in runs) / args.trials * 1000
        cpu[key] = statistics.median(c for _, c in runs) / args.trials * 1000
        each = " ".join(f"{w / args.trials * 1000:.1f}" for w, _ in runs)
        print(
            f"  {label + ':':52s} {wall[key]:6.1f} ms wall  {cpu[key]:6.1f} ms CPU  "
            f"(wall of each run: {each})"
        )
    added = wall["full"] - wall["bare"]
    print(
        f"  added by harness: {added:.1f} ms per trial = {added / 2000:.2%} of a 2-second trial "
        f"(goal: under 25 ms); harness/bare = {wall['full'] / wall['bare']:.1f}x"
    )
    own = wall["memory"] - wall["bare"]
    print(
        f"    of which harness's own bookkeeping (journal storage, config copies, reporter): "
        f"{own:.1f} ms; MLflow's SQLite store: {added - own:.1f} ms"
    )
    print(
        f"  MLflow requests made in the sweep's process instead (no writer process): "
        f"{wall['in_process'] - wall['bare']:.1f} ms added; CPU added with the writer "
        f"{cpu['full'] - cpu['bare']:.1f} ms, without {cpu['in_process'] - cpu['bare']:.1f} ms"
    )


LABELS = {
    "bare": "bare Optuna loop (in-memory, no tracking)",
    "full": "harness (journal storage + MLflow SQLite)",
    "in_process": "harness, MLflow requests in the sweep's process",
    "memory": "harness, in-memory tracker (no MLflow)",
}

if __name__ == "__main__":
    main()
