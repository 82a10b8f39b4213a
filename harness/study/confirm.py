"""The confirm step: the best ``sweep.confirm_top_k`` trials run again with
``sweep.confirm_seeds`` new seeds, so the champion is the params that win on average, not a
lucky seed. `harness sweep` runs it after its trials when confirm_top_k > 0; `harness confirm`
runs it alone on a study's finished trials.

- Config: each run is the trial's: this command's config with the trial's params and ``seed``.
  A trial whose recorded overrides differ from this command's in what a run trains (anything
  but sweep.*, paths.*, tracking.*, storage.*, name) is refused, naming the difference.
- Seeds: the study's ``seed`` + 1, + 2, ... skipping the trial's own seed, N of them. Only
  these new seeds rank a trial and measure noise: its own search run was picked for being
  the best draw (the winner's curse); its value is shown beside the mean.
- Each run is a child run of the study's parent MLflow run, role ``confirm`` (no Optuna
  trial), named confirm-trial-0007-seed-1, tagged ``harness.confirm_of`` (the trial) and
  ``harness.confirm_seed``; its params are the trial's and ``seed``. A value is stored in the
  Optuna study once its run succeeded (the format: harness.noise), so an interrupted confirm
  step goes on where it stopped, skipping the seeds done. A failed run is said and left out;
  the next invocation tries it again.
- Ranked on the first objective: a multi-objective study (a Pareto front) is refused.
- A paid backend spends money on every run: refused unless sweep.budget_usd caps the spend;
  the confirm runs count toward it as they spend (failed and interrupted ones too), and the
  step stops before a run would exceed it. It stops too once sweep.timeout_s is spent.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.backends.base import PaidBackend
from harness.config import SWITCHES, ConfigError, split_overrides, with_params
from harness.noise import CONFIRM_ATTR, CONFIRM_SPENT_ATTR, confirm_samples, confirmed_winner
from harness.storage import full_disk
from harness.study.plan import Plan
from harness.study.queries import count_finished, load_study, ranked_trials, study_spend
from harness.study.stop_rules import time_budget
from harness.study.trial import describe_failure, run_trial
from harness.tracking import Tracker, is_unreachable
from harness.tracking.records import ROLE_TAG

COMMAND_TOP_K = 3  # `harness confirm` with sweep.confirm_top_k=0 (the sweep's default: off)
# keys that say where runs are stored and how the sweep runs: no part of what a run trains
# (``name``: a continued study's trials recorded their first study's)
NOT_TRAINED = ("sweep.", "paths.", "tracking.", "storage.")
NOT_TRAINED_KEYS = {"name", *SWITCHES}


def trial_seed(cfg: DictConfig, trial: optuna.trial.FrozenTrial) -> int:
    """The seed the trial ran with: its param where seed is searched, else the study's (the
    command's ``seed``; check_same_run holds it to the trial's)."""
    return int(trial.params.get("seed", cfg.seed))


def confirm_seeds(cfg: DictConfig, own: int) -> list[int]:
    """The new seeds of a trial that ran with seed ``own``: the study's seed + 1, + 2, ...
    skipping ``own``, sweep.confirm_seeds of them (the same for every trial where it can)."""
    seeds: list[int] = []
    candidate = int(cfg.seed)
    while len(seeds) < int(cfg.sweep.confirm_seeds):
        candidate += 1
        if candidate != own:
            seeds.append(candidate)
    return seeds


def check_same_run(overrides: list[str], trial: optuna.trial.FrozenTrial) -> None:
    """Refuses to confirm a trial with a config it did not run with: its recorded overrides
    and this command's must agree on what a run trains (its searched params aside)."""
    recorded = trial.user_attrs.get("overrides")
    if recorded is None:  # carried from a study that recorded none: nothing to compare
        return
    mine = _trained(overrides, trial.params)
    theirs = _trained(list(recorded), trial.params)
    changed = [
        f"{key}: the trial ran with {theirs.get(key, 'its default')}, this command has "
        f"{mine.get(key, 'its default')}"
        for key in sorted(set(mine) | set(theirs))
        if mine.get(key) != theirs.get(key)
    ]
    if changed:
        raise ConfigError(
            f"trial {trial.number} ran with other overrides than this command:\n  "
            + "\n  ".join(changed)
            + "\nA confirm run repeats the trial with only the seed changed: give this command "
            "the trial's overrides (`harness best` prints them), or set sweep.confirm_top_k=0"
        )


def _trained(overrides: list[str], searched: dict[str, Any]) -> dict[str, str]:
    """key -> override line, of the plain overrides that change what a run trains."""
    kept: dict[str, str] = {}
    for line in split_overrides(overrides).plain:
        key = line.split("=", 1)[0].lstrip("+~")
        if key.startswith(NOT_TRAINED) or key in NOT_TRAINED_KEYS | set(searched) or "***" in line:
            continue  # a redacted secret is no setting: the real one comes from the environment
        kept[key] = line
    return kept


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
    if cfg.sweep.confirm_seeds < 2:
        raise ConfigError(
            f"sweep.confirm_seeds={cfg.sweep.confirm_seeds}: a trial is ranked by the mean and "
            "spread of its new seeds, and one run has no spread; set sweep.confirm_seeds=2 or more"
        )
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
    overrides: list[str]  # this command's, as the trials record theirs (redacted)
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
        for trial in top:
            check_same_run(self.overrides, trial)
        say = getattr(self, "on_confirm", lambda line: None)
        deadline = self._deadline()
        done = confirm_samples(study)
        todo = [
            (trial, seed)
            for trial in top
            for seed in confirm_seeds(self.cfg, trial_seed(self.cfg, trial))
            if seed not in done.get(trial.number, {})
        ]
        if todo and self.plan.prepared is None:  # a sweep with no trial left to run
            self.plan.prepared = self.plan.backend.prepare(self.cfg, self.plan.dataset)
        for trial, seed in todo:
            if not self._within_time(deadline) or not self._within_budget(study, trial):
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

    def _deadline(self) -> float | None:
        """When sweep.timeout_s is spent (time.monotonic): from the sweep's start where it
        keeps one (``started_at``), else from now."""
        timeout = self.cfg.sweep.timeout_s
        if timeout is None:
            return None
        started = getattr(self, "started_at", None)
        return (monotonic() if started is None else float(started)) + float(timeout)

    def _within_time(self, deadline: float | None) -> bool:
        if deadline is None or monotonic() < deadline:
            return True
        stop = time_budget(float(self.cfg.sweep.timeout_s))
        self.stop_rule = stop.rule
        self.stop_reason = f"{stop.message}; the confirm step stopped"
        return False

    def _confirm_run(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, seed: int, say: Any
    ) -> None:
        name = f"confirm-trial-{trial.number:04d}-seed-{seed}"
        tags = {
            **self.tags,
            ROLE_TAG: "confirm",  # no trial: report, resume and trial counts leave it out
            "harness.confirm_of": str(trial.number),
            "harness.confirm_seed": str(seed),
        }
        params = {**self.plan.fixed, **trial.params, "seed": seed}
        workdir = self.checkpoints / name
        spent_before = float(study.user_attrs.get(CONFIRM_SPENT_ATTR, 0.0))

        def spent(usd: float) -> None:  # as it spends: a failed or interrupted run counts too
            study.set_user_attr(CONFIRM_SPENT_ATTR, spent_before + usd)

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
                on_cost=spent,
                of_trial=False,
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
