"""Pruning for several objectives: a trial is stopped midway when, at an evaluation, its
objectives rank worse on the Pareto front than most finished trials' did at that evaluation.

Optuna cannot prune a multi-objective study (``Trial.report`` and ``should_prune`` raise
NotImplementedError there). The idea is OptunaHub's MultiMetricPruner (joint mode; Shuhei
Watanabe, MIT licence, optuna/optunahub-registry package/pruners/multi_metric_pruner at commit
3d1650b5aa5935e2b6d0ce2ac1d0239ceef12043): keep each trial's objective vector per step in its
user attributes, rank the vectors of a step by non-domination, and let a median rule decide on
the ranks. It is reimplemented here, not vendored (OptunaHub loads modules from GitHub at run
time; nothing here downloads), with two choices of our own: a trial on the front at the current
evaluation is never pruned, and the rank is compared at the current evaluation only (OptunaHub
hands its ranks to a base pruner, whose median rule uses the trial's best step so far).

Each evaluation's vector is its own user attribute (``harness_midway_<n>``, a short list of
floats): one small write per evaluation, stored by every Optuna storage (in-memory, journal,
RDB) and read by every worker's process, and nothing is rewritten as a trial goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.pruning import Evaluations

ATTR_PREFIX = "harness_midway_"  # + the evaluation's number (from 1): the objective vector

# The cost objectives' values midway (at evaluation n, what it took to get there), so a trial
# is compared with the others at the same point of training:
#   train/seconds  seconds since the trial's backend started (its final value: the whole run,
#                  less any time a provider held the job paused, which is not known midway)
#   train/steps    the training steps done so far
#   cost_usd       the spend the trial has reported so far (hosted backends report it as it
#                  accrues); an evaluation before any report of it is not ranked
# An eval/* objective is its value at the evaluation. A test/* objective is measured once, on
# the test split after training: it has no midway value and is left out of the midway rank.
RUNNING_COSTS = ("train/seconds", "train/steps", "cost_usd")


def midway_objectives(goals: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The objectives a trial can be ranked by at an evaluation: all but test/*."""
    return [(metric, direction) for metric, direction in goals if not metric.startswith("test/")]


def measures_quality_midway(goals: Sequence[tuple[str, str]]) -> bool:
    """A midway rank by cost alone would stop every slower trial whatever its quality: pruning
    needs at least one objective measured at evaluations (an eval/* metric)."""
    return any(metric not in RUNNING_COSTS for metric, _ in midway_objectives(goals))


def active(pruner_cfg: Any, goals: Sequence[tuple[str, str]]) -> bool:
    """Whether a multi-objective study with this pruner config prunes by Pareto rank."""
    return pruner_cfg.name != "none" and measures_quality_midway(goals)


def pruner_for_objectives(
    pruner_cfg: Any, goals: Sequence[tuple[str, str]], evaluations: Evaluations | None = None
) -> optuna.pruners.BasePruner:
    """The pruner of a multi-objective study: any pruner but ``none`` becomes a ParetoPruner with
    the config's n_startup_trials and its first decision where the named pruner's would come
    (``first_decision``); NopPruner for ``pruner=none`` or when no objective is measured at
    evaluations. ``evaluations``: the space's, for an ``auto`` setting (harness.pruning)."""
    if not active(pruner_cfg, goals):
        return optuna.pruners.NopPruner()
    return ParetoPruner(
        midway_objectives(goals),
        n_startup_trials=int(pruner_cfg.n_startup_trials),
        n_warmup_steps=first_evaluation(pruner_cfg, evaluations),
    )


def first_evaluation(pruner_cfg: Any, evaluations: Evaluations | None) -> int:
    """The evaluation of the first pruning decision: the named pruner's setting, ``auto`` the
    space's shortest trial's evaluations (1 where the space does not tell)."""
    value = pruner_cfg[first_decision(pruner_cfg)]
    if value == "auto":
        return evaluations.least if evaluations is not None else 1
    return int(value)


def first_decision(pruner_cfg: Any) -> str:
    """The setting that says at which evaluation the named pruner first decides: Hyperband's and
    ASHA's first rung (min_resource), the median rules' (and any other's) n_warmup_steps."""
    return "min_resource" if pruner_cfg.name in ("hyperband", "asha") else "n_warmup_steps"


