"""Warm starts (sweep.enqueue): param sets tried before the sampler's own, written out or taken
from another study's best trials; and reading another study of the same storage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.config import ConfigError
from harness.continuation import holds
from harness.storage import describe_storage, existing_study
from harness.study.plan import Plan, checked_param_sets
from harness.study.queries import ranked_trials


class WarmStart:
    """The warm-start half of a Sweep (a mixin: it reads the sweep's config and plan)."""

    cfg: DictConfig
    plan: Plan
    warm_sets: list[dict[str, Any]]

    def _warm_sets(self) -> list[dict[str, Any]]:
        """sweep.enqueue: param sets to try before the sampler's own. ``{from_study: OTHER,
        top: N}`` takes OTHER's N best trials, keeping the keys this study searches and the
        values its ranges hold."""
        sets: list[dict[str, Any]] = []
        for item in self.cfg.sweep.enqueue:
            if not isinstance(item, Mapping):
                raise ConfigError(
                    f"sweep.enqueue: {item!r} is not a param set; write "
                    "'sweep.enqueue=[{train.learning_rate: 1e-3}]' or [{from_study: NAME}]"
                )
            item = dict(item)
            if "from_study" not in item:
                sets.append(item)
                continue
            other = str(item["from_study"])
            taken = self._best_params_of(other, int(item.get("top", 3)))
            sets += taken
            self.plan.notices.append(
                f"warm start: {len(taken)} param set(s) from study {other!r} tried first"
            )
        return checked_param_sets(self.plan, sets)

    def _warm_start(self, study: optuna.Study) -> None:
        """Enqueues the warm-start sets once per study: a resume does not enqueue them again
        (the flag; skip_if_exists alone would re-enqueue a set whose trial failed)."""
        if not self.warm_sets or study.user_attrs.get("harness_warm_started"):
            return
        for params in self.warm_sets:
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr("harness_warm_started", True)

    def _other_study(self, name: str, setting: str) -> optuna.Study:
        """Another study in this study's storage, which ``setting`` names; read, never made."""
        other_cfg = self.cfg.copy()
        other_cfg.name = name
        other = existing_study(other_cfg)
        if other is None:
            raise ConfigError(
                f"{setting}: no study named {name!r} in {describe_storage(other_cfg)}"
            )
        return other

    def _best_params_of(self, name: str, top: int) -> list[dict[str, Any]]:
        ranked = ranked_trials(self._other_study(name, "sweep.enqueue"))
        sets = []
        for trial in ranked[:top]:
            params = {}
            for key, value in trial.params.items():
                dist = self.plan.distributions.get(key)
                if dist is not None and holds(dist, value):
                    params[key] = value
            if params:
                sets.append(params)
        return sets
