"""The confirm step: the best ``sweep.confirm_top_k`` trials run again with
``sweep.confirm_seeds`` new seeds, so the champion is the params that win on average, not a
lucky seed. `harness sweep` runs it after its trials when confirm_top_k > 0; `harness confirm`
runs it alone on a study's finished trials.

- Seeds: the study's ``seed`` + 1 ... + N. The trial's own run counts as one more sample (its
  seed, the study's ``seed``), so a trial is ranked on N + 1 values.
- Each run is a child run of the study's parent MLflow run, named confirm-trial-0007-seed-1,
  tagged ``harness.confirm_of`` (the trial) and ``harness.confirm_seed``; its params are the
  trial's and ``seed``. Values are stored in the Optuna study as each run ends (the format:
  harness.noise), so an interrupted confirm step goes on where it stopped, skipping the seeds
  done. A failed run is said and left out; the next invocation tries it again.
- Ranked on the first objective: a multi-objective study (a Pareto front) is refused.
- A paid backend spends money on every run: refused unless sweep.budget_usd caps the spend;
  the confirm runs count toward it, and the step stops before a run would exceed it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.backends.base import PaidBackend
from harness.config import ConfigError, with_params
from harness.noise import (
    CONFIRM_ATTR,
    CONFIRM_SPENT_ATTR,
    confirm_samples,
    confirmed_winner,
)
from harness.storage import full_disk
from harness.study.plan import Plan
from harness.study.queries import count_finished, load_study, ranked_trials, study_spend
from harness.study.trial import describe_failure, run_trial
from harness.tracking import Tracker, is_unreachable

COMMAND_TOP_K = 3  # `harness confirm` with sweep.confirm_top_k=0 (the sweep's default: off)


def confirm_seeds(cfg: DictConfig) -> list[int]:
    """The new seeds: the study's seed + 1 ... + sweep.confirm_seeds."""
    return [int(cfg.seed) + i for i in range(1, int(cfg.sweep.confirm_seeds) + 1)]


def confirm_overrides(cfg: DictConfig) -> list[str]:
    """What `harness confirm` adds to its overrides to make `harness sweep` run the confirm
    step alone: no more trials than the study has finished, and K (COMMAND_TOP_K unless
    sweep.confirm_top_k says)."""
    study = load_study(cfg)
    if not ranked_trials(study):
        raise ConfigError(f"study {cfg.name!r} has no complete trial to confirm yet")
    top_k = cfg.sweep.confirm_top_k or COMMAND_TOP_K
    return [f"sweep.n_trials={count_finished(study)}", f"sweep.confirm_top_k={top_k}"]


def check_confirm(cfg: DictConfig, plan: Plan) -> None:
    """Refuses a confirm step it cannot rank or must not pay for, before anything is written."""
    if cfg.sweep.confirm_top_k <= 0:
        return
    if len(plan.objectives) > 1:
        raise ConfigError(
            "sweep.confirm_top_k: a multi-objective study has a Pareto front, no single order "
            "to confirm; set sweep.confirm_top_k=0 (or confirm a study with one objective)"
        )
    if isinstance(plan.backend, PaidBackend) and cfg.sweep.budget_usd is None:
        runs = cfg.sweep.confirm_top_k * cfg.sweep.confirm_seeds
        raise ConfigError(
            f"sweep.confirm_top_k={cfg.sweep.confirm_top_k}: the confirm step runs {runs} more "
            f"paid jobs on {plan.backend.name}; set sweep.budget_usd to cap what the study may "
            "spend (confirm runs count toward it), or sweep.confirm_top_k=0"
        )


