"""A LoRA sweep on real data: wall time and peak memory of one `harness sweep`, and the best
trial's test scores beside published reference scores.

    python benchmarks/lora_sweep.py                      # 6 trials, SST-2 sample, tiny Llama + LoRA
    python benchmarks/lora_sweep.py --trials 2 --json train.max_steps=20   # overrides win
    python benchmarks/lora_sweep.py --setup "model=tiny_gpt2" --trials 2   # without LoRA

Runs `python -m harness.cli sweep` as a child process in a fresh temporary folder (paths.runs_dir
there: the Optuna journal, the MLflow SQLite store and the caches), on --data:
- sst2 (default): the explicit files of ../shared/data/real/sst2/ (2,000 training phrases,
  500 validation phrases, the 872 sentences of GLUE SST-2's dev set as the test split; labels
  negative/positive; see that folder's README), or --sst2-dir;
- study: the study's own data (the default study's studies/data/sentiment.jsonl), for machines
  without ../shared (benchmarks/gpu_check.sh).
The model and search come from --setup (default: model=tiny_llama adapter=lora
search=lora_classification: the tiny random Llama-style model with LoRA adapters and the LoRA
search space); any further arguments are Hydra overrides appended last (they win).

Measured:
- wall time: from starting the child to its exit (imports, data loading and tokenizer training,
  every trial, the best model's logging).
- peak RSS of the process tree: the sum of the resident set sizes of the child and all its
  descendants (sweep.devices or sweep.n_workers start workers), sampled every 0.2 s with psutil
  (pages shared between processes count once per process; a spike shorter than 0.2 s can be
  missed), and the largest single process's own peak, exact (getrusage(RUSAGE_CHILDREN)
  .ru_maxrss: the kernel's high-water mark of each waited-for descendant).
- the best trial (by the study's objective, validation macro-F1 by default): its test accuracy
  and macro-F1, read from the study's storage (the trial's recorded metrics).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import TreeRSS, children_max_rss

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "real" / "sst2"
DEFAULT_SETUP = "model=tiny_llama adapter=lora search=lora_classification"
# ../shared/data/real/README.md, measured on exactly these splits (test accuracy, macro-F1)
REFERENCES = {
    "TF-IDF (1-2 grams) + logistic regression": (0.7305, 0.7286),
    "tiny GPT-2 from scratch, 6-trial sweep": (0.6651, 0.6642),
}


def data_overrides(kind: str, sst2: Path) -> list[str]:
    if kind == "study":
        return []
    files = {
        "train": sst2 / "sample_2000.jsonl",
        "validation": sst2 / "validation_500.jsonl",
        "test": sst2 / "test.jsonl",
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        sys.exit(f"--data sst2: missing {', '.join(missing)} (pass --sst2-dir or --data study)")
    return [
        "data.name=sst2_sample",
        "data.path=null",
        *(f"data.{split}={path}" for split, path in files.items()),
    ]


def run_sweep(overrides: list[str], log: Path) -> dict[str, Any]:
    """The sweep as a child process: its exit code, wall time and peak memory."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this checkout's harness
    command = [sys.executable, "-m", "harness.cli", "sweep", *overrides]
    with log.open("w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeRSS(child.pid, interval=0.2) as tree:
            code = child.wait()
        wall = time.perf_counter() - started
    return {
        "returncode": code,
        "wall_s": wall,
        "peak_tree_rss_bytes": tree.peak,
        "max_process_rss_bytes": children_max_rss(),
        "command": shlex.join(command),
    }


def best_trial(overrides: list[str]) -> dict[str, Any]:
    """The study's trial counts and its best trial's params and recorded metrics."""
    from harness.config import load_config
    from harness.study.queries import best_trial as best_of
    from harness.study.queries import load_study

    study = load_study(load_config(overrides))
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = {state: states.count(state) for state in sorted(set(states))}
    best = best_of(study)
    if best is None:
        return {"trials": counts, "best": None}
    metrics = best.user_attrs.get("metrics", {})
    return {
        "trials": counts,
        "best": {"number": best.number, "value": best.values[0], "params": best.params},
        "test_accuracy": metrics.get("test/accuracy"),
        "test_f1": metrics.get("test/f1"),
    }


def main() -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's harness, as the child's
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="sweep.n_trials")
    parser.add_argument("--data", choices=["sst2", "study"], default="sst2")
    parser.add_argument("--sst2-dir", type=Path, default=SST2)
    parser.add_argument("--setup", default=DEFAULT_SETUP, help="model/adapter/search overrides")
    parser.add_argument("--json", action="store_true", help="also print one JSON result line")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, appended last")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as runs:
        overrides = [
            f"name=lora_sweep_{args.data}",
            f"sweep.n_trials={args.trials}",
            f"paths.runs_dir={runs}",
            *shlex.split(args.setup),
            *data_overrides(args.data, args.sst2_dir),
            *args.overrides,
        ]
        log = Path(runs) / "sweep.log"
        print(f"harness sweep {shlex.join(overrides)}", flush=True)
        measured = run_sweep(overrides, log)
        if measured["returncode"] != 0:
            sys.exit(f"the sweep failed ({measured['returncode']}):\n{log.read_text()[-4000:]}")
        outcome = best_trial(overrides)

    mib = 2**20
    print(f"trials: {outcome['trials']}")
    print(
        f"wall time {measured['wall_s']:.1f}s; peak RSS of the process tree "
        f"{measured['peak_tree_rss_bytes'] / mib:.0f} MiB (sum, sampled every 0.2 s), largest "
        f"single process {measured['max_process_rss_bytes'] / mib:.0f} MiB (ru_maxrss)"
    )
    best = outcome["best"]
    if best is None:
        print("no trial completed")
    else:
        print(
            f"best trial {best['number']}: objective {best['value']:.4f}, params {best['params']}"
        )
        rows = {"this sweep, best trial": (outcome["test_accuracy"], outcome["test_f1"])}
        rows |= REFERENCES if args.data == "sst2" else {}
        print(f"  {'test split':<44} {'accuracy':>8} {'macro-F1':>8}")
        for name, (accuracy, f1) in rows.items():
            print(f"  {name:<44} {accuracy:8.4f} {f1:8.4f}")
    if args.json:
        result = {"data": args.data, "setup": args.setup, "overrides": args.overrides}
        result |= {"references": REFERENCES if args.data == "sst2" else {}}
        print(json.dumps(result | measured | outcome))


if __name__ == "__main__":
    main()
