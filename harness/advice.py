"""Search-space advice: best trials at the edge of a searched range mean the range is too narrow.

The rule is the Deep Learning Tuning Playbook's: if the best trials crowd one end of a range, the
optimum may lie beyond it, so the range should be widened there. Suggestions are written in the
sweep grammar the study uses (``tag(log, interval(3e-5, 1e-2))``), so they can be pasted as
overrides, and never leave the values a key can take (``hard_limits``: harness's valid ranges,
narrowed by what the backend declares it accepts).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from harness import continuation
from harness.config import VALID_RANGES
from harness.noise import SeedNoise, top_within_noise
from harness.search import SearchSpaceError, extremes, to_distribution

if TYPE_CHECKING:
    from harness.backends.base import Backend, Limit

EDGE_FRACTION = 0.1  # "at the edge": within this fraction of the range from an end
MIN_TRIALS_FOR_ADVICE = 5  # fewer complete trials than this: the advice is tentative
MORE_TRIALS = 10  # trials the command that follows the advice adds to the study

# Values each key can take (low, high; None: unbounded), from the one table of valid ranges. A
# suggestion is clamped to these, and an edge already at one is a hard limit, not a reason to widen.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    key: (valid.low, valid.high) for key, valid in VALID_RANGES.items()
}


def hard_limits(backend: Backend) -> dict[str, Limit]:
    """LIMITS, narrowed by the limits the backend declares (a hosted provider's API ranges)."""
    limits = dict(LIMITS)
    for key, (low, high) in backend.hard_limits().items():
        floor, ceiling = limits.get(key, (None, None))
        limits[key] = (_tighter(floor, low, max), _tighter(ceiling, high, min))
    return limits


def _tighter(
    ours: float | None, theirs: float | None, pick: Callable[[float, float], float]
) -> float | None:
    """The narrower of two ends of a range (``pick``: max for a floor, min for a ceiling)."""
    if ours is None or theirs is None:
        return theirs if ours is None else ours
    return pick(ours, theirs)


@dataclass(frozen=True)
class EdgeAdvice:
    """The best trial's value of ``key`` lies at the ``edge`` ("upper"/"lower") of its range."""

    key: str
    edge: str
    best_value: Any
    current: str  # the searched expression
    suggestion: str | None  # a wider expression; None: the edge is a hard limit of the key
    top_at_edge: int  # how many of the top trials lie at that edge too
    top_count: int

    def text(self) -> str:
        where = f"the {self.edge} edge of `{self.key}={self.current}`"
        head = f"`{self.key}`: the best trial's value {_number(self.best_value)} lies at {where}"
        if self.top_count > 1:
            head += f" ({self.top_at_edge} of the top {self.top_count} trials are there)"
        head += "."
        if self.suggestion is None:
            return f"{head} That edge is a hard limit of the key: it cannot be widened."
        return f"{head} Widen it: `{self.key}={self.suggestion}`"


def boundary_advice(
    ranked: Sequence[optuna.trial.FrozenTrial],
    distributions: Mapping[str, BaseDistribution],
    limits: Mapping[str, tuple[float | None, float | None]],
) -> list[EdgeAdvice]:
    """Edges of numeric ranges where the best of ``ranked`` (COMPLETE trials, best first) lies.

    The top trials are the best 10% (at least 1, at most 5); the advice is triggered by the best
    one and says how many of the others agree."""
    if not ranked:
        return []
    top = list(ranked[: min(5, max(1, round(len(ranked) * 0.1)))])
    advice = []
    for key, dist in distributions.items():
        if key not in top[0].params or not is_numeric(dist):
            continue
        edge = edge_of(top[0].params[key], dist)
        if edge is None:
            continue
        agreeing = sum(1 for t in top if key in t.params and edge_of(t.params[key], dist) == edge)
        advice.append(
            EdgeAdvice(
                key,
                edge,
                top[0].params[key],
                expression(dist),
                widen(key, dist, edge, limits.get(key, (None, None))),
                agreeing,
                len(top),
            )
        )
    return advice


def noise_advice(
    ranked: Sequence[optuna.trial.FrozenTrial], seed_noise: SeedNoise | None, metric: str
) -> str | None:
    """A warning when the best trials (best first) differ by less than seed noise: which of
    them is best, and so where the edges lie, is then not settled (harness.noise)."""
    return top_within_noise([t.values[0] for t in ranked], seed_noise, metric)


def follow_command(
    study: optuna.Study,
    advice: Sequence[EdgeAdvice],
    distributions: Mapping[str, BaseDistribution],
    overrides: Sequence[str],
    unset: Sequence[str] = (),
) -> str | None:
    """The `harness sweep` command that widens every range the advice widens and adds
    MORE_TRIALS trials: the study's own overrides with the new ranges, and the keys ``unset``
    set to null (stop rules the study meets already: kept, they would stop the command before
    its first trial). In place where Optuna can follow the change (a wider interval or range),
    else as a continuation study that starts with this one's finished trials (a longer choice
    list; harness.continuation)."""
    widened = {a.key: a.suggestion for a in advice if a.suggestion is not None}
    if not widened:
        return None
    finished = len(study.get_trials(deepcopy=False, states=continuation.FINISHED_STATES))
    replaced = {"sweep.n_trials", *widened, *unset}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in replaced]
    new = [
        *kept,
        f"sweep.n_trials={finished + MORE_TRIALS}",
        *(f"{key}={expression}" for key, expression in widened.items()),
        *(f"{key}=null" for key in unset),
    ]
    wider = {key: to_distribution(key, expression) for key, expression in widened.items()}
    checked = {key: dist for key, dist in wider.items() if dist is not None}
    if continuation.incompatible(distributions, checked):
        return continuation.continuation_command(study.study_name, new)
    return " ".join(shlex.quote(word) for word in ["harness", "sweep", *new])


