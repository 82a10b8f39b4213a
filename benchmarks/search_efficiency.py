"""Search efficiency: harness's default search, random search, TPE with and without pruners, and
transformers.Trainer.hyperparameter_search at equal step budgets.

    python benchmarks/search_efficiency.py [--budget-steps 6000] [--seeds 0 1 2] [--noise 0.0]
                                           [--grid-points 4] [--quick] [overrides...]
    python benchmarks/search_efficiency.py --data sst2 --jobs 2        # real data, real training
    python benchmarks/search_efficiency.py --data banking77 --train-rows 1540 --jobs 2
    python benchmarks/search_efficiency.py --data sst2 --quick --jobs 2  # smoke run (minutes)

The default study's space (conf/search/local_classification.yaml) is searched by each method,
each (method, seed) a fresh in-memory Optuna study (no storage, no MLflow):

- default: the sampler and pruner conf/config.yaml (and the study) name, read from the loaded
  config, so it follows whatever the default becomes
- random search, no pruner; TPE without pruning; TPE + Hyperband; TPE + ASHA
  (SuccessiveHalvingPruner, conf/pruner/asha.yaml); TPE + patient (conf/pruner/patient.yaml):
  the settings conf/sampler/ and conf/pruner/ give them, built by harness.search. A method whose
  conf/pruner/ file this checkout lacks is skipped, and said so.
- trainer (the anchor users compare us with): transformers.Trainer.hyperparameter_search
  (backend="optuna") on the same data, model, space and budget; see
  search_efficiency_trainer.py for what is the same and what cannot be.
- grid (not in the default list: --methods grid): GridSampler over the space with each
  continuous key cut into --grid-points values, visited in an order shuffled by the seed

The objective (sweep.metric, eval/f1) is reported to Optuna at each evaluation, with the
evaluation's index as the step, so the pruners' resource is epochs. A method runs trials until
the training (optimizer) steps its trials took add up to --budget-steps; a pruned trial counts the
steps it took before it stopped, and the trial that crosses the budget counts in full.

Per method: the best objective (median and spread over seeds), the test score of the trial the
method chose (its best validation objective; the Trainer's: the trial its study calls best), and
the steps at which the best so far first reached 98% of the best value any method found in any
seed (one target for the whole run), per seed and the median. A seed that never reached it
counts as the budget, marked '>': a median it enters is only a lower bound, and the goal is
called UNDECIDED when such a bound could flip the answer. Goal: the default reaches the target
in at most half of random search's steps (median over seeds), on the dataset its defaults were
not chosen on (they were chosen on SST-2; BANKING77 is the held-out one).

--out DIR (default benchmarks/out/search_efficiency/<data>/) receives results.json (settings,
every trial, the statistics), trials.csv (method, seed, trial, steps, cumulative steps,
objective, test score, params), output.txt (the table as printed) and curves.png: best
validation objective so far against cumulative steps, a panel per method (median line,
interquartile and min-max bands over seeds, random search's median for reference).

--data sst2 | banking77 trains the tiny GPT-2 (backend local) on ../shared/data/real/ (see its
README); --train-rows N takes a stratified (proportional per label), seeded subsample of the
training split, written to a temporary file. --jobs N runs the (method, seed) studies in N
worker processes, each with torch.set_num_threads(1); a study's numbers do not depend on the
process it ran in, but a serial run (--jobs 1) keeps torch's default threads, whose float
rounding may differ: compare runs with the same --jobs.

Time (2 shared cores, --jobs 2, 2026-11-28): SST-2 at the default 3000 steps, 7 methods x 5
seeds, 656 s; --quick (1 seed, 300 steps) about 4 minutes. A larger --budget-steps lets TPE
act past its 5 random startup trials, at more than proportional cost (fewer trials repeat).

--backend fake (default without --data) trains nothing: FakeBackend's learning curves, whose
steps per epoch are the real ones (ceil(training rows / batch size)); 3 seeds take seconds and a
re-run prints the same numbers. Its surface is smooth, unimodal and noise-free, and every trial's
curve has the same shape (early ranking = final ranking), which favours both a model-based
sampler and pruning; --noise SD adds a fixed pseudo-random offset per (params, evaluation), as a
fixed training seed would, to see how much of the advantage survives.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import multiprocessing
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from search_efficiency_stats import Outcome, stratified_sample

from harness import search
from harness.backends.base import TrialSpec
from harness.cli import _quiet_libraries
from harness.config import CONF_DIR, load_config, with_params
from harness.continuation import holds
from harness.pruning import make_pruner
from harness.study import Plan, plan_study

DEFAULT_BUDGET = {"fake": 6000, "local": 3000}  # local: SST-2, 7 methods x 5 seeds: 11 min
QUICK_BUDGET = {"fake": 1500, "local": 300}
DEFAULT_SEEDS = {"fake": [0, 1, 2], "local": [0, 1, 2, 3, 4]}
REAL = Path("../shared/data/real")  # relative to the repository root, as the data README says
DATASETS = {  # --data: the data group's overrides
    "sst2": {
        "train": REAL / "sst2/sample_2000.jsonl",
        "validation": REAL / "sst2/validation_500.jsonl",
        "test": REAL / "sst2/test.jsonl",
    },
    "banking77": {
        "train": REAL / "banking77/train.jsonl",
        "validation": REAL / "banking77/validation.jsonl",
        "test": REAL / "banking77/test.jsonl",
    },
}
# Not part of the search, only of its cost in seconds: no trial state saved at each evaluation
BENCH_OVERRIDES = ["train.save_state=false"]


@dataclass(frozen=True)
class Method:
    key: str  # --methods names it
    sampler: str | None  # a conf/sampler/ name; None: the config's default
    pruner: str | None  # a conf/pruner/ name; None: the config's default


METHODS = {
    m.key: m
    for m in (
        Method("default", None, None),
        Method("random", "random", "none"),
        Method("tpe", "tpe", "none"),
        Method("tpe+hyperband", "tpe", "hyperband"),
        Method("tpe+asha", "tpe", "asha"),
        Method("tpe+patient", "tpe", "patient"),
        Method("trainer", "tpe", None),  # Trainer.hyperparameter_search: see the docstring
        Method("grid", "grid", "none"),
    )
}
DEFAULT_METHODS = [k for k in METHODS if k != "grid"]


def available(method: Method) -> bool:
    """A method whose pruner this checkout has no conf/pruner/ file for cannot run."""
    return method.pruner is None or (CONF_DIR / "pruner" / f"{method.pruner}.yaml").exists()


class FixedNoise:
    """A pseudo-random offset that depends only on the params and the evaluation: the same
    trial always gets the same noise, as a real run with a fixed training seed would."""

    def __init__(self, sd: float) -> None:
        self.sd = sd

    def __call__(self, params: Mapping[str, Any], evaluation: int) -> float:
        if not self.sd:
            return 0.0
        key = repr((sorted(params.items()), evaluation)).encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
        return random.Random(seed).gauss(0.0, self.sd)


class SilentReporter:
    """Takes what a backend reports (harness.backends.base.Reporter) and keeps none of it."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def set_total_steps(self, total: int) -> None:
        pass


