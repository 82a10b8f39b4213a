"""Stop rules: when a study stops starting trials before sweep.n_trials, as a normal end.

- sweep.target: a COMPLETE trial reached this value of the objective (>= when maximizing,
  <= when minimizing);
- sweep.stagnation_trials: that many finished trials in a row have not improved the best by more
  than the noise (Optuna's terminator idea): sweep.min_improvement, or else one seed-noise
  standard deviation (harness.noise.seed_noise: the confirm runs), or else 0;
- sweep.budget_steps: the study's finished trials have taken this many optimizer steps;
- sweep.timeout_s: this invocation ran this long (Optuna's own ``timeout``; only worded here).

Optuna's ``BestValueStagnationEvaluator`` counts any strict gain as an improvement (no noise
margin), and its noise-aware evaluators (``RegretBoundEvaluator``, ``EMMREvaluator``) fit a
Gaussian process after every trial: both miss "improved by more than the noise" or cost seconds
a trial, so the rule is a few lines here instead. Every rule reads the stored study, so it holds
for every worker of the study and for a resumed study before its first new trial.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import optuna
from omegaconf import DictConfig

from harness.config import ConfigError
from harness.noise import SeedNoise, seed_noise
from harness.study.queries import FINISHED_STATES, best_of

# what to do to go on past each rule: a stop rule is a normal end, not a failure to retry
HOW_TO_GO_ON = {
    "sweep.target": "raise or unset sweep.target to go on",
    "sweep.stagnation_trials": (
        "raise or unset sweep.stagnation_trials (or lower sweep.min_improvement) to go on"
    ),
    "sweep.budget_steps": "raise sweep.budget_steps to go on",
    "sweep.timeout_s": "run the same command to go on: it runs only the missing trials",
}
# what a command that goes on past a rule the study meets sets to null (the report's command
# that follows its advice): the rule, and the setting only that rule reads
UNSET_TO_GO_ON = {
    "sweep.target": ("sweep.target",),
    "sweep.stagnation_trials": ("sweep.stagnation_trials", "sweep.min_improvement"),
    "sweep.budget_steps": ("sweep.budget_steps",),
}


@dataclass(frozen=True)
class Stop:
    """A rule that stops the study: its config key and the sentence saying why."""

    rule: str
    message: str


def go_on(rule: str) -> str:
    """How a study stopped by ``rule`` goes on (the sweep's closing line)."""
    return f"stopped by {rule}; {HOW_TO_GO_ON[rule]}"


def check_stop_rules(cfg: DictConfig, goals: list[tuple[str, str]]) -> None:
    """Settings no range check can refuse (ranges: harness.config.VALID_RANGES). A study with
    several objectives has a Pareto front and no single best value, so a target or stagnation
    of one objective would end the search of the trade-off for a reason it does not measure."""
    s = cfg.sweep
    for key in ("target", "stagnation_trials"):
        if s[key] is not None and len(goals) > 1:
            raise ConfigError(
                f"sweep.{key}={s[key]} needs one objective; this study has "
                f"{len(goals)} (sweep.objectives). Unset sweep.{key}, or use sweep.budget_steps "
                "or sweep.timeout_s to bound a multi-objective study"
            )
    if s.min_improvement is not None and s.stagnation_trials is None:
        raise ConfigError(
            f"sweep.min_improvement={s.min_improvement} is the noise of the stagnation rule: "
            "set sweep.stagnation_trials too, or unset sweep.min_improvement"
        )


def any_rule(cfg: DictConfig) -> bool:
    """Whether a rule that reads the study is set (none: no read after each trial)."""
    s = cfg.sweep
    return any(v is not None for v in (s.target, s.stagnation_trials, s.budget_steps))


def stop_rule_met(
    cfg: DictConfig, study: optuna.Study, goal: tuple[str, str], before_start: bool = False
) -> Stop | None:
    """The first rule the stored study meets (target, stagnation, step budget), or None.
    ``before_start``: asked before this invocation starts a trial (a resumed study)."""
    stop = next(rules_met(cfg, study, goal), None)
    if stop is not None and before_start:
        return Stop(stop.rule, f"{stop.message} (before this sweep: no trial started)")
    return stop


def rules_met(cfg: DictConfig, study: optuna.Study, goal: tuple[str, str]) -> Iterator[Stop]:
    """Each rule the stored study meets (target, stagnation, step budget), judged one at a time
    as asked for: stop_rule_met, after every trial, takes only the first. A sweep that resumes
    or continues the study with any of them set stops before its first trial."""
    trials = study.get_trials(deepcopy=False, states=FINISHED_STATES)
    trials.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))
    judges = (
        lambda: target_reached(trials, cfg.sweep.target, goal),
        lambda: stagnated(trials, cfg, goal, study),  # reads the confirm runs' noise
        lambda: steps_spent(trials, cfg.sweep.budget_steps),
    )
    return (stop for judge in judges if (stop := judge()) is not None)


