"""Trials per second with 1, 2 and 4 workers sharing one study on PostgreSQL.

    python benchmarks/scale.py [--trials 60] [--seconds-per-epoch 0.05] [--workers 1 2 4]
                               [--storage postgresql://postgres@127.0.0.1:5432/test]

For each N, starts N `harness sweep` processes (as N hosts would: one command each, its own
HARNESS_WORKER_INDEX) on a fresh study in the PostgreSQL storage, all recording to one MLflow
SQLite store, with the fake backend sleeping a little per epoch so trials take time as real ones
do. Prints wall time, trials per second, the speed-up over one worker, and whether any trial was
lost (fewer finished than asked, or a trial without its MLflow run) or duplicated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def run(workers: int, trials: int, seconds_per_epoch: float, storage: str, runs: Path):
    name = f"scale_{workers}w_{uuid.uuid4().hex[:6]}"
    overrides = [
        "backend=fake",
        f"backend.seconds_per_epoch={seconds_per_epoch}",
        f"name={name}",
        f"sweep.n_trials={trials}",
        "pruner=none",
        f"storage.url={storage}",
        f"paths.runs_dir={runs}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    # the study and the MLflow store exist before the workers start, as a tracking server's
    # would: processes that each create a new SQLite store at once race on its schema
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    runs.mkdir(parents=True, exist_ok=True)
    MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").search_experiments()
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "sweep", *overrides],
            env={**env, "HARNESS_WORKER_INDEX": str(index)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for index in range(workers)
    ]
    errors = [p.communicate(timeout=3600)[1].decode() for p in processes]
    seconds = time.perf_counter() - start
    failed = [e for p, e in zip(processes, errors, strict=True) if p.returncode != 0]
    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    children = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=5000)
        if r.data.tags.get("harness.role") == "trial" and r.info.status == "FINISHED"
    ]
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in children]
    lost = len(finished) < trials or set(numbers) != {t.number for t in finished}
    duplicated = len(numbers) != len(set(numbers))
    optuna.delete_study(study_name=name, storage=storage)
    return seconds, len(finished), lost, duplicated, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seconds-per-epoch", type=float, default=0.05)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(
        f"{args.trials} trials of the fake backend ({args.seconds_per_epoch} s per epoch), "
        f"PostgreSQL storage, {os.cpu_count()} CPUs"
    )
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            seconds, finished, lost, duplicated, failed = run(
                workers, args.trials, args.seconds_per_epoch, args.storage, Path(tmp) / str(workers)
            )
            rate = finished / seconds
            baseline = baseline or rate
            print(
                f"  {workers} worker(s): {seconds:6.1f} s  {rate:5.2f} trials/s  "
                f"x{rate / baseline:4.2f}  finished {finished}  lost: {'YES' if lost else 'no'}  "
                f"duplicated: {'YES' if duplicated else 'no'}"
                + (f"  {len(failed)} worker(s) failed: {failed[0][-300:]}" if failed else "")
            )


if __name__ == "__main__":
    main()