class CountingReporter(SilentReporter):
    """Reports the objective of each evaluation to Optuna, its index as the step (a pruner's
    resource is then epochs, whatever the batch size), prunes when told, and counts the
    training steps the trial took (the last step any metric was reported at)."""

    def __init__(self, trial: optuna.Trial, metric: str, offset: Any) -> None:
        self.trial, self.metric, self.offset = trial, metric, offset
        self.steps = self.evaluations = 0

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.steps = max(self.steps, step)
        if self.metric in metrics:
            self.evaluations += 1
            value = metrics[self.metric] + self.offset(self.evaluations)
            self.trial.report(value, self.evaluations)
            if self.trial.should_prune():
                raise optuna.TrialPruned()


def grid_values(key: str, dist: BaseDistribution, points: int) -> list[Any]:
    """choice() and range() keys keep their values; a continuous interval becomes `points`
    values from end to end, log-spaced on a log scale (interior ones rounded to 3 figures, as a
    person writing a grid would)."""
    try:
        return search.grid_of(key, dist)
    except search.SearchSpaceError:
        pass  # a continuous interval: cut it below
    assert isinstance(dist, FloatDistribution | IntDistribution)
    low, high = dist.low, dist.high
    if dist.log:
        inner = [low * (high / low) ** (i / (points - 1)) for i in range(1, points - 1)]
    else:
        inner = [low + (high - low) * i / (points - 1) for i in range(1, points - 1)]
    if isinstance(dist, IntDistribution):
        return sorted({low, *(round(v) for v in inner), high})
    return [low, *(float(f"{v:.3g}") for v in inner), high]  # exact ends: stay inside


@dataclass
class Curve:
    """What one trial reported: each evaluation (its step and metrics), its last step and its
    final metrics."""

    evaluations: list[tuple[int, dict[str, float]]]
    steps: int
    metrics: dict[str, float]


