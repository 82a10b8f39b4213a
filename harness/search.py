"""Hydra's sweep grammar -> Optuna distributions; sampler construction (pruners: harness.pruning).

The grammar is parsed by Hydra's own override parser, so a ``hydra.sweeper.params`` block written
for the hydra-optuna-sweeper plugin means the same here:

- ``choice(a, b, c)`` (or ``a,b,c``) -> CategoricalDistribution
- ``range(start, stop[, step])`` -> IntDistribution / stepped FloatDistribution; ``stop`` is
  excluded, as in Hydra and Python, while Optuna's ``high`` is included: converted, not copied;
  a negative step counts down (``range(10, 0, -2)``: the values 10, 8, 6, 4, 2)
- ``shuffle(...)`` of choices or of a range -> CategoricalDistribution, as in the plugin
- ``interval(low, high)`` -> FloatDistribution; ``int(interval(low, high))`` -> IntDistribution
- ``tag(log, ...)`` on an interval or unit-step range samples on a log scale
- a plain value fixes the key (see ``fixed_values``); an empty one, or bounds that are not
  finite (``interval(0, inf)``), are errors
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from omegaconf import OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


class SearchSpaceError(ValueError):
    """A search-space expression that cannot be searched; the message names key and expression."""


def _parse(key: str, expression: str) -> Any:
    try:
        return OverridesParser.create().parse_override(f"{key}={expression}").value()
    except HydraException as exc:
        raise SearchSpaceError(f"{key}: cannot parse {expression!r}: {exc}") from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require_finite(key: str, expression: str, *bounds: float) -> None:
    # Optuna accepts FloatDistribution(0, inf) and then samples inf or nan, which fail every
    # trial with no reason; range(0, inf) has no end to count to
    if not all(math.isfinite(bound) for bound in bounds):
        raise SearchSpaceError(
            f"{key}: {expression!r}: the bounds must be finite numbers, not inf or nan; "
            "give the real limits, e.g. interval(0.0, 0.5) or range(1, 10)"
        )


# A shuffled range is a list of choices; past this many it is surely meant as a range
MAX_SHUFFLED_CHOICES = 10_000


def _range_distribution(key: str, expression: str, sweep: RangeSweep) -> BaseDistribution:
    start: Any = sweep.start  # Hydra types these loosely; checked just below
    stop: Any = sweep.stop
    step: Any = sweep.step
    if not all(_is_number(v) for v in (start, stop, step)) or step == 0:
        raise SearchSpaceError(f"{key}: {expression!r} needs numbers and a non-zero step")
    _require_finite(key, expression, start, stop, step)
    integral = all(isinstance(v, int) for v in (start, stop, step))
    count = _range_count(start, stop, step)
    if count < 1:
        raise SearchSpaceError(
            f"{key}: {expression!r} is empty (the stop value is excluded; "
            "a range that counts down needs a negative step: range(10, 0, -2))"
        )
    if sweep.shuffle:
        # As the hydra-optuna-sweeper plugin does: a shuffled range is a categorical over its
        # values. They keep Hydra's (unshuffled) order: Optuna compares a categorical's choices
        # in order when a study resumes, and Hydra shuffles with an unseeded random.
        if count > MAX_SHUFFLED_CHOICES:
            raise SearchSpaceError(
                f"{key}: {expression!r} would be {count:,} choices; drop shuffle() "
                "to search it as a range of numbers"
            )
        values = (_range_value(start, step, i, integral) for i in range(count))
        return CategoricalDistribution(tuple(values))
    # A range that counts down (range(10, 0, -2): 10, 8, 6, 4, 2) is the same set of values
    # as the one that counts up from its last value (range(2, 11, 2)): Optuna's int and float
    # distributions are sets, so both become IntDistribution(2, 10, step=2), still ordered
    # for TPE and GP (a categorical would lose the order), and a study may switch between the
    # two spellings. The plugin passes a negative step to IntDistribution, which refuses it.
    ends = (_range_value(start, step, 0, integral), _range_value(start, step, count - 1, integral))
    low, high, step = min(ends), max(ends), abs(step)
    log = "log" in sweep.tags
    if integral:
        if log and step != 1:
            raise SearchSpaceError(f"{key}: {expression!r}: a log scale needs step 1")
        return _checked(key, expression, IntDistribution, low, high, log=log, step=step)
    if log:
        raise SearchSpaceError(f"{key}: {expression!r}: a float range cannot be log-scaled")
    return _checked(key, expression, FloatDistribution, low, high, step=step)


# Float ranges are counted in decimal on the numbers as written (as Optuna checks a float
# step), so range(0.0, 0.9, 0.3) is 0.0, 0.3, 0.6: Hydra's own binary sums also give
# 0.8999999999999999 there, a hair below the excluded stop. Integer ranges are Python's, as
# in Hydra.
def _range_count(start: float, stop: float, step: float) -> int:
    """How many values Hydra's ``range(start, stop, step)`` has (stop excluded), either way."""
    if all(isinstance(v, int) for v in (start, stop, step)):
        return len(range(int(start), int(stop), int(step)))
    return max(0, math.ceil((Decimal(str(stop)) - Decimal(str(start))) / Decimal(str(step))))