def is_numeric(dist: BaseDistribution) -> bool:
    if isinstance(dist, FloatDistribution | IntDistribution):
        return dist.high > dist.low
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices) > 1 and all(_is_number(c) for c in dist.choices)
    return False


def edge_of(value: Any, dist: BaseDistribution) -> str | None:
    """ "upper"/"lower" when ``value`` lies in the top/bottom 10% of the range (in log space for
    a log distribution; for numeric choices: the largest/smallest choice), else None."""
    if isinstance(dist, CategoricalDistribution):
        numbers: list[Any] = sorted(dist.choices)
        if value == numbers[-1]:
            return "upper"
        return "lower" if value == numbers[0] else None
    assert isinstance(dist, FloatDistribution | IntDistribution)
    low, high, value = float(dist.low), float(dist.high), float(value)
    if dist.log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    position = (value - low) / (high - low)
    if position >= 1 - EDGE_FRACTION:
        return "upper"
    return "lower" if position <= EDGE_FRACTION else None


def widen(
    key: str,
    dist: BaseDistribution,
    edge: str,
    limit: tuple[float | None, float | None] = (None, None),
) -> str | None:
    """``dist`` extended past ``edge`` as a sweep expression, or None when that edge is already
    at the key's limit. Log ranges extend by 10x, linear ones by half their width, numeric
    choices by a doubled (upper) or halved (lower) value."""
    if isinstance(dist, CategoricalDistribution):
        wider: BaseDistribution | None = _widen_choices(dist, edge, limit)
    else:
        assert isinstance(dist, FloatDistribution | IntDistribution)
        wider = _widen_range(dist, edge, limit)
    if wider is None:
        return None
    text = expression(wider)
    try:  # the suggestion must be a valid override for the same kind of distribution
        parsed = to_distribution(key, text)
    except SearchSpaceError:
        return None
    valid = VALID_RANGES.get(key)
    if valid is not None and not all(valid.holds(v) for v in extremes(wider)):
        return None  # an open limit (a learning rate of 0): the sweep would refuse it
    return text if type(parsed) is type(wider) else None


