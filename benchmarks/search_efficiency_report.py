"""What benchmarks/search_efficiency.py prints and writes: the header, the table, the goal's
verdict, results.json, trials.csv and curves.png (best validation objective so far against
cumulative steps: median line and min-max band over seeds, per method)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_efficiency_stats import (
    GOAL_RATIO,
    TARGET_SHARE,
    Outcome,
    Summary,
    best_found,
    curve_band,
    spread,
    step_grid,
    summarise,
    verdict,
)

LABELS = {
    "random": "random",
    "tpe": "TPE, no pruning",
    "tpe+hyperband": "TPE + Hyperband",
    "tpe+asha": "TPE + ASHA",
    "tpe+patient": "TPE + patient",
    "trainer": "Trainer.hp_search",
    "grid": "grid",
}


@dataclass
class Report:
    args: argparse.Namespace
    plan: Any
    grid: Mapping[str, list[Any]]
    methods: list[Any]
    notes: list[str]
    sample_note: str | None
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def label(self, key: str) -> str:
        if key == "default":
            cfg = self.plan.cfg
            return f"default ({cfg.sampler.name}+{cfg.pruner.name})"
        return LABELS[key]

    def print_header(self) -> None:
        args, cfg = self.args, self.plan.cfg
        rows = len(self.plan.dataset.train)
        if args.backend == "fake":
            what = "FakeBackend learning curves (deterministic, smooth, one peak; no training) "
            what += f"with fixed noise sd {args.noise}" if args.noise else "without noise"
        else:
            what = "real training of the tiny GPT-2 (LocalBackend, CPU)"
        self.say(f"Search efficiency on {cfg.data.name} ({rows} training rows), {what}")
        if self.sample_note:
            self.say(f"  training split: {self.sample_note}")
        every = int(cfg.train.eval_every_steps)  # 0: once per epoch
        when = f"every {every} steps and at the end" if every else "epoch"
        self.say(
            f"  objective {cfg.sweep.metric} ({cfg.sweep.direction}), reported per evaluation "
            f"({when}); steps = optimizer steps, ceil(rows / batch size) per epoch"
        )
        if getattr(args, "overrides", None):
            self.say(f"  overrides: {' '.join(args.overrides)}")
        self.say("  space: " + ", ".join(f"{k}={v}" for k, v in cfg.search.space.items()))
        self.say(
            f"  default: sampler {cfg.sampler.name} "
            f"({dict(cfg.sampler)}), pruner {cfg.pruner.name} ({dict(cfg.pruner)})"
        )
        if any(m.key == "grid" for m in self.methods):
            self.say(f"  grid: {format_grid(self.grid)}")
        self.say(
            f"  budget {args.budget_steps} steps per method and seed (the trial crossing it "
            f"counts in full); seeds {' '.join(map(str, args.seeds))}; jobs {args.jobs}"
        )
        for note in self.notes:
            self.say(f"  {note}")


def format_grid(grid: Mapping[str, list[Any]]) -> str:
    size = math.prod(len(v) for v in grid.values())
    keys = ", ".join(
        f"{k.removeprefix('train.')} {'/'.join(f'{v:.3g}' for v in values)}"
        for k, values in grid.items()
    )
    return f"{size} points: {keys}"


def steps_cell(steps: float | None, budget: int, lower: bool = False) -> str:
    return f">{budget}" if steps is None else (">" if lower else "") + f"{steps:.0f}"


def method_stats(by_seed: Mapping[int, Outcome], target: float, budget: int) -> dict[str, Any]:
    """One method's numbers over its seeds."""
    outcomes = list(by_seed.values())
    reached = [o.steps_to(target) for o in outcomes]
    tests = [t for t in (o.chosen_test for o in outcomes) if t is not None]
    trials = sum(len(o.values) for o in outcomes)
    return {
        "best": spread([o.best for o in outcomes]),
        "chosen_test": spread(tests) if tests else None,
        "steps_to_target": dict(zip(map(str, by_seed), reached, strict=True)),
        "steps_summary": summarise(reached, budget),
        "trials_per_seed": trials / len(outcomes),
        "pruned_share": sum(o.pruned for o in outcomes) / max(1, trials),
        "seconds_per_seed": sum(o.seconds for o in outcomes) / len(outcomes),
    }