class RecordingReporter(SilentReporter):
    def __init__(self, metric: str) -> None:
        self.metric, self.steps = metric, 0
        self.evaluations: list[tuple[int, dict[str, float]]] = []

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.steps = max(self.steps, step)
        if self.metric in metrics:
            self.evaluations.append((step, {k: float(v) for k, v in metrics.items()}))


class TrialMemo:
    """Each distinct params' trial is trained once per run, to its end, and replayed to every
    study that samples them again: a trial's training depends only on its params (one seed for
    data order, init and dropout), and methods sharing a seed draw the same first trials (TPE's
    random startup is random search's). A replayed trial reports its evaluations in order, so a
    pruner stops it where it would have stopped the real one, at the same step: the numbers are
    those of training each study's trials itself, for fewer seconds. Entries are files in the
    run's temporary folder, shared by the worker processes."""

    def __init__(self, folder: Path, metric: str) -> None:
        self.folder, self.metric = folder, metric
        folder.mkdir(parents=True, exist_ok=True)

    def curve(self, params: Mapping[str, Any], run: Any) -> Curve:
        key = hashlib.sha256(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:32]
        path = self.folder / f"{key}.json"
        if path.exists():
            evaluations, steps, metrics = json.loads(path.read_text())
            return Curve([(s, m) for s, m in evaluations], steps, metrics)
        reporter = RecordingReporter(self.metric)
        metrics = {k: float(v) for k, v in run(reporter).metrics.items()}
        curve = Curve(reporter.evaluations, reporter.steps, metrics)
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_text(json.dumps([curve.evaluations, curve.steps, curve.metrics]))
        partial.replace(path)  # whole or absent, for the other worker
        return curve


@dataclass(frozen=True)
class Settings:
    """What a worker process needs to rebuild the shared part of every study (picklable)."""

    overrides: tuple[str, ...]
    budget: int
    noise: float
    grid_points: int
    workdir: str


@dataclass
class Bench:
    """What every study of the run shares: the validated study, its prepared data, the rules."""

    settings: Settings
    plan: Plan
    prepared: Any
    grid: dict[str, list[Any]]
    noise: FixedNoise
    memo: TrialMemo


def skip_confusion_matrices() -> None:
    """Each local trial draws its test confusion matrix, an artifact no number here reads; for
    BANKING77's 77 labels one drawing took 18 s of CPU (measured), as long as ~400 steps of
    training. The benchmark measures steps, so it skips the drawing."""
    from harness import metrics

    metrics.save_confusion_matrix = lambda y_true, y_pred, labels, path, title: path


def build_bench(settings: Settings) -> Bench:
    """The plan and the prepared data; the local backend's tokenizer is cached under the shared
    runs folder, so every process loads the very same vocabulary."""
    skip_confusion_matrices()
    plan = plan_study(load_config(list(settings.overrides)))
    grid = {k: grid_values(k, d, settings.grid_points) for k, d in plan.distributions.items()}
    prepared = plan.backend.prepare(plan.cfg, plan.dataset)
    memo = TrialMemo(Path(settings.workdir) / "memo", str(plan.cfg.sweep.metric))
    return Bench(settings, plan, prepared, grid, FixedNoise(settings.noise), memo)


def method_config(method: Method, bench: Bench) -> Any:
    """The config with the method's sampler and pruner as conf/sampler/ and conf/pruner/ give
    them (the default method: the config's own)."""
    chosen = [f"sampler={method.sampler}"] if method.sampler else []
    chosen += [f"pruner={method.pruner}"] if method.pruner else []
    return load_config([*bench.settings.overrides, *chosen]) if chosen else bench.plan.cfg


def make_sampler(method: Method, cfg: Any, seed: int, bench: Bench) -> Any:
    if cfg.sampler.name == "grid":  # harness's grid refuses intervals; this one cuts them
        return optuna.samplers.GridSampler(dict(bench.grid), seed=seed)
    distributions = bench.plan.distributions
    return search.make_sampler(cfg.sampler.name, seed, cfg.sampler.n_startup_trials, distributions)


def trial_spec(bench: Bench, number: int, params: dict[str, Any], workdir: Path) -> TrialSpec:
    cfg = bench.plan.cfg
    return TrialSpec(
        number,
        with_params(cfg, params),
        bench.prepared,
        workdir,
        False,
        metric=str(cfg.sweep.metric),
        direction=str(cfg.sweep.direction),
    )


