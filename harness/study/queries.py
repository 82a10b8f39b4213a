"""Read-only questions about a stored study, asked by the sweep, report, display, champion and cli:
its objectives, best and ranked trials, counts, spend, and the command that repeats a trial."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig

from harness.config import ConfigError
from harness.noise import CONFIRM_SPENT_ATTR, Confirmed, confirmed_ranking, confirmed_winner
from harness.storage import describe_storage, existing_study

FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = optuna.trial.TrialState.RUNNING
# settings of a sweep that mean nothing to `harness train`
SWEEP_ONLY_KEYS = {
    "sweep.n_trials",
    "sweep.n_workers",
    "sweep.devices",
    "sweep.timeout_s",
    "sweep.budget_usd",
    "sweep.enqueue",
    "sweep.continue_from",
    "sweep.target",
    "sweep.stagnation_trials",
    "sweep.min_improvement",
    "sweep.budget_steps",
    "sweep.confirm_top_k",
    "sweep.confirm_seeds",
}


def load_study(cfg: DictConfig) -> optuna.Study:
    """The stored study ``cfg.name``; a ConfigError, and no file created, when there is none."""
    study = existing_study(cfg)
    if study is None:
        raise ConfigError(
            f"no study named {cfg.name!r} in {describe_storage(cfg)}; run "
            f"`harness sweep study={cfg.name}` first"
        )
    return study


def objectives(cfg: DictConfig) -> list[tuple[str, str]]:
    """(metric, direction) of each objective: sweep.objectives, else sweep.metric alone.
    A sweep computes them once (``Plan.objectives``); this is for commands without a plan."""
    if cfg.sweep.objectives:
        return [(str(k), str(v)) for k, v in cfg.sweep.objectives.items()]
    return [(str(cfg.sweep.metric), str(cfg.sweep.direction))]


def stored_objectives(
    study: optuna.Study, cfg: DictConfig, configured: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """The objectives a study was created with (older studies: the config's, ``configured``
    when the caller has them already)."""
    stored = study.user_attrs.get("objectives")
    if stored:
        return [(str(m), str(d)) for m, d in stored]
    return configured if configured is not None else objectives(cfg)


def count_finished(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED_STATES)


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial on the first objective: the study's best trial, and in a
    multi-objective study (which has a Pareto front, no single best) the front's end that is
    best on the objective listed first. None before any trial completes."""
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials, best first on the first objective (ties: the earlier trial)."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return ranked(study.get_trials(deepcopy=False), maximize)


def ranked(
    trials: Sequence[optuna.trial.FrozenTrial], maximize: bool
) -> list[optuna.trial.FrozenTrial]:
    """ranked_trials of these trials: the COMPLETE ones, best first (ties: the earlier)."""
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values]
    sign = 1.0 if maximize else -1.0
    return sorted(completed, key=lambda t: (-sign * t.values[0], t.number))


def best_of(
    trials: Sequence[optuna.trial.FrozenTrial], maximize: bool
) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial among these on the first objective; None without one."""
    ordered = ranked(trials, maximize)
    return ordered[0] if ordered else None


def reproduce_command(command: str, overrides: list[str], params: Mapping[str, Any]) -> str:
    """The `harness train` line that repeats a trial: the sweep's plain overrides + its params."""
    dropped = set(params) | SWEEP_ONLY_KEYS
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    words = ["harness", command, *kept, *(f"{k}={override_value(v)}" for k, v in params.items())]
    return " ".join(shlex.quote(w) for w in words)


def override_value(value: Any) -> str:
    """A param value as an override: floats in full (repr), so a trial repeats exactly."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class StudySummary:
    """What `harness sweep` and `harness best` print of a study, read once."""

    states: list[str]  # every trial's state name
    objectives: list[tuple[str, str]]
    best: optuna.trial.FrozenTrial | None  # best on the first objective
    multi: bool  # several objectives: ``shown`` is the Pareto front
    shown: list[optuna.trial.FrozenTrial]  # the best 5, or the front best-first
    paid: bool  # trials spent money: a cost column
    reproduce: str  # the `harness train` line that repeats the best trial ("" without one)
    best_model_uri: str  # "" when no model was logged
    # trials re-run with new seeds (harness.noise), best mean first; the winner's command
    confirmed: list[Confirmed] = field(default_factory=list)
    winner: Confirmed | None = None
    winner_reproduce: str = ""


def summarize(study: optuna.Study, goals: list[tuple[str, str]]) -> StudySummary:
    """The study's summary for printing: counts, the best trials, the command that repeats
    the best one (with the overrides of the invocation that ran it: a resume may have had
    others)."""
    trials = study.get_trials(deepcopy=False)
    ranked = ranked_trials(study)  # once: the best is its first
    best = ranked[0] if ranked else None
    multi = is_multi_objective(study)
    sign = 1.0 if goals[0][1] == "maximize" else -1.0
    front = sorted(study.best_trials, key=lambda t: -sign * t.values[0]) if multi else []
    shown = front if multi else ranked[:5]
    reproduce = ""
    if best is not None:
        overrides = list(best.user_attrs.get("overrides", study.user_attrs.get("overrides", [])))
        reproduce = reproduce_command("train", overrides, best.params)
    return StudySummary(
        states=[t.state.name for t in trials],
        objectives=goals,
        best=best,
        multi=multi,
        shown=shown,
        paid=any("cost_usd" in t.user_attrs for t in trials),
        reproduce=reproduce,
        best_model_uri=str(study.user_attrs.get("best_model_uri", "")),
        **({} if multi else _confirmed(study)),
    )


def _confirmed(study: optuna.Study) -> dict[str, Any]:
    """The confirm step's ranking and the command that repeats its winner (StudySummary's)."""
    winner = confirmed_winner(study)
    reproduce = ""
    if winner is not None:
        trial = study.get_trials(deepcopy=False)[winner.number]
        overrides = list(trial.user_attrs.get("overrides", study.user_attrs.get("overrides", [])))
        reproduce = reproduce_command("train", overrides, trial.params)
    return {"confirmed": confirmed_ranking(study), "winner": winner, "winner_reproduce": reproduce}


def study_spend(study: optuna.Study, exclude: int = -1) -> float:
    """USD spent by the study's trials: what finished ones cost, and for running ones (other
    workers) the larger of their spend so far and their estimate. A crashed trial whose retry
    has started is left out: the retry follows the same job and reports its whole cost."""
    trials = study.get_trials(deepcopy=False)
    taken_over = {
        t.user_attrs["harness_retry_of"]
        for t in trials
        if "harness_retry_of" in t.user_attrs and t.state != optuna.trial.TrialState.WAITING
    }
    billed = study.user_attrs
    total = 0.0
    for trial in trials:
        if trial.number == exclude or trial.number in taken_over:
            continue
        spent = float(trial.user_attrs.get("cost_usd", 0.0))
        if trial.state == optuna.trial.TrialState.RUNNING:
            spent = max(spent, float(trial.user_attrs.get("cost_estimate_usd", 0.0)))
        # an abandoned job's bill, read back once it was cancelled, replaces any estimate
        total += float(billed.get(billed_key(trial.number), spent))
    return total + float(billed.get(CONFIRM_SPENT_ATTR, 0.0))  # confirm runs (harness.noise)


def billed_key(number: int) -> str:
    """The study attr holding what trial ``number``'s abandoned job billed (one key per trial:
    workers setting them at once do not overwrite each other's)."""
    return f"harness_billed_usd_{number}"
