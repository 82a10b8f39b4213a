"""Seed noise: how far a trial's objective moves when only the seed changes, and the ranking of
trials re-run with new seeds (`harness confirm`, harness.study.confirm).

The confirm runs live in the Optuna study, user attr ``confirm`` (CONFIRM_ATTR), written by the
main process only (never by workers of sweep.n_workers):

    {"7": {"1": 0.803, "2": 0.812, "3": 0.791}, "3": {"1": 0.799, "2": 0.785}}

trial number -> seed -> the first objective's value of a run of that trial's params with that
new ``seed`` (keys are strings: user attrs are JSON). Only new seeds are stored, each once its
run succeeded: the trial's own search run won its place by being the best draw (the winner's
curse), so it is shown beside the mean (Confirmed.own) but neither ranks nor measures noise.
What the confirm runs of a paid backend spent is the study attr CONFIRM_SPENT_ATTR (USD).

``seed_noise(study)`` is the one estimate of seed noise other code reads (the report, stop
rules): the pooled standard deviation of the confirm runs. Trials of a study all run with the
same ``seed``, so identical params give identical runs: they measure no seed noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import optuna

CONFIRM_ATTR = "confirm"
CONFIRM_SPENT_ATTR = "confirm_spent_usd"
CONFIDENCE = 0.95  # of the intervals shown
# Two runs of the same params differ by less than this many noise sd 95% of the time
# (1.96 x sqrt(2): the difference of two runs has sd sqrt(2) x sd): a smaller difference
# between two trials is within seed noise.
NOISE_BAND = 1.96 * math.sqrt(2.0)


class SeedNoise(NamedTuple):
    """The seed-to-seed standard deviation of the objective, from ``runs`` runs (in groups of
    the same params), and where they came from: "confirm runs"."""

    sd: float
    runs: int
    source: str

    def band(self) -> float:
        """Differences between two trials smaller than this are within seed noise."""
        return NOISE_BAND * self.sd

    def describe(self) -> str:
        return f"sd {self.sd:.4g}, from {self.runs} {self.source}"


@dataclass(frozen=True)
class Confirmed:
    """A trial's values over its new seeds, in seed order; ``own``: its search run's value,
    shown apart (it was selected for being lucky)."""

    number: int
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    own: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        """The sample standard deviation (n - 1); None from a single value."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The CONFIDENCE interval of the mean (Student t, n - 1 degrees of freedom)."""
        sd = self.sd
        if sd is None:
            return None
        half = t_quantile(len(self.values) - 1) * sd / math.sqrt(len(self.values))
        return self.mean - half, self.mean + half

    def line(self, metric: str) -> str:
        """E.g. "trial 7: eval/f1 0.805 ± 0.012 (95% CI 0.78 to 0.83, 3 new seeds; its search
        run 0.83)"."""
        n = len(self.values)
        own = "" if self.own is None else f"; its search run {self.own:.4g}"
        if self.sd is None or self.interval is None:
            return f"trial {self.number}: {metric} {self.mean:.4g} (1 new seed{own})"
        low, high = self.interval
        return (
            f"trial {self.number}: {metric} {self.mean:.4g} ± {self.sd:.2g} "
            f"({CONFIDENCE:.0%} CI {low:.4g} to {high:.4g}, {n} new seeds{own})"
        )


def t_quantile(df: int) -> float:
    """Student t's two-sided CONFIDENCE quantile with ``df`` degrees of freedom."""
    from scipy import stats  # scikit-learn's dependency; heavy: only when asked

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def confirm_samples(study: optuna.Study) -> dict[int, dict[int, float]]:
    """The stored confirm samples: trial number -> seed -> value (see the module docstring)."""
    return samples_in(study.user_attrs)


def samples_in(study_attrs: Mapping[str, Any]) -> dict[int, dict[int, float]]:
    """confirm_samples, from a study's user attrs already read."""
    stored: Mapping[str, Mapping[str, Any]] = study_attrs.get(CONFIRM_ATTR, {})
    return {
        int(number): {int(seed): float(value) for seed, value in by_seed.items()}
        for number, by_seed in stored.items()
    }


def confirmed_ranking(study: optuna.Study) -> list[Confirmed]:
    """Every trial confirmed on two new seeds or more, best mean first on the first objective
    (ties: the lower sd). One new seed has no spread to judge it by: left out."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    confirmed = [
        Confirmed(
            number,
            tuple(sorted(by_seed)),
            tuple(by_seed[s] for s in sorted(by_seed)),
            _own_value(trials.get(number)),
        )
        for number, by_seed in confirm_samples(study).items()
        if len(by_seed) > 1
    ]
    return sorted(confirmed, key=lambda c: (-c.mean if maximize else c.mean, c.sd or 0.0, c.number))


def _own_value(trial: optuna.trial.FrozenTrial | None) -> float | None:
    return float(trial.values[0]) if trial is not None and trial.values else None


def confirmed_winner(study: optuna.Study) -> Confirmed | None:
    """The trial with the best mean over its new seeds; None before any trial is confirmed."""
    ranking = confirmed_ranking(study)
    return ranking[0] if ranking else None


def pooled_sd(groups: Iterable[Iterable[float]]) -> tuple[float, int] | None:
    """The pooled standard deviation of groups of values (each group one configuration) and
    how many values it used; None without a group of two or more."""
    used = [group for group in map(list, groups) if len(group) > 1]
    dof = sum(len(g) - 1 for g in used)
    if dof == 0:
        return None
    squares = sum((len(g) - 1) * statistics.variance(g) for g in used)
    return math.sqrt(squares / dof), sum(len(g) for g in used)


def seed_noise(study: optuna.Study) -> SeedNoise | None:
    """The study's seed noise on its first objective: the pooled sd of its confirm runs (new
    seeds only); None before a trial has two."""
    pooled = pooled_sd(by_seed.values() for by_seed in confirm_samples(study).values())
    return None if pooled is None else SeedNoise(pooled[0], pooled[1], "confirm runs")


def top_within_noise(
    values: Sequence[float], noise: SeedNoise | None, metric: str, top: int = 3
) -> str | None:
    """A sentence when the best ``top`` values (best first) differ by less than seed noise
    allows: their order is then not meaningful; None otherwise."""
    shown = list(values[:top])
    if noise is None or len(shown) < 2:
        return None
    spread = abs(shown[0] - shown[-1])
    if spread >= noise.band():
        return None
    return (
        f"The top {len(shown)} trials differ by {spread:.3g} in {metric}, less than seed "
        f"noise allows ({noise.describe()}: two runs of the same params differ by up to "
        f"{noise.band():.3g} {CONFIDENCE:.0%} of the time): their order is not meaningful. "
        "`harness confirm` re-runs them with new seeds and ranks them by the mean."
    )


def weak_effects(
    importances: Mapping[str, float], values: Sequence[float], noise: SeedNoise | None
) -> dict[str, float]:
    """Parameters whose effect is smaller than seed noise: name -> effect, the standard
    deviation of the objective the parameter explains (sqrt(importance x variance of
    ``values``), fANOVA's share of the variance turned back into the objective's units)."""
    if noise is None or len(values) < 2:
        return {}
    variance = statistics.pvariance(values)
    effects = {key: math.sqrt(max(share, 0.0) * variance) for key, share in importances.items()}
    return {key: effect for key, effect in effects.items() if effect < noise.sd}