def run_study(method: Method, seed: int, bench: Bench) -> Outcome:
    """One (method, seed): an in-memory Optuna study run until its trials' steps reach the
    budget."""
    if method.key == "trainer":
        from search_efficiency_trainer import run_anchor

        cfg, plan = bench.plan.cfg, bench.plan
        started = time.perf_counter()
        outcome = run_anchor(plan, bench.prepared, seed, bench.settings.budget)
        outcome.seconds = time.perf_counter() - started
        return outcome
    cfg = method_config(method, bench)
    metric = str(cfg.sweep.metric)
    test_metric = "test/" + metric.split("/", 1)[1]
    workdir = Path(bench.settings.workdir) / f"{method.key}-seed{seed}"  # its own saved state
    workdir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        # Hyperband picks a trial's bracket from the study name: a fixed one keeps runs equal
        study_name=f"{cfg.sampler.name}-{cfg.pruner.name}-seed{seed}",
        direction=cfg.sweep.direction,
        sampler=make_sampler(method, cfg, seed, bench),
        pruner=make_pruner(cfg.pruner, bench.plan.evaluations),  # resources from the space
    )
    outcome, noise = Outcome(), bench.noise

    def objective(trial: optuna.Trial) -> float:
        params = search.suggest(trial, bench.plan.distributions)
        curve = bench.memo.curve(
            params,
            lambda r: bench.plan.backend.run(trial_spec(bench, trial.number, params, workdir), r),
        )
        reporter = CountingReporter(trial, metric, lambda e: noise(params, e))
        try:
            for step, metrics in curve.evaluations:  # as the trial reported them
                reporter.report(step, metrics)
        except optuna.TrialPruned:
            outcome.add(reporter.steps, None, None, params)
            raise
        value = float(curve.metrics[metric]) + noise(params, reporter.evaluations)
        test = curve.metrics.get(test_metric)
        outcome.add(curve.steps, value, None if test is None else float(test), params)
        return value

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if outcome.used >= bench.settings.budget:
            study.stop()

    started = time.perf_counter()
    # a failing trial ends the benchmark with its traceback: no method may lose trials silently
    study.optimize(objective, callbacks=[stop_at_budget])
    outcome.seconds = time.perf_counter() - started
    return outcome


_WORKER_BENCH: Bench | None = None  # each worker process builds its bench once


def _start_worker(settings: Settings) -> None:
    global _WORKER_BENCH
    import torch

    torch.set_num_threads(1)  # two processes on two cores: one thread each
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _WORKER_BENCH = build_bench(settings)


def _run_in_worker(key: str, seed: int) -> tuple[str, int, Outcome]:
    assert _WORKER_BENCH is not None
    return key, seed, run_study(METHODS[key], seed, _WORKER_BENCH)


def run_all(
    bench: Bench, methods: list[Method], seeds: list[int], jobs: int
) -> dict[str, dict[int, Outcome]]:
    """Every (method, seed) study, serially or in ``jobs`` worker processes (spawned: a forked
    torch may hang); results keyed the same either way."""
    results: dict[str, dict[int, Outcome]] = defaultdict(dict)
    # the Trainer's studies first (the longest: nothing to replay); then method by method, so
    # two workers start different seeds and a method finds its seed's shared trials done
    ordered = sorted(methods, key=lambda m: m.key != "trainer")
    tasks = [(m.key, s) for m in ordered for s in seeds]
    if jobs <= 1:
        for key, seed in tasks:
            results[key][seed] = run_study(METHODS[key], seed, bench)
            print(f"  done {key} seed {seed} ({results[key][seed].seconds:.0f} s)", flush=True)
    else:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=spawn, initializer=_start_worker, initargs=(bench.settings,)
        ) as pool:
            futures = [pool.submit(_run_in_worker, key, seed) for key, seed in tasks]
            for future in futures:
                key, seed, outcome = future.result()
                results[key][seed] = outcome
                print(f"  done {key} seed {seed} ({outcome.seconds:.0f} s)", flush=True)
    return {m.key: dict(sorted(results[m.key].items())) for m in methods}


def fake_optimum(plan: Plan, prepared: Any) -> float | None:
    """The best objective the fake can give in this space: at its documented peak (learning
    rate 1e-3, dropout 0.1, batch size 16, least weight decay, most epochs), when the space
    holds it."""
    dists = plan.distributions
    peak = {
        "train.learning_rate": 1e-3,
        "train.dropout": 0.1,
        "train.batch_size": 16,
        "train.weight_decay": getattr(dists.get("train.weight_decay"), "low", None),
        "train.epochs": getattr(dists.get("train.epochs"), "high", None),
    }
    params = {k: v for k, v in peak.items() if k in dists}
    if any(not holds(dists[k], v) for k, v in params.items()):
        return None
    spec = TrialSpec(
        -1,
        with_params(plan.cfg, params),
        prepared,
        Path("."),
        False,
        metric=str(plan.cfg.sweep.metric),
        direction=str(plan.cfg.sweep.direction),
    )
    return float(plan.backend.run(spec, SilentReporter()).metrics[plan.cfg.sweep.metric])


