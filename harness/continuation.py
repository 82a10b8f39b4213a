"""Changing a study's search space: in place where Optuna allows it, else a continuation study.

Within one study Optuna keeps each parameter's distribution kind, its log scale and, for a
choice, its list of choices. Widening an interval or a range keeps all three, so the study goes
on in place: new trials are sampled in the new range and the old ones still inform the sampler.
Adding a choice (what the report's advice suggests for ``choice(8, 16, 32)``) changes the list,
which Optuna refuses mid-study. Such a study continues as a new one,
``harness sweep name=NEW sweep.continue_from=OLD ...``: it starts with OLD's finished trials
whose values the new space holds (their params, values, learning curves and attributes, so the
sampler learns from them and they count toward sweep.n_trials) and records its runs under OLD's
MLflow experiment.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    check_distribution_compatibility,
)

FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
CONTINUE_KEY = "sweep.continue_from"


def holds(dist: BaseDistribution, value: Any) -> bool:
    """Whether a value lies in a distribution (a choice among its choices; a number within the
    bounds and on the step of a range), written out with the distributions' public fields."""
    try:
        internal = dist.to_internal_repr(value)  # a choice: its index; refused if not one
    except (ValueError, TypeError):
        return False
    if isinstance(dist, CategoricalDistribution):
        return True
    if not isinstance(dist, (FloatDistribution, IntDistribution)):
        return False
    if not dist.low <= internal <= dist.high:
        return False
    if dist.step is None:
        return True
    if isinstance(dist, IntDistribution):
        return (internal - dist.low) % dist.step == 0
    k = (internal - dist.low) / dist.step  # as Optuna rounds a float step
    return abs(k - round(k)) < 1.0e-8


def stored_distributions(study: optuna.Study) -> dict[str, BaseDistribution]:
    """Each searched key's distribution as the study's latest trials used it."""
    stored: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        stored.update(trial.distributions)
    return stored


def incompatible(
    stored: Mapping[str, BaseDistribution], current: Mapping[str, BaseDistribution]
) -> list[str]:
    """``key: old -> new`` for each key whose distribution cannot change within the study."""
    from harness.advice import expression

    lines = []
    for key, dist in current.items():
        old = stored.get(key)
        if old is None:
            continue
        try:
            check_distribution_compatibility(old, dist)
        except ValueError:
            lines.append(f"{key}: {expression(old)} -> {expression(dist)}")
    return lines


def continuation_name(study: str) -> str:
    """``sentiment_tiny`` -> ``sentiment_tiny-2``; ``sentiment_tiny-2`` -> ``sentiment_tiny-3``."""
    stem, _, number = study.rpartition("-")
    if stem and number.isdigit():
        return f"{stem}-{int(number) + 1}"
    return f"{study}-2"


def continuation_command(study: str, overrides: Sequence[str], *extra: str) -> str:
    """The `harness sweep` command that continues ``study`` as a new study with ``overrides``
    (which hold the new space) and ``extra`` overrides after them."""
    dropped = {"name", CONTINUE_KEY}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    words = [
        "harness",
        "sweep",
        *kept,
        *extra,
        f"name={continuation_name(study)}",
        f"{CONTINUE_KEY}={study}",
    ]
    return " ".join(shlex.quote(w) for w in words)


def carried_trials(
    source: optuna.Study,
    cfg: DictConfig,
    distributions: Mapping[str, BaseDistribution],
) -> tuple[list[optuna.trial.FrozenTrial], int]:
    """The finished trials of ``source`` that are trials of this study too, rebuilt with this
    space's distributions, and how many were left out: a trial is carried when the new space
    holds each of its searched values and each key no longer searched had the value this
    config now gives it."""
    carried, dropped = [], 0
    for trial in source.get_trials(deepcopy=False, states=FINISHED_STATES):
        params = {}
        fits = True
        for key, value in trial.params.items():
            dist = distributions.get(key)
            if dist is not None:
                fits = fits and holds(dist, value)
                params[key] = value
            else:
                fits = fits and OmegaConf.select(cfg, key) == value
        if not fits:
            dropped += 1
            continue
        carried.append(
            optuna.trial.FrozenTrial(
                number=0,  # numbered by the new study
                state=trial.state,
                value=None,
                values=trial.values,
                datetime_start=trial.datetime_start,
                datetime_complete=trial.datetime_complete,
                params=params,
                distributions={key: distributions[key] for key in params},
                user_attrs={
                    **trial.user_attrs,
                    "harness_carried_from": {"study": source.study_name, "number": trial.number},
                },
                system_attrs={},
                intermediate_values=dict(trial.intermediate_values),
                trial_id=0,
            )
        )
    return carried, dropped
