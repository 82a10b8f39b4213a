"""Hydra's sweep grammar -> Optuna distributions; sampler and pruner construction.

The grammar is parsed by Hydra's own override parser, so a ``hydra.sweeper.params`` block written
for the hydra-optuna-sweeper plugin means the same here:

- ``choice(a, b, c)`` (or ``a,b,c``) -> CategoricalDistribution
- ``range(start, stop[, step])`` -> IntDistribution / stepped FloatDistribution; ``stop`` is
  excluded, as in Hydra and Python, while Optuna's ``high`` is included: converted, not copied
- ``interval(low, high)`` -> FloatDistribution; ``int(interval(low, high))`` -> IntDistribution
- ``tag(log, ...)`` on an interval or unit-step range samples on a log scale
- a plain value fixes the key (see ``fixed_values``)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
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


def _range_distribution(key: str, expression: str, sweep: RangeSweep) -> BaseDistribution:
    start: Any = sweep.start  # Hydra types these loosely; checked just below
    stop: Any = sweep.stop
    step: Any = sweep.step
    if not all(_is_number(v) for v in (start, stop, step)) or step <= 0:
        raise SearchSpaceError(f"{key}: {expression!r} needs numbers and a positive step")
    count = math.ceil((stop - start) / step - 1e-9)
    if count < 1:
        raise SearchSpaceError(f"{key}: {expression!r} is empty (the stop value is excluded)")
    high = start + (count - 1) * step
    log = "log" in sweep.tags
    if all(isinstance(v, int) for v in (start, stop, step)):
        if log and step != 1:
            raise SearchSpaceError(f"{key}: {expression!r}: a log scale needs step 1")
        return _checked(key, expression, IntDistribution, start, high, log=log, step=step)
    if log:
        raise SearchSpaceError(f"{key}: {expression!r}: a float range cannot be log-scaled")
    return _checked(key, expression, FloatDistribution, float(start), float(high), step=step)


def _interval_distribution(key: str, expression: str, sweep: IntervalSweep) -> BaseDistribution:
    low: Any = sweep.start
    high: Any = sweep.end
    if not (_is_number(low) and _is_number(high)):
        raise SearchSpaceError(f"{key}: {expression!r} needs numeric bounds")
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


def to_distribution(key: str, expression: str) -> BaseDistribution | None:
    """One expression's distribution, or None when the expression is a plain (fixed) value."""
    value = _parse(key, str(expression))
    if isinstance(value, ChoiceSweep):
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


def pruner_from(pruner_cfg: Any, name: str | None = None) -> optuna.pruners.BasePruner:
    """The pruner a config's ``pruner`` group describes (``name`` replaces its name)."""
    return make_pruner(
        name or pruner_cfg.name,
        pruner_cfg.n_startup_trials,
        pruner_cfg.n_warmup_steps,
        pruner_cfg.min_resource,
        pruner_cfg.reduction_factor,
    )


def make_pruner(
    name: str,
    n_startup_trials: int = 3,
    n_warmup_steps: int = 0,
    min_resource: int = 1,
    reduction_factor: int = 3,
) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, reduction_factor=reduction_factor
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchSpaceError(f"unknown pruner {name!r}: use median, hyperband or none")