def stratified_rows(path: Path, rows: int, seed: int, label_field: str, out: Path) -> str:
    """A stratified, seeded subsample of a JSONL file written to ``out``; returns a
    description of it."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    try:
        sample = stratified_sample(records, rows, seed, label_field)
    except ValueError as exc:
        raise SystemExit(f"--train-rows: {exc}") from None
    out.write_text("".join(json.dumps(r) + "\n" for r in sample))
    counts = Counter(str(r[label_field]) for r in sample)
    return (
        f"{len(sample)} of {len(records)} training rows, stratified by label "
        f"({min(counts.values())}-{max(counts.values())} per label), seed {seed}"
    )


def data_overrides(args: argparse.Namespace, tmp: Path) -> tuple[list[str], str | None]:
    """The data group's overrides for --data, and what --train-rows did (None: all rows)."""
    if not args.data:
        return [], None
    files = DATASETS[args.data]
    train, note = files["train"], None
    if args.train_rows:
        sample = tmp / f"{args.data}_train_{args.train_rows}.jsonl"
        note = stratified_rows(train, args.train_rows, args.train_seed, "label", sample)
        train = sample
    return [
        "data=sentiment",
        f"data.name={args.data}",
        "data.path=null",
        f"data.train={train}",
        f"data.validation={files['validation']}",
        f"data.test={files['test']}",
    ], note


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", "--dataset", choices=list(DATASETS), default=None)
    parser.add_argument("--backend", choices=("fake", "local"), default=None)
    parser.add_argument("--budget-steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (studies)")
    parser.add_argument("--train-rows", type=int, default=0, help="stratified training subsample")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of that subsample")
    parser.add_argument("--out", type=Path, default=None, help="folder for results and plots")
    parser.add_argument("--grid-points", type=int, default=4, help="values per continuous key")
    parser.add_argument("--noise", type=float, default=0.0, help="fake only: sd of fixed noise")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, small budget")
    args, extra = parser.parse_known_args()
    args.backend = args.backend or ("local" if args.data else "fake")
    if args.noise and args.backend != "fake":
        parser.error("--noise is for the fake backend (real training has its own)")
    if args.train_rows and not args.data:
        parser.error("--train-rows subsamples a --data dataset")
    args.seeds = args.seeds or DEFAULT_SEEDS[args.backend]
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.budget_steps is None:
        args.budget_steps = (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)[args.backend]
    name = args.data or f"default_{args.backend}"
    args.out = args.out or Path("benchmarks/out/search_efficiency") / name
    args.overrides = extra  # config overrides (train.eval_every_steps=50): in results.json too
    return args, extra


def choose_methods(args: argparse.Namespace) -> tuple[list[Method], list[str]]:
    """The methods to run, and a note for each one left out (no pruner file, fake backend)."""
    wanted = [METHODS[k] for k in (args.methods or DEFAULT_METHODS)]
    notes, methods = [], []
    for method in wanted:
        if not available(method):
            notes.append(f"{method.key}: skipped, conf/pruner/{method.pruner}.yaml missing here")
        elif method.key == "trainer" and args.backend != "local":
            notes.append("trainer: skipped, it trains for real (--backend local)")
        else:
            methods.append(method)
    return methods, notes


def main() -> None:
    from search_efficiency_report import Report, write_report

    args, extra = parse_args()
    methods, notes = choose_methods(args)
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data, sample_note = data_overrides(args, Path(tmp))
        # the local backend caches its tokenized data under the runs folder: a throwaway one
        overrides = [f"backend={args.backend}", f"paths.runs_dir={tmp}", *data, *BENCH_OVERRIDES]
        settings = Settings(
            (*overrides, *extra), args.budget_steps, args.noise, args.grid_points, tmp
        )
        bench = build_bench(settings)
        if bench.plan.cfg.sweep.direction != "maximize":
            raise SystemExit("the target (98% of the best) is defined for a maximized objective")
        report = Report(args, bench.plan, bench.grid, methods, notes, sample_note)
        report.print_header()
        results = run_all(bench, methods, args.seeds, args.jobs)
        optimum = fake_optimum(bench.plan, bench.prepared) if args.backend == "fake" else None
    report.seconds = time.perf_counter() - started
    write_report(report, results, optimum)


if __name__ == "__main__":
    main()