def describe(
    pruner_cfg: Any, goals: Sequence[tuple[str, str]], evaluations: Evaluations | None = None
) -> str:
    """What pruning a multi-objective study gets, said once before the first trial ("" for
    pruner=none: nothing to say)."""
    name = pruner_cfg.name
    if name == "none":
        return ""
    if not measures_quality_midway(goals):
        return (
            f"pruning is off (pruner={name} ignored): no objective is measured at evaluations "
            "(test/* only after training; a rank by cost alone would stop every slower trial)."
        )
    ranked = ", ".join(metric for metric, _ in midway_objectives(goals))
    after = [metric for metric, _ in goals if metric.startswith("test/")]
    unranked = f" ({', '.join(after)}: measured after training, not ranked midway)" if after else ""
    key = first_decision(pruner_cfg)
    return (
        f"pruning by Pareto rank (pruner={name} with its n_startup_trials="
        f"{pruner_cfg.n_startup_trials}, first decision at evaluation "
        f"{first_evaluation(pruner_cfg, evaluations)} ({key}={pruner_cfg[key]})): "
        f"a trial whose {ranked} at an evaluation rank behind most completed trials' at that "
        f"evaluation stops{unranked}."
    )


def values_at(
    goals: Sequence[tuple[str, str]],
    metrics: Mapping[str, float],
    *,
    seconds: float,
    steps: int,
    cost_usd: float | None,
) -> list[float] | None:
    """The trial's vector of midway objectives at an evaluation (RUNNING_COSTS says what each
    cost is midway); None when one of them is not known there (that evaluation is not ranked)."""
    running: dict[str, float | None] = {
        "train/seconds": seconds,
        "train/steps": float(steps),
        "cost_usd": cost_usd,
    }
    values = []
    for metric, _ in goals:
        value = running[metric] if metric in RUNNING_COSTS else metrics.get(metric)
        if value is None or not math.isfinite(value):
            return None
        values.append(float(value))
    return values


class ParetoPruner(optuna.pruners.BasePruner):
    """Prunes a trial whose Pareto rank at an evaluation is worse than the median rank of the
    COMPLETE trials that reached that evaluation (ranks from 0, the front; all vectors of the
    step ranked together). A trial on the front of its step is never pruned. No pruning before
    ``n_startup_trials`` trials completed, nor at evaluations numbered (from 1) below
    ``n_warmup_steps``, nor when no completed trial reached this evaluation."""

    def __init__(
        self, goals: Sequence[tuple[str, str]], *, n_startup_trials: int, n_warmup_steps: int
    ) -> None:
        self.goals = list(goals)  # (metric, direction) in the order of each stored vector
        self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps
        # minimized: a maximized objective's values are negated before ranking
        self._signs = [-1.0 if direction == "maximize" else 1.0 for _, direction in goals]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Optuna's pruner interface: the trial's latest stored vector decides."""
        steps = [int(k[len(ATTR_PREFIX) :]) for k in trial.user_attrs if k.startswith(ATTR_PREFIX)]
        if not steps:
            return False
        step = max(steps)
        return self.should_prune(study, step, trial.user_attrs[f"{ATTR_PREFIX}{step}"])

    def should_prune(self, study: optuna.Study, step: int, values: Sequence[float]) -> bool:
        """Whether a running trial whose vector at evaluation ``step`` is ``values`` stops."""
        if step < self.n_warmup_steps:
            return False
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete or len(complete) < self.n_startup_trials:
            return False
        key = f"{ATTR_PREFIX}{step}"
        others = [
            t.user_attrs[key] for t in complete if len(t.user_attrs.get(key, ())) == len(self.goals)
        ]
        if not others:
            return False
        ranks = pareto_ranks([self._as_losses(v) for v in [*others, values]])
        mine, theirs = ranks[-1], sorted(ranks[:-1])
        median = (theirs[(len(theirs) - 1) // 2] + theirs[len(theirs) // 2]) / 2
        return mine > median  # ranks are >= 0: a trial on the front (0) never stops

    def _as_losses(self, values: Sequence[float]) -> tuple[float, ...]:
        return tuple(sign * float(v) for sign, v in zip(self._signs, values, strict=True))


def evaluations(trial: FrozenTrial) -> int:
    """How many evaluations of a multi-objective trial stored a vector (its learning curve's
    length, where Optuna's intermediate values are empty)."""
    return sum(1 for key in trial.user_attrs if key.startswith(ATTR_PREFIX))


def report_values(trial: optuna.Trial, step: int, values: Sequence[float]) -> None:
    """Stores a trial's midway vector at evaluation ``step`` where every worker reads it."""
    trial.set_user_attr(f"{ATTR_PREFIX}{step}", [float(v) for v in values])


def pareto_ranks(losses: Sequence[Sequence[float]]) -> list[int]:
    """Non-domination rank of each vector (all minimized): 0 for the front, 1 for the front of
    the rest, and so on. Quadratic per layer: a study's trials at one step are few."""
    ranks = [-1] * len(losses)
    left = set(range(len(losses)))
    rank = 0
    while left:
        front = {i for i in left if not any(dominates(losses[j], losses[i]) for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (all minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )
