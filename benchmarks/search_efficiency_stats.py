"""The statistics of benchmarks/search_efficiency.py, on plain numbers (no training, no Optuna):
each study's trials (steps and objective), steps to a target, medians and spreads over seeds,
best-so-far curves and the goal's verdict. tests/test_search_efficiency.py checks them on
hand-made numbers."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TARGET_SHARE = 0.98  # "reached": the best so far is at least this share of the best found
GOAL_RATIO = 0.5  # the default's median steps to the target / random search's


@dataclass
class Outcome:
    """One method's study for one seed: each trial's steps, objective (None: pruned) and test
    score (None: pruned, or not measured), in the order the trials ended."""

    steps: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    tests: list[float | None] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    chosen: int | None = None  # the trial the method picks; None: the best value's

    def add(
        self, steps: int, value: float | None, test: float | None, params: dict[str, Any]
    ) -> None:
        self.steps.append(int(steps))
        self.values.append(value)
        self.tests.append(test)
        self.params.append(dict(params))

    @property
    def used(self) -> int:
        return sum(self.steps)

    @property
    def best(self) -> float:
        return max((v for v in self.values if v is not None), default=-math.inf)

    @property
    def pruned(self) -> int:
        return sum(v is None for v in self.values)

    @property
    def chosen_index(self) -> int | None:
        """The chosen trial: the one the method named, else the first with the best value."""
        if self.chosen is not None:
            return self.chosen
        finished = [i for i, v in enumerate(self.values) if v is not None]
        return max(finished, key=lambda i: (self.values[i], -i)) if finished else None

    @property
    def chosen_test(self) -> float | None:
        index = self.chosen_index
        return None if index is None else self.tests[index]

    def steps_to(self, target: float) -> int | None:
        """Cumulative steps at the end of the first trial whose objective reached the target
        (a trial's objective is known only when it ends); None if none did."""
        total = 0
        for steps, value in zip(self.steps, self.values, strict=True):
            total += steps
            if value is not None and value >= target:
                return total
        return None

    def best_at(self, spent: float) -> float | None:
        """The best objective of the trials that ended within ``spent`` cumulative steps (None:
        none had)."""
        total, best = 0, None
        for steps, value in zip(self.steps, self.values, strict=True):
            total += steps
            if total > spent:
                break
            if value is not None and (best is None or value > best):
                best = value
        return best


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


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max, and the quartiles (statistics' 'inclusive' method)."""
    low, _, high = (
        statistics.quantiles(values, n=4, method="inclusive")
        if len(values) > 1
        else [values[0]] * 3
    )
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": low,
        "q3": high,
    }


def verdict(method: Summary, random: Summary) -> tuple[float, str, str]:
    """The ratio method / random search of steps to the target, its bound ('' exact, '<= ',
    '>= ', '~') and the answer: met, NOT met or UNDECIDED. A lower bound on random's side can
    only lower the true ratio, one on the method's only raise it: the goal is undecided when
    that could flip the answer."""
    (ours, ours_lower), (rnd, rnd_lower) = method, random
    ratio = ours / rnd
    met = ratio <= GOAL_RATIO
    if ours_lower and rnd_lower:
        bound, decided = "~", False
    elif rnd_lower:
        bound, decided = "<= ", met
    elif ours_lower:
        bound, decided = ">= ", not met
    else:
        bound, decided = "", True
    if not decided:
        return ratio, bound, "UNDECIDED"
    return ratio, bound, "met" if met else "NOT met"


def curve_band(outcomes: Sequence[Outcome], grid: Sequence[float]) -> list[dict[str, float] | None]:
    """At each point of ``grid`` (cumulative steps), the spread over seeds of the best objective
    so far; None where some seed had no finished trial yet (a median would mix seeds that
    have a value with seeds that have none)."""
    band: list[dict[str, float] | None] = []
    for spent in grid:
        bests = [o.best_at(spent) for o in outcomes]
        band.append(None if None in bests else spread([b for b in bests if b is not None]))
    return band


def step_grid(budget: int, outcomes: Sequence[Outcome], points: int = 200) -> list[float]:
    """Evenly spaced cumulative steps from 0 to the most any study spent (at least the budget:
    the trial that crosses it counts in full)."""
    end = max([budget, *(o.used for o in outcomes)])
    return [end * i / (points - 1) for i in range(points)]


def best_found(results: dict[str, dict[int, Outcome]]) -> tuple[float, str, int]:
    """The best objective any method found in any seed, and which (method, seed) found it."""
    method, seed = max(
        ((m, s) for m in results for s in results[m]), key=lambda ms: results[ms[0]][ms[1]].best
    )
    return results[method][seed].best, method, seed


def stratified_sample(
    records: Sequence[dict[str, Any]], rows: int, seed: int, label_field: str
) -> list[dict[str, Any]]:
    """``rows`` of ``records``, each label keeping its share (rounded down, at least one row;
    the rows left go to the largest remainders), drawn and shuffled with ``seed``."""
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_label[str(record[label_field])].append(record)
    if not len(by_label) <= rows <= len(records):
        raise ValueError(f"give between {len(by_label)} and {len(records)} rows, not {rows}")
    shares = {label: rows * len(rs) / len(records) for label, rs in by_label.items()}
    counts = {label: max(1, math.floor(share)) for label, share in shares.items()}
    by_remainder = sorted(shares, key=lambda label: (counts[label] - shares[label], label))
    for label in by_remainder[: max(0, rows - sum(counts.values()))]:
        counts[label] += 1
    while sum(counts.values()) > rows:  # labels raised to one row took rows from the others
        label = max((k for k in counts if counts[k] > 1), key=lambda k: counts[k] - shares[k])
        counts[label] -= 1
    draw = random.Random(seed)
    sample = [r for label in sorted(by_label) for r in draw.sample(by_label[label], counts[label])]
    draw.shuffle(sample)
    return sample
