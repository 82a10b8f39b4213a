"""Search efficiency: TPE + Hyperband, TPE alone, random and grid search at equal step budgets.

    python benchmarks/search_efficiency.py [--budget-steps 6000] [--seeds 0 1 2] [--noise 0.0]
                                           [--grid-points 4] [--quick] [overrides...]
    python benchmarks/search_efficiency.py --backend local [--quick]  # real training: slow

The default study (sentiment, the local_classification search space) is searched by four
methods, each seed with a fresh in-memory Optuna study (no storage, no MLflow):

- TPE + Hyperband: Optuna's recommended pairing; each Hyperband bracket has its own TPE startup
- TPE without pruning
- random search, no pruner
- grid search: GridSampler over the same space with each continuous key cut into --grid-points
  values (log-spaced on log keys), visited in an order shuffled by the seed

The objective (sweep.metric, eval/f1) is reported to Optuna at each evaluation, with the
evaluation's index as the step, so Hyperband's resource is epochs. A method runs trials until the
training (optimizer) steps its trials took add up to --budget-steps; a pruned trial counts the
steps it took before it stopped, and the trial that crosses the budget counts in full.

Per method and seed: the best objective, and the steps at which the best so far first reached 98%
of the best value any method found in any seed (one target for the whole run). A seed that never
reached it counts as the budget, marked '>': a mean or median it enters is only a lower bound,
and the goal is called UNDECIDED when such a bound could flip the answer. Goal: TPE + Hyperband
reaches the target with at most half the steps of random search (mean over seeds; the median is
printed too, as one stuck seed moves a 3-seed mean a lot).

--backend fake (default) trains nothing: FakeBackend's learning curves, whose steps per epoch are
the real ones (ceil(training rows / batch size)); 3 seeds take seconds and a re-run prints the
same numbers. Its surface is smooth, unimodal and noise-free, and every trial's curve has the
same shape (early ranking = final ranking), which favours both a model-based sampler and
pruning; --noise SD adds a fixed pseudo-random offset per (params, evaluation), as a fixed
training seed would, to see how much of the advantage survives.

--backend local trains the tiny GPT-2 for real (default budget 1500 steps, about 11 random
trials). On 2 CPU cores, one seed of the default took 77 s, and `--budget-steps 6000` with 3
seeds took 15 minutes (measured 2026-11-21, with nothing else running).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import math
import random
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from harness import search
from harness.backends.base import TrialSpec
from harness.cli import _quiet_libraries
from harness.config import load_config, with_params
from harness.continuation import holds
from harness.pruning import make_pruner
from harness.study import Plan, plan_study

TARGET_SHARE = 0.98  # "reached": the best so far is at least this share of the best found
GOAL_RATIO = 0.5  # TPE + Hyperband's steps to the target / random search's
DEFAULT_BUDGET = {"fake": 6000, "local": 1500}  # fake: ~46 full random trials (129 steps each)
QUICK_BUDGET = {"fake": 1500, "local": 300}


@dataclass(frozen=True)
class Method:
    label: str
    sampler: str  # a conf/sampler/ name
    pruner: str  # a conf/pruner/ name


METHODS = (
    Method("TPE + Hyperband", "tpe", "hyperband"),
    Method("TPE, no pruning", "tpe", "none"),
    Method("random", "random", "none"),
    Method("grid", "grid", "none"),
)


@dataclass
class Outcome:
    """One method's study for one seed: each trial's steps and objective (None: pruned)."""

    steps: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def used(self) -> int:
        return sum(self.steps)

    @property
    def best(self) -> float:
        return max((v for v in self.values if v is not None), default=-math.inf)

    @property
    def pruned(self) -> int:
        return sum(v is None for v in self.values)

    def steps_to(self, target: float) -> int | None:
        """Cumulative steps at the end of the first trial whose objective reached the target
        (a trial's objective is known only when it ends); None if none did."""
        total = 0
        for steps, value in zip(self.steps, self.values, strict=True):
            total += steps
            if value is not None and value >= target:
                return total
        return None


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
    """Reports the objective of each evaluation to Optuna, its index as the step (Hyperband's
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


def make_sampler(
    method: Method,
    cfg: Any,
    seed: int,
    distributions: Mapping[str, BaseDistribution],
    grid: Mapping[str, list[Any]],
) -> optuna.samplers.BaseSampler:
    if method.sampler == "grid":  # harness's grid refuses intervals; this one cuts them
        return optuna.samplers.GridSampler(dict(grid), seed=seed)
    return search.make_sampler(method.sampler, seed, cfg.sampler.n_startup_trials, distributions)


@dataclass
class Bench:
    """What every study of the run shares: the validated study, its prepared data, the rules."""

    plan: Plan
    prepared: Any
    overrides: list[str]
    budget: int
    grid: dict[str, list[Any]]
    noise: FixedNoise
    workdir: Path


def run_study(method: Method, seed: int, bench: Bench) -> Outcome:
    plan = bench.plan
    # the sampler's and pruner's settings as conf/sampler/ and conf/pruner/ give them
    cfg = load_config([*bench.overrides, f"sampler={method.sampler}", f"pruner={method.pruner}"])
    metric = plan.cfg.sweep.metric
    study = optuna.create_study(
        # Hyperband picks a trial's bracket from the study name: a fixed one keeps runs equal
        study_name=f"{method.sampler}-{method.pruner}-seed{seed}",
        direction=plan.cfg.sweep.direction,
        sampler=make_sampler(method, cfg, seed, plan.distributions, bench.grid),
        pruner=make_pruner(cfg.pruner, plan.evaluations),
    )
    outcome, noise = Outcome(), bench.noise

    def objective(trial: optuna.Trial) -> float:
        params = search.suggest(trial, plan.distributions)
        reporter = CountingReporter(trial, metric, lambda e: noise(params, e))
        trial_cfg = with_params(plan.cfg, params)
        spec = TrialSpec(
            trial.number,
            trial_cfg,
            bench.prepared,
            bench.workdir,
            False,
            metric=metric,
            direction=str(plan.cfg.sweep.direction),
        )
        try:
            result = plan.backend.run(spec, reporter)
        except optuna.TrialPruned:
            outcome.steps.append(reporter.steps)
            outcome.values.append(None)
            raise
        value = float(result.metrics[metric]) + noise(params, reporter.evaluations)
        outcome.steps.append(reporter.steps)
        outcome.values.append(value)
        return value

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if outcome.used >= bench.budget:
            study.stop()

    started = time.perf_counter()
    # a failing trial ends the benchmark with its traceback: no method may lose trials silently
    study.optimize(objective, callbacks=[stop_at_budget])
    outcome.seconds = time.perf_counter() - started
    return outcome


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


def format_grid(grid: Mapping[str, list[Any]]) -> str:
    size = math.prod(len(v) for v in grid.values())
    keys = ", ".join(
        f"{k.removeprefix('train.')} {'/'.join(f'{v:.3g}' for v in values)}"
        for k, values in grid.items()
    )
    return f"{size} points: {keys}"


def print_header(args: argparse.Namespace, plan: Plan, grid: Mapping[str, list[Any]]) -> None:
    cfg = plan.cfg
    rows = len(plan.dataset.train)
    if args.backend == "fake":
        what = "FakeBackend learning curves (deterministic, smooth, one peak; no training) " + (
            f"with fixed noise sd {args.noise}" if args.noise else "without noise"
        )
    else:
        what = "real training of the tiny GPT-2 (LocalBackend, CPU)"
    print(f"Search efficiency on {cfg.data.name} ({rows} training rows), {what}")
    print(
        f"  objective {cfg.sweep.metric} ({cfg.sweep.direction}), reported per evaluation "
        "(epoch); steps = optimizer steps, ceil(rows / batch size) per epoch"
    )
    print("  space: " + ", ".join(f"{k}={v}" for k, v in cfg.search.space.items()))
    print(f"  grid: {format_grid(grid)}")
    print(
        f"  budget {args.budget_steps} steps per method and seed (the trial crossing it counts "
        f"in full); seeds {' '.join(map(str, args.seeds))}"
    )


Summary = tuple[float, bool]  # steps to the target, and whether that is only a lower bound


def summarise(reached: Sequence[int | None], budget: int) -> dict[str, Summary]:
    """Mean and median steps to the target over seeds. A seed that missed it counts as the
    budget, below its true steps: the mean is then a lower bound, and so is the median when a
    middle seed missed."""
    counted = [budget if r is None else r for r in reached]
    # a trial crossing the budget counts in full, so a seed that reached the target can show
    # more steps than the budget: misses sort last, as their true steps are more still
    ordered = sorted(reached, key=lambda r: math.inf if r is None else r)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return {
        "mean": (statistics.mean(counted), None in reached),
        "median": (statistics.mean(budget if r is None else r for r in middle), None in middle),
    }


def steps_cell(steps: float | None, budget: int, lower: bool = False) -> str:
    return f">{budget}" if steps is None else (">" if lower else "") + f"{steps:.0f}"


def print_table(
    results: dict[Method, dict[int, Outcome]], seeds: Sequence[int], target: float, budget: int
) -> dict[Method, dict[str, Summary]]:
    """The table; returns each method's mean and median steps to the target."""
    seed_cols = "".join(f"{'seed ' + str(s):>8}" for s in seeds)
    print(f"\n{'':<17}{'best objective':>17}   steps to target")
    print(
        f"{'method':<17}{'mean':>8}{'min':>9}   {seed_cols}{'mean':>9}{'median':>9}"
        f"{'trials':>8}{'pruned':>8}{'s/seed':>8}"
    )
    summaries: dict[Method, dict[str, Summary]] = {}
    for method, by_seed in results.items():
        outcomes = [by_seed[s] for s in seeds]
        bests = [o.best for o in outcomes]
        reached = [o.steps_to(target) for o in outcomes]
        summary = summaries[method] = summarise(reached, budget)
        trials = statistics.mean(len(o.values) for o in outcomes)
        pruned = sum(o.pruned for o in outcomes) / sum(len(o.values) for o in outcomes)
        seconds = statistics.mean(o.seconds for o in outcomes)
        cells = "".join(f"{steps_cell(r, budget):>8}" for r in reached)
        stats = "".join(f"{steps_cell(*summary[k][:1], budget, summary[k][1]):>9}" for k in summary)
        print(
            f"{method.label:<17}{statistics.mean(bests):>8.4f}{min(bests):>9.4f}   {cells}"
            f"{stats}{trials:>8.1f}{pruned:>8.0%}{seconds:>8.1f}"
        )
    return summaries


def verdict(pruned: Summary, random: Summary) -> str:
    """The ratio TPE + Hyperband / random and whether the goal is met. A lower bound on
    random's side can only lower the true ratio, one on TPE + Hyperband's only raise it: the
    goal is undecided when that could flip the answer."""
    (tpe, tpe_lower), (rnd, rnd_lower) = pruned, random
    ratio = tpe / rnd
    met = ratio <= GOAL_RATIO
    if tpe_lower and rnd_lower:
        bound, decided = "~", False
    elif rnd_lower:
        bound, decided = "<= ", met
    elif tpe_lower:
        bound, decided = ">= ", not met
    else:
        bound, decided = "", True
    if not decided:
        answer = "UNDECIDED: a target missed within the budget could flip it (raise --budget-steps)"
    else:
        answer = "met" if met else "NOT met"
    return f"{tpe:.0f} / {rnd:.0f} = ratio {bound}{ratio:.2f}; goal (<= {GOAL_RATIO}): {answer}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("fake", "local"), default="fake")
    parser.add_argument("--budget-steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid-points", type=int, default=4, help="values per continuous key")
    parser.add_argument("--noise", type=float, default=0.0, help="fake only: sd of fixed noise")
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, small budget")
    args, extra = parser.parse_known_args()
    if args.noise and args.backend != "fake":
        parser.error("--noise is for the fake backend (real training has its own)")
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.budget_steps is None:
        args.budget_steps = (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)[args.backend]
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # the local backend caches its tokenized data under the runs folder: a throwaway one
        overrides = [f"backend={args.backend}", f"paths.runs_dir={tmp}", *extra]
        plan = plan_study(load_config(overrides))
        if plan.cfg.sweep.direction != "maximize":
            parser.error("the target (98% of the best) is defined for a maximized objective")
        grid = {k: grid_values(k, d, args.grid_points) for k, d in plan.distributions.items()}
        print_header(args, plan, grid)
        prepared = plan.backend.prepare(plan.cfg, plan.dataset)
        bench = Bench(
            plan, prepared, overrides, args.budget_steps, grid, FixedNoise(args.noise), Path(tmp)
        )
        results = {m: {seed: run_study(m, seed, bench) for seed in args.seeds} for m in METHODS}
        optimum = fake_optimum(plan, prepared) if args.backend == "fake" else None
    best_method, best_seed = max(
        ((m, s) for m in results for s in results[m]), key=lambda ms: results[ms[0]][ms[1]].best
    )
    best = results[best_method][best_seed].best
    target = TARGET_SHARE * best
    print(
        f"  target: {TARGET_SHARE:.0%} of the best found, {best:.4f} ({best_method.label}, seed "
        f"{best_seed}) = {target:.4f}"
        + (f"; the fake's optimum in this space is {optimum:.4f}" if optimum is not None else "")
    )
    summaries = print_table(results, args.seeds, target, args.budget_steps)
    print(
        "\n'>N': target not reached within the budget; such a seed counts as the budget, so a "
        "mean or median it enters is a lower bound ('>')."
    )
    print("Steps to target, TPE + Hyperband / random search:")
    for statistic in ("mean", "median"):
        tpe, rnd = (summaries[m][statistic] for m in (METHODS[0], METHODS[2]))
        print(f"  {statistic:>6} over seeds: {verdict(tpe, rnd)}")
    print(f"wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