def _widen_range(
    dist: FloatDistribution | IntDistribution,
    edge: str,
    limit: tuple[float | None, float | None],
) -> BaseDistribution | None:
    low, high = dist.low, dist.high
    if dist.log:
        low, high = (low / 10, high) if edge == "lower" else (low, high * 10)
    else:
        half = (high - low) / 2
        if isinstance(dist, IntDistribution):  # a whole number of steps
            half = max(1, math.ceil(half / dist.step)) * dist.step
        elif dist.step is not None:
            half = max(1, math.ceil(half / dist.step - 1e-9)) * dist.step
        low, high = (low - half, high) if edge == "lower" else (low, high + half)
    low, high = _clamp(low, high, limit)
    if isinstance(dist, IntDistribution):
        low, high = math.ceil(low - 1e-9), math.floor(high + 1e-9)
    if dist.step is not None:  # the top stays on the grid of steps from the bottom
        high = low + math.floor((high - low) / dist.step + 1e-9) * dist.step
    if (edge == "lower" and low >= dist.low) or (edge == "upper" and high <= dist.high):
        return None  # nothing gained: that edge is a limit
    if isinstance(dist, IntDistribution):
        return IntDistribution(int(low), int(high), log=dist.log, step=dist.step)
    return FloatDistribution(low, high, log=dist.log, step=dist.step)


def _clamp(
    low: float, high: float, limit: tuple[float | None, float | None]
) -> tuple[float, float]:
    floor, ceiling = limit
    if floor is not None and low < floor:
        low = floor
    if ceiling is not None and high > ceiling:
        high = ceiling
    return low, high


def _widen_choices(
    dist: CategoricalDistribution, edge: str, limit: tuple[float | None, float | None]
) -> CategoricalDistribution | None:
    numbers: list[Any] = sorted(dist.choices)  # numeric: is_numeric checked them
    whole = all(isinstance(c, int) for c in numbers)
    if edge == "upper":
        top = numbers[-1]
        gap = top - numbers[-2]
        extra = top * 2 if top > 0 else top + gap  # doubled; a non-positive top: one step more
        if limit[1] is not None and extra > limit[1]:
            return None
    else:
        bottom = numbers[0]
        gap = numbers[1] - bottom
        extra = (bottom // 2 if whole else bottom / 2) if bottom > 0 else bottom - gap
        if extra == bottom or (limit[0] is not None and extra < limit[0]):
            return None
    return CategoricalDistribution(sorted([*numbers, extra]))


def expression(dist: BaseDistribution) -> str:
    """A distribution in Hydra's sweep grammar, as harness.search reads it back."""
    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(_number(c) for c in dist.choices)})"
    if isinstance(dist, IntDistribution):
        if dist.log:
            return f"tag(log, int(interval({dist.low}, {dist.high})))"
        # Hydra's range excludes its stop; Optuna's high is included
        stop = dist.high + dist.step
        step = "" if dist.step == 1 else f", {dist.step}"
        return f"range({dist.low}, {stop}{step})"
    assert isinstance(dist, FloatDistribution)
    low, high = _float(dist.low), _float(dist.high)
    if dist.step is not None:
        return f"range({low}, {_float(dist.high + dist.step)}, {_float(dist.step)})"
    text = f"interval({low}, {high})"
    return f"tag(log, {text})" if dist.log else text


def _float(value: float) -> str:
    """Short and still a float: 3e-4, 0.45, 1.0 (not 0.00030000000000000003, 0.0003 or 1)."""
    small_or_big = value != 0 and not 1e-2 <= abs(value) < 1e5
    text = f"{value:.6e}" if small_or_big else f"{value:.6g}"
    mantissa, _, exponent = text.partition("e")
    if exponent:
        mantissa = mantissa.rstrip("0").rstrip(".")
        text = f"{mantissa}e{int(exponent)}"
    return text if any(c in text for c in ".en") else f"{text}.0"


def _number(value: Any) -> str:
    return _float(value) if isinstance(value, float) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