def print_table(
    report: Report, stats: Mapping[str, dict[str, Any]], seeds: Sequence[int], budget: int
) -> None:
    seed_cols = "".join(f"{'s' + str(s):>7}" for s in seeds)
    report.say(f"\n{'':<24}{'best val (median)':>18}{'chosen test':>13}   steps to target")
    report.say(
        f"{'method':<24}{'median':>8}{'min-max':>14}{'median':>8}{'min-max':>14}  {seed_cols}"
        f"{'median':>8}{'trials':>7}{'pruned':>7}{'s/seed':>7}"
    )
    for key, s in stats.items():
        best, test = s["best"], s["chosen_test"]
        test_cells = (
            f"{test['median']:>8.4f}{test['min']:>7.3f}-{test['max']:.3f}"
            if test
            else f"{'-':>8}{'-':>14}"
        )
        cells = "".join(f"{steps_cell(r, budget):>7}" for r in s["steps_to_target"].values())
        median, lower = s["steps_summary"]["median"]
        report.say(
            f"{report.label(key):<24}{best['median']:>8.4f}{best['min']:>7.3f}-{best['max']:.3f}"
            f"{test_cells}  {cells}{steps_cell(median, budget, lower):>8}"
            f"{s['trials_per_seed']:>7.1f}{s['pruned_share']:>7.0%}{s['seconds_per_seed']:>7.0f}"
        )