def _range_value(start: float, step: float, index: int, integral: bool) -> Any:
    if integral:
        return int(start) + index * int(step)
    return float(Decimal(str(start)) + index * Decimal(str(step)))


def _interval_distribution(key: str, expression: str, sweep: IntervalSweep) -> BaseDistribution:
    low: Any = sweep.start
    high: Any = sweep.end
    if not (_is_number(low) and _is_number(high)):
        raise SearchSpaceError(f"{key}: {expression!r} needs numeric bounds")
    _require_finite(key, expression, low, high)
    log = "log" in sweep.tags
    if isinstance(low, int) and isinstance(high, int):
        return _checked(key, expression, IntDistribution, low, high, log=log)
    return _checked(key, expression, FloatDistribution, float(low), float(high), log=log)


def _checked(key: str, expression: str, cls: Any, *args: Any, **kwargs: Any) -> BaseDistribution:
    try:
        distribution: BaseDistribution = cls(*args, **kwargs)
    except ValueError as exc:  # e.g. low > high, log with low <= 0
        raise SearchSpaceError(f"{key}: {expression!r}: {exc}") from exc
    return distribution


def extremes(dist: BaseDistribution) -> list[Any]:
    """The values of a distribution that bound what it samples: its ends, or every choice."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]  # type: ignore[attr-defined]


def to_distribution(key: str, expression: str) -> BaseDistribution | None:
    """One expression's distribution, or None when the expression is a plain (fixed) value."""
    text = "" if expression is None else str(expression)  # `key:` with nothing, in YAML: None
    value = _parse(key, text)
    if value == "":  # `key=`, `key=''`: Hydra reads an empty string, which fixes nothing useful
        raise SearchSpaceError(
            f"{key}: the expression is empty ({key}={text}); give a value to fix the key, or "
            "a search expression such as choice(8, 16), range(1, 5) or interval(0.0, 0.3), "
            "or leave the key out (of the command line or search.space) to keep its default"
        )
    if isinstance(value, ChoiceSweep):
        # shuffle(a, b, c) and shuffle(choice(...)) too, as in the plugin; the choices keep the
        # written order (Optuna compares them in order when a study resumes)
        if not value.list:
            raise SearchSpaceError(f"{key}: {expression!r} has no choices")
        choices: tuple[Any, ...] = tuple(value.list)
        if any(isinstance(c, dict | list) for c in choices):
            raise SearchSpaceError(f"{key}: {expression!r}: choices must be plain values")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        return _range_distribution(key, expression, value)
    if isinstance(value, IntervalSweep):
        return _interval_distribution(key, expression, value)
    if isinstance(value, str | int | float | bool) or value is None:
        return None
    raise SearchSpaceError(f"{key}: {expression!r} is not supported (use choice, range, interval)")


def to_distributions(space: Mapping[str, str]) -> dict[str, BaseDistribution]:
    """The searched keys of ``space`` as Optuna distributions; plain values are left out."""
    distributions = {}
    for key, expression in space.items():
        distribution = to_distribution(key, expression)
        if distribution is not None:
            distributions[key] = distribution
    return distributions


def searched_choices(cfg: Any, key: str, searched: frozenset[str]) -> list[Any]:
    """The values ``key`` may take in the trials of ``cfg``: its value, or, where the search
    space varies it, the choices of its choice(...) (a range's values need no name check)."""
    value = OmegaConf.select(cfg, key)
    if key not in searched:
        return [value]
    distribution = to_distributions({key: cfg.search.space[key]})[key]
    return list(getattr(distribution, "choices", [value]))


def fixed_values(space: Mapping[str, str]) -> dict[str, Any]:
    """The keys of ``space`` given a plain value, parsed (``"3"`` -> 3)."""
    return {
        key: _parse(key, str(expression))
        for key, expression in space.items()
        if to_distribution(key, expression) is None
    }


def suggest(trial: optuna.Trial, distributions: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Samples every key through Optuna's public suggest API."""
    params: dict[str, Any] = {}
    for key, dist in distributions.items():
        if isinstance(dist, CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatDistribution):
            params[key] = trial.suggest_float(
                key, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            raise SearchSpaceError(f"{key}: unsupported distribution {dist!r}")
    return params


def grid_of(key: str, distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    step = getattr(distribution, "step", None)
    if step is None or getattr(distribution, "log", False):
        raise SearchSpaceError(
            f"{key}: the grid sampler needs choice() or range(), not a continuous interval"
        )
    count = round((distribution.high - distribution.low) / step) + 1  # type: ignore[attr-defined]
    return [distribution.low + i * step for i in range(count)]  # type: ignore[attr-defined]


def make_sampler(
    name: str, seed: int, n_startup_trials: int, distributions: Mapping[str, BaseDistribution]
) -> optuna.samplers.BaseSampler:
    samplers = optuna.samplers
    if name == "tpe":
        return samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {key: grid_of(key, dist) for key, dist in distributions.items()}
        return samplers.GridSampler(grid, seed=seed)
    if name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "gp":
        return samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    raise SearchSpaceError(f"unknown sampler {name!r}: use tpe, random, grid, cmaes or gp")