def target_reached(
    trials: list[optuna.trial.FrozenTrial], target: float | None, goal: tuple[str, str]
) -> Stop | None:
    metric, direction = goal
    best = best_of(trials, direction == "maximize")
    if target is None or best is None:
        return None
    value = best.values[0]
    reached = value >= target if direction == "maximize" else value <= target
    if not reached:
        return None
    sign = ">=" if direction == "maximize" else "<="
    return Stop(
        "sweep.target",
        f"target reached: trial {best.number}'s {metric} {value:.4g} {sign} "
        f"sweep.target {target:g}",
    )


def stagnated(
    trials: list[optuna.trial.FrozenTrial],
    cfg: DictConfig,
    goal: tuple[str, str],
    study: optuna.Study,
) -> Stop | None:
    """The best has not improved by more than the noise over the last sweep.stagnation_trials
    finished trials (pruned ones included: they improved nothing), against the best before
    them. No completed trial before them: the first completion is no stagnation."""
    window = cfg.sweep.stagnation_trials
    metric, direction = goal
    if window is None or len(trials) <= window:
        return None
    maximize = direction == "maximize"
    before, now = best_of(trials[:-window], maximize), best_of(trials, maximize)
    if before is None or now is None:
        return None
    noise, source = margin(cfg.sweep.min_improvement, seed_noise(study))
    gain = now.values[0] - before.values[0]
    if (gain if direction == "maximize" else -gain) > noise:
        return None
    return Stop(
        "sweep.stagnation_trials",
        f"stagnation: the best {metric} ({now.values[0]:.4g}, trial {now.number}) has not "
        f"improved by more than {noise:.4g} ({source}) in the last {window} trials",
    )


def steps_spent(trials: list[optuna.trial.FrozenTrial], budget: int | None) -> Stop | None:
    """The optimizer steps the finished trials took (user attr "steps": a pruned trial's up to
    where it stopped) against sweep.budget_steps."""
    if budget is None:
        return None
    spent = sum(int(t.user_attrs.get("steps", 0)) for t in trials)
    if spent < budget:
        return None
    return Stop(
        "sweep.budget_steps",
        f"step budget: the study's trials took {spent} optimizer steps of "
        f"sweep.budget_steps={budget}",
    )


def time_budget(timeout_s: float) -> Stop:
    return Stop("sweep.timeout_s", f"time budget: sweep.timeout_s={timeout_s:g} reached")


def margin(configured: float | None, noise: SeedNoise | None) -> tuple[float, str]:
    """The gain stagnation asks for, and where it came from: sweep.min_improvement if set;
    else one seed-noise sd (harness.noise.seed_noise, from the confirm runs); else 0 (any gain
    counts)."""
    if configured is not None:
        return float(configured), "the noise: sweep.min_improvement"
    if noise is not None:
        return noise.sd, f"the noise: seed noise, {noise.describe()}"
    return 0.0, "no noise estimate: no confirm runs"