def goal_lines(stats: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The goal's numbers: default / random, median steps to the target over seeds."""
    if "default" not in stats or "random" not in stats:
        return None
    ours: Summary = stats["default"]["steps_summary"]["median"]
    rnd: Summary = stats["random"]["steps_summary"]["median"]
    ratio, bound, answer = verdict(ours, rnd)
    return {"default": ours, "random": rnd, "ratio": ratio, "bound": bound, "answer": answer}


def write_report(
    report: Report, results: dict[str, dict[int, Outcome]], optimum: float | None
) -> None:
    args = report.args
    best, best_key, best_seed = best_found(results)
    target = TARGET_SHARE * best
    report.say(
        f"  target: {TARGET_SHARE:.0%} of the best found, {best:.4f} ({report.label(best_key)}, "
        f"seed {best_seed}) = {target:.4f}"
        + (f"; the fake's optimum in this space is {optimum:.4f}" if optimum is not None else "")
    )
    stats = {k: method_stats(v, target, args.budget_steps) for k, v in results.items()}
    print_table(report, stats, args.seeds, args.budget_steps)
    report.say(
        "\n'>N': target not reached within the budget; such a seed counts as the budget, so a "
        "median it enters is a lower bound ('>'). chosen test: the test score of the trial each "
        "seed's study chose (its best validation objective)."
    )
    goal = goal_lines(stats)
    if goal:
        (ours, _), (rnd, _) = goal["default"], goal["random"]
        report.say(
            f"Goal: the default reaches the target in at most {GOAL_RATIO} x random search's "
            f"steps (median over seeds): {ours:.0f} / {rnd:.0f} = ratio {goal['bound']}"
            f"{goal['ratio']:.2f}: {goal['answer']}"
        )
    report.say(f"wall time {report.seconds:.0f} s")
    write_files(report, results, stats, goal, {"best": best, "target": target})


def write_files(
    report: Report,
    results: dict[str, dict[int, Outcome]],
    stats: Mapping[str, Any],
    goal: Any,
    found: Mapping[str, float],
) -> None:
    args, out = report.args, Path(report.args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {
        "settings": settings,
        "machine": f"{platform.node()} {platform.machine()}, {_cpus()} CPUs",
        "methods": {k: report.label(k) for k in results},
        "training_split": report.sample_note or "all rows",
        "found": dict(found),
        "goal": goal,
        "stats": stats,
        "trials": trial_rows(results),
        "printed": report.lines,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    write_csv(out / "trials.csv", summary["trials"])
    (out / "output.txt").write_text("\n".join(report.lines) + "\n")  # what was printed
    plot_curves(report, results, out / "curves.png", found["target"])
    print(f"wrote {out}/results.json, trials.csv, output.txt, curves.png")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def trial_rows(results: dict[str, dict[int, Outcome]]) -> list[dict[str, Any]]:
    rows = []
    for key, by_seed in results.items():
        for seed, outcome in by_seed.items():
            spent = 0
            for number, (steps, value, test, params) in enumerate(
                zip(outcome.steps, outcome.values, outcome.tests, outcome.params, strict=True)
            ):
                spent += steps
                rows.append(
                    {
                        "method": key,
                        "seed": seed,
                        "trial": number,
                        "steps": steps,
                        "cumulative_steps": spent,
                        "value": value,
                        "test": test,
                        "chosen": number == outcome.chosen_index,
                        "params": json.dumps(params, default=str),
                    }
                )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(
    report: Report, results: dict[str, dict[int, Outcome]], path: Path, target: float
) -> None:
    """One panel per method (median line, interquartile band, min-max band lighter; random
    search's median dashed for reference), and a last panel with every median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [o for by_seed in results.values() for o in by_seed.values()]
    grid = step_grid(report.args.budget_steps, everything)
    curves = {key: band_points(grid, list(by_seed.values())) for key, by_seed in results.items()}
    columns = 4
    rows = math.ceil((len(curves) + 1) / columns)
    figure, panels = plt.subplots(
        rows, columns, figsize=(4 * columns, 3.2 * rows), sharex=True, sharey=True, squeeze=False
    )
    flat = list(panels.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (key, (xs, bands)) in enumerate(curves.items()):
        colour, axes = colours[index % len(colours)], flat[index]
        if bands:
            median = [b["median"] for b in bands]
            for low, high, alpha in (("min", "max", 0.12), ("q1", "q3", 0.3)):
                lows, highs = [b[low] for b in bands], [b[high] for b in bands]
                axes.fill_between(xs, lows, highs, color=colour, alpha=alpha, linewidth=0)
            axes.plot(xs, median, color=colour)
            flat[-1].plot(xs, median, color=colour, label=report.label(key))
        if key != "random" and "random" in curves and curves["random"][1]:
            rx, rb = curves["random"]
            axes.plot(rx, [b["median"] for b in rb], color="grey", linestyle="--", linewidth=1)
        axes.set_title(report.label(key), fontsize=9)
    for axes in flat[len(curves) : -1]:
        axes.set_visible(False)
    flat[-1].set_title("medians", fontsize=9)
    flat[-1].legend(fontsize=6, loc="lower right")
    for axes in flat:
        axes.axhline(target, color="black", linestyle=":", linewidth=0.8)
        axes.axvline(report.args.budget_steps, color="grey", linestyle=":", linewidth=0.8)
        axes.grid(alpha=0.3)
    cfg = report.plan.cfg
    figure.supxlabel("optimizer steps spent (cumulative over trials)")
    figure.supylabel(f"best validation {cfg.sweep.metric} so far")
    figure.suptitle(
        f"{cfg.data.name}: median, interquartile and min-max over seeds "
        f"{' '.join(map(str, report.args.seeds))}; dotted: target (98% of best), budget; "
        "dashed: random search's median",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def band_points(
    grid: Sequence[float], outcomes: list[Outcome]
) -> tuple[list[float], list[dict[str, float]]]:
    """The grid points where every seed has a finished trial, and the spread there."""
    band = curve_band(outcomes, grid)
    xs = [x for x, b in zip(grid, band, strict=True) if b is not None]
    return xs, [b for b in band if b is not None]