class ConfirmStep:
    """The confirm half of a Sweep (a mixin: it reads the sweep's config, plan, tracker, parent
    run and tags, and records why it stopped)."""

    cfg: DictConfig
    plan: Plan
    tracker: Tracker
    parent_id: str
    tags: dict[str, str]
    checkpoints: Path
    uid: str
    stop_reason: str
    stop_rule: str  # the stop rule that ended the study, if one did (harness.study.stop_rules)
    on_confirm: Callable[[str], None]  # each confirm run's result, as a line (cli: printed)

    def _confirm(self, study: optuna.Study) -> None:
        """Runs the seeds each of the top trials is missing (the ranking: StudySummary)."""
        top = ranked_trials(study)[: self.cfg.sweep.confirm_top_k]
        if self.cfg.sweep.confirm_top_k <= 0 or not top or self._stopped_short():
            return
        say = getattr(self, "on_confirm", lambda line: None)
        done = confirm_samples(study)
        for trial in top:  # its own run: the sample of the study's seed
            if int(self.cfg.seed) not in done.get(trial.number, {}):
                self._store_sample(study, trial.number, int(self.cfg.seed), trial.values[0])
        todo = [
            (trial, seed)
            for trial in top
            for seed in confirm_seeds(self.cfg)
            if seed not in done.get(trial.number, {})
        ]
        if todo and self.plan.prepared is None:  # a sweep with no trial left to run
            self.plan.prepared = self.plan.backend.prepare(self.cfg, self.plan.dataset)
        for trial, seed in todo:
            if not self._within_budget(study, trial):
                break
            self._confirm_run(study, trial, seed, say)
        winner = confirmed_winner(study)
        if winner is not None:  # beside best_trial: what +from_best retrains
            self.tracker.set_tag(self.parent_id, "confirmed_winner", str(winner.number))

    def _stopped_short(self) -> bool:
        """The study stopped by its money budget, a provider, a failure or sweep.timeout_s
        (said as it ends): no more runs. A stop rule's normal end (sweep.target, stagnation,
        sweep.budget_steps) still confirms its best trials."""
        return bool(self.stop_reason) and self.stop_rule in ("", "sweep.timeout_s")

    def _confirm_run(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, seed: int, say: Any
    ) -> None:
        name = f"confirm-trial-{trial.number:04d}-seed-{seed}"
        tags = {
            **self.tags,
            "harness.confirm_of": str(trial.number),
            "harness.confirm_seed": str(seed),
        }
        params = {**self.plan.fixed, **trial.params, "seed": seed}
        workdir = self.checkpoints / name
        try:
            result, _ = run_trial(
                self.plan,
                self.tracker,
                params,
                trial.number,
                name,
                workdir,
                tags,
                parent_id=self.parent_id,
                save_model=False,
                key=f"{self.uid}-{name}",
            )
        except Exception as exc:
            if is_unreachable(exc) or full_disk(exc) is not None:
                raise  # every next run would fail the same way: the study stops (see Sweep)
            say(f"{name} failed: {describe_failure(exc)[:300]} (the next confirm retries it)")
            return
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        value = float(result.metrics[self.plan.objectives[0][0]])
        self._store_sample(study, trial.number, seed, value)
        if "cost_usd" in result.metrics:
            spent = float(study.user_attrs.get(CONFIRM_SPENT_ATTR, 0.0))
            study.set_user_attr(CONFIRM_SPENT_ATTR, spent + float(result.metrics["cost_usd"]))
        say(f"{name}: {self.plan.objectives[0][0]} = {value:.4g}")

    def _store_sample(self, study: optuna.Study, number: int, seed: int, value: float) -> None:
        stored = dict(study.user_attrs.get(CONFIRM_ATTR, {}))
        stored[str(number)] = {**stored.get(str(number), {}), str(seed): float(value)}
        study.set_user_attr(CONFIRM_ATTR, stored)

    def _within_budget(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """A paid run is started only if its estimate keeps the study within sweep.budget_usd
        (the trials' spend and the confirm runs' so far, harness.study.queries.study_spend)."""
        backend, budget = self.plan.backend, self.cfg.sweep.budget_usd
        if not isinstance(backend, PaidBackend) or budget is None:
            return True
        run_cfg = with_params(self.cfg, {**self.plan.fixed, **trial.params})
        estimate = float(backend.estimate_cost_usd(run_cfg, self.plan.prepared))
        spent = study_spend(study)
        if spent + estimate <= budget:
            return True
        self.stop_reason = (
            f"budget: a confirm run of trial {trial.number} would cost ~${estimate:.4f} and the "
            f"study has spent ${spent:.4f} of sweep.budget_usd=${budget:.2f}; the confirm step "
            "stopped. Raise sweep.budget_usd to go on."
        )
        return False
