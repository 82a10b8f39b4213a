"""Pruners, with their resources derived from the search space rather than guessed.

Optuna's step for a harness trial is the evaluation's index (1, 2, ...): trials of different batch
sizes are compared at the same point. How many evaluations a trial makes follows from its
epochs, batch size and ``train.eval_every_steps``, so the space tells, before any trial, how
many evaluations its shortest and its longest trial make. ``auto`` settings use that:

- Hyperband's ``max_resource`` is the longest trial's evaluations (Optuna's own ``auto`` takes the
  first trial's, which depends on what the sampler happened to draw first);
- ``pruner.min_resource: auto`` (Hyperband, ASHA) and ``pruner.n_warmup_steps: auto`` (median,
  patient) put the first pruning decision at the shortest trial's last evaluation: learning
  curves of fine-tuning runs cross (a larger learning rate or longer schedule starts worse and
  ends better; Wu et al. 2018 on short-horizon bias), and a decision after the first evaluation
  mostly keeps the slow starters out.

``patient`` is the median rule made patient: a trial is pruned only when it is below the median
*and* has not improved for ``pruner.patience`` evaluations, so a curve still climbing is left to
cross.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution

from harness.search import SearchSpaceError

PRUNERS = ("median", "patient", "hyperband", "asha", "none")


@dataclass(frozen=True)
class Evaluations:
    """How many evaluations the shortest and the longest trial of a space make."""

    least: int
    most: int


def _values(key: str, cfg_value: Any, distributions: Mapping[str, BaseDistribution]) -> list[int]:
    """The values a key takes in the space: its choices, its range's ends, or its fixed value."""
    dist = distributions.get(key)
    if dist is None:
        return [int(cfg_value)]
    if isinstance(dist, CategoricalDistribution):
        return [int(v) for v in dist.choices]  # type: ignore[arg-type]  # ints: the schema's
    return [int(dist.low), int(dist.high)]  # type: ignore[attr-defined]


def evaluation_range(
    train: Any, distributions: Mapping[str, BaseDistribution], train_rows: int
) -> Evaluations:
    """Evaluations of the shortest and longest trial the space allows, as the local and fake
    backends evaluate: every epoch, or every ``train.eval_every_steps`` steps and at the end;
    ``train.max_steps`` caps a trial. (Early stopping can end a trial sooner.)"""
    epochs = _values("train.epochs", train.epochs, distributions)
    batches = _values("train.batch_size", train.batch_size, distributions)
    every = int(train.eval_every_steps)

    def evaluations(n_epochs: int, batch_size: int) -> int:
        per_epoch = math.ceil(max(1, train_rows) / max(1, batch_size))
        steps = n_epochs * per_epoch
        if train.max_steps > 0:
            steps = min(steps, int(train.max_steps))
        return max(1, math.ceil(steps / (every or per_epoch)))

    counts = [evaluations(e, b) for e in epochs for b in batches]
    return Evaluations(min(counts), max(counts))


class PatientPruner(optuna.pruners.BasePruner):
    """Asks the wrapped pruner only once a trial's best of its last ``patience`` evaluations is no
    better than its best before them. (Optuna's PatientPruner asks only when the curve *fell*: a
    flat one counts as improving, and a model stuck at chance level, which reports the same
    value at every evaluation, is the trial most worth pruning.)"""

    def __init__(self, wrapped: optuna.pruners.BasePruner, patience: int) -> None:
        self.wrapped, self.patience = wrapped, patience

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        values = [v for _, v in sorted(trial.intermediate_values.items()) if not math.isnan(v)]
        if len(values) <= self.patience:
            return False
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        before, recent = values[: -self.patience or None], values[-self.patience :]
        if self.patience and max(sign * v for v in recent) > max(sign * v for v in before):
            return False
        return self.wrapped.prune(study, trial)


def _resource(pruner_cfg: Any, key: str, auto: int) -> int:
    """A pruner setting that may be auto (its range is checked with the config's:
    harness.config.VALID_RANGES)."""
    value = pruner_cfg[key]
    return auto if value == "auto" else int(value)


def make_pruner(
    pruner_cfg: Any, evaluations: Evaluations | None = None, name: str | None = None
) -> optuna.pruners.BasePruner:
    """The pruner a config's ``pruner`` group describes (``name`` replaces its name); its
    settings' defaults are conf/config.yaml's ``pruner:``. Without ``evaluations`` (a backend
    whose evaluations the space does not tell), ``auto`` means 1 and Hyperband's ``auto``."""
    name = name or pruner_cfg.name
    least = evaluations.least if evaluations else 1
    if name in ("median", "patient"):
        median = optuna.pruners.MedianPruner(
            n_startup_trials=pruner_cfg.n_startup_trials,
            n_warmup_steps=_resource(pruner_cfg, "n_warmup_steps", least),
        )
        if name == "median":
            return median
        return PatientPruner(median, int(pruner_cfg.patience))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=_resource(pruner_cfg, "min_resource", least),
            max_resource=evaluations.most if evaluations else "auto",
            reduction_factor=pruner_cfg.reduction_factor,
        )
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=_resource(pruner_cfg, "min_resource", least),
            reduction_factor=pruner_cfg.reduction_factor,
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchSpaceError(f"unknown pruner {name!r}: use {', '.join(PRUNERS)}")
