"""A study's plan: everything checked before the first trial, and what the trials share.

Search-space expressions, which keys the backend can tune, the types sampled values will have,
the objectives (computed once, here), the dataset, and a stored study's identity and space.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig

from harness import continuation, search
from harness.backends.base import Backend, PaidBackend, check_tunable
from harness.checks import check_space_ranges
from harness.config import ConfigError, with_params
from harness.continuation import holds
from harness.data import Dataset, load_dataset
from harness.fingerprint import differences, fingerprint, suggested_name
from harness.metrics import GENERATED_TEXT_METRICS, SCORED_METRICS
from harness.pruning import Evaluations, evaluation_range, make_pruner
from harness.storage import describe_storage
from harness.study.queries import count_finished, objectives, stored_objectives

# Final metrics every trial has besides its task's: what a multi-objective study may trade
# against quality (money, time, compute).
COST_METRICS = ("cost_usd", "train/seconds", "train/steps")


def make_backend(cfg: DictConfig) -> Backend:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        backend: Backend = instantiate(cfg.backend)
    except InstantiationException as exc:  # e.g. a backend.* key the backend does not take
        if isinstance(exc.__cause__, ConfigError):  # the backend's own check of a value
            raise exc.__cause__ from None
        hint = ""
        if "unexpected keyword argument" in str(exc) or "required keyword-only" in str(exc):
            hint = (
                f"\nconf/backend/ lists the keys {cfg.backend._target_} takes. An API key is "
                "read from the environment (backend.api_key_env), never from the config."
            )
        raise ConfigError(f"backend={cfg.backend._target_}: {exc}{hint}") from exc
    return backend


@dataclass
class Plan:
    """A validated study: what to search, what is fixed, the backend, the data."""

    cfg: DictConfig  # fixed values of the space applied
    distributions: dict[str, optuna.distributions.BaseDistribution]
    fixed: dict[str, Any]  # keys of the space given a plain value
    backend: Backend
    dataset: Dataset
    fingerprint: dict[str, Any]  # what defines the study (harness.fingerprint)
    prepared: Any = None
    notices: list[str] = field(default_factory=list)  # said once before the first trial
    # (metric, direction) of each objective, the first one Optuna's value: from the config
    objectives: list[tuple[str, str]] = field(default_factory=list)
    # evaluations of the space's shortest and longest trial (the pruner's resources); None for a
    # hosted backend, whose provider decides when to evaluate
    evaluations: Evaluations | None = None

    def __post_init__(self) -> None:
        if not self.objectives:  # a Plan made by hand: the config's (plan_study passes them)
            self.objectives = objectives(self.cfg)


def plan_study(cfg: DictConfig) -> Plan:
    """Validates everything a study needs before the first trial; raises with a clear message."""
    space = dict(cfg.search.space)
    distributions = search.to_distributions(space)
    fixed = search.fixed_values(space)
    cfg = with_params(cfg, fixed)
    backend = make_backend(cfg)
    check_tunable(backend.name, backend.tunable_keys(cfg), distributions)
    backend.check_config(cfg, frozenset(distributions))
    if isinstance(backend, PaidBackend):  # first: counting tokens for the data checks caches files
        backend.check_credentials()
    _check_sampled_values(cfg, space, distributions)
    check_space_ranges(space, distributions, fixed)
    goals = objectives(cfg)
    notices = _check_objectives(cfg, goals, backend)
    _check_sweep_settings(cfg, backend)
    dataset = load_dataset(cfg.data, backend.example_check(cfg))
    _check_reported(cfg, goals, backend, dataset)
    identity = fingerprint(cfg, dataset, backend.name, goals)
    evaluations = None
    if not isinstance(backend, PaidBackend):
        evaluations = evaluation_range(cfg.train, distributions, len(dataset.train))
    make_pruner(cfg.pruner, evaluations)  # its settings checked before anything is written
    return Plan(
        cfg, distributions, fixed, backend, dataset, identity, None, notices, goals, evaluations
    )


def _check_sampled_values(
    cfg: DictConfig,
    space: dict[str, Any],
    distributions: dict[str, optuna.distributions.BaseDistribution],
) -> None:
    for key, dist in distributions.items():  # the schema must accept every value sampled
        for value in search.extremes(dist):
            try:
                with_params(cfg, {key: value})
            except Exception as exc:
                raise ConfigError(
                    f"search space {key}={space[key]}: {value!r} is not valid for this key: {exc}"
                ) from exc


def _check_sweep_settings(cfg: DictConfig, backend: Backend) -> None:
    """sweep.metric, sweep.direction and sweep.n_workers with its storage."""
    task = cfg.data.task
    metrics = (
        *backend.eval_metrics(task),
        *backend.eval_metrics_on_demand(task),
        *held_out_metrics(backend, task),
    )
    if cfg.sweep.metric not in metrics:
        raise ConfigError(
            f"sweep.metric={cfg.sweep.metric} is not measured at evaluations of a {task} task "
            f"by backend {backend.name}{_text_metric_hint(cfg.sweep.metric, task)}; choose one "
            f"of {', '.join(metrics)}"
        )
    if cfg.sweep.n_workers > 1 and str(cfg.storage.url or "").startswith("sqlite"):
        raise ConfigError(
            "sweep.n_workers > 1 needs a storage that is safe for parallel workers; SQLite is "
            'not ("database is locked"). Leave storage.url unset (a journal file) or use '
            "postgresql://..."
        )
    if cfg.sweep.direction not in ("maximize", "minimize"):
        raise ConfigError(
            f"sweep.direction must be maximize or minimize, not {cfg.sweep.direction!r}"
        )


def held_out_metrics(backend: Backend, task: str) -> tuple[str, ...]:
    """test/* metrics sweep.metric may name: a hosted job's one final model is scored on the
    test split once it is over (harness.backends.hosted.score_chats), with no checkpoint to
    choose among and nothing to prune on midway, so a held-out task metric can be the
    objective itself (test/preferred_rate of a preference study, not the provider's loss). A
    local trial keeps its best evaluation by sweep.metric: an eval/* metric there."""
    if not isinstance(backend, PaidBackend):
        return ()
    return tuple(f"test/{name}" for name in SCORED_METRICS.get(task, ()))


def _text_metric_hint(metric: str, task: str) -> str:
    """Why a generated-text metric (eval/bleu, ...) is not on offer, for a refusal's message."""
    if metric not in GENERATED_TEXT_METRICS["generation"]:
        return ""
    if task != "generation":
        return f" ({metric} scores generated text: a metric of generation tasks)"
    return (
        f" ({metric} needs text generated at each evaluation, which this backend does not do; "
        f"test/{metric.split('/', 1)[1]} is measured on the test split)"
    )


def _check_objectives(
    cfg: DictConfig, chosen: list[tuple[str, str]], backend: Backend
) -> list[str]:
    """Refuses objectives no trial reports; says that several objectives turn pruning off."""
    if len(cfg.sweep.objectives) == 1:
        metric, direction = chosen[0]
        raise ConfigError(
            "sweep.objectives names one objective; for one, use "
            f"sweep.metric={metric} sweep.direction={direction} (pruning and early stopping "
            "follow them)"
        )
    task = cfg.data.task
    task_metrics = (*backend.eval_metrics(task), *backend.eval_metrics_on_demand(task))
    # sweep.metric alone: _check_sweep_settings checks it, naming that key
    for metric, direction in chosen if cfg.sweep.objectives else []:
        if direction not in ("maximize", "minimize"):
            raise ConfigError(
                f"sweep.objectives: {metric}: direction must be maximize or minimize, "
                f"not {direction!r}"
            )
        if not (metric in task_metrics or metric in COST_METRICS or metric.startswith("test/")):
            raise ConfigError(
                f"sweep.objectives: {metric!r} is not a metric trials report"
                f"{_text_metric_hint(metric, task)}; choose from "
                f"{', '.join((*task_metrics, *COST_METRICS))} or a test/* metric"
            )
    if len(chosen) == 1:
        return []
    if cfg.sampler.name == "cmaes":
        raise ConfigError(
            "sweep.objectives: sampler=cmaes optimizes one objective; use tpe, random, grid or gp"
        )
    notices = [
        f"{len(chosen)} objectives ({', '.join(f'{m} {d}' for m, d in chosen)}): the study "
        "looks for the Pareto front; the report plots it. Within a trial, early stopping and "
        f"the kept checkpoint follow sweep.metric ({cfg.sweep.direction} {cfg.sweep.metric})."
    ]
    if cfg.pruner.name != "none":
        notices.append(
            f"pruning is off (pruner={cfg.pruner.name} ignored): Optuna cannot prune trials of "
            "a multi-objective study, so every trial runs to the end."
        )
    return notices


def _check_reported(
    cfg: DictConfig, goals: list[tuple[str, str]], backend: Backend, dataset: Dataset
) -> None:
    """Objectives this backend and data cannot measure would fail every trial at its end."""
    for metric, _ in goals:
        if metric == "cost_usd" and not isinstance(backend, PaidBackend):
            raise ConfigError(
                f"sweep.objectives: cost_usd is only reported by a backend that spends money; "
                f"backend {backend.name} does not (train/seconds "
                "measures the time a trial takes)"
            )
        if metric.startswith("test/") and not dataset.test:
            raise ConfigError(f"sweep.objectives: {metric} needs a test split; the data has none")


def check_same_study(study: optuna.Study, plan: Plan, overrides: list[str]) -> None:
    """Refuses to add this command's trials to a stored study that answers another question:
    other objectives, or another fingerprint (task, data, labels, model, backend). A study
    stored before fingerprints existed adopts this command's."""
    cfg, name = plan.cfg, study.study_name
    goals = plan.objectives
    before = stored_objectives(study, cfg, goals)
    directions = [d.name.lower() for d in study.directions]
    if before != goals or directions != [d for _, d in goals]:
        had = ", ".join(f"{d} {m}" for m, d in before)
        raise ConfigError(
            f"study {name!r} exists with the objective(s) {had}; this command has "
            f"{', '.join(f'{d} {m}' for m, d in goals)}. Resume with the same sweep.metric, "
            "sweep.direction and sweep.objectives, or give the new study its own name: "
            "name=..."
        )
    stored = study.user_attrs.get("fingerprint")
    if not stored:
        return
    changed = differences(stored, plan.fingerprint)
    if not changed:
        return
    fake = "FakeBackend" in (stored.get("backend"), plan.fingerprint["backend"])
    new_name = suggested_name(name, stored, plan.fingerprint)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "name"]
    command = " ".join(shlex.quote(w) for w in ["harness", "sweep", *kept, f"name={new_name}"])
    raise ConfigError(
        f"study {name!r} ({describe_storage(cfg)}, {count_finished(study)} finished trials) "
        "is not the study this command describes:\n  "
        + "\n  ".join(changed)
        + "\nA study is its task, data, labels, model, backend and objective; adding these "
        "trials to it would mix two questions under one best. "
        + ("A backend=fake check is a study of its own. " if fake else "")
        + f"Start a new study with its own name:\n  {command}"
    )


def check_resume(study: optuna.Study, plan: Plan, overrides: list[str]) -> None:
    """The checks of ``check_same_study``, then the search space: a change Optuna cannot make
    within a study (a choice list, a log scale, a kind) is refused with the command that
    continues the study as a new one (harness.continuation)."""
    check_same_study(study, plan, overrides)
    stored = continuation.stored_distributions(study)
    changed = continuation.incompatible(stored, plan.distributions)
    if changed:
        name = study.study_name
        raise ConfigError(
            f"study {name!r}: this command changes its search space in a way Optuna cannot "
            "follow within one study:\n  "
            + "\n  ".join(changed)
            + "\n(a choice list, a log scale and int/float are fixed for the life of a study; a "
            "wider interval or range goes on in place). Continue it as a new study that starts "
            f"with its {count_finished(study)} finished trials and records under the same "
            "MLflow experiment:\n  " + continuation.continuation_command(name, overrides)
        )


def checked_param_sets(plan: Plan, sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param sets to enqueue must name searched keys with values their ranges hold: a warm
    start that Optuna would quietly resample is refused before any trial, naming the value.
    A key the command line fixed is dropped from the sets, with a notice."""
    kept = []
    for params in sets:
        for key in [k for k in params if k in plan.fixed]:
            plan.notices.append(
                f"sweep.enqueue: {key}={params.pop(key)!r} dropped: an override fixes it to "
                f"{plan.fixed[key]!r}"
            )
        for key, value in params.items():
            dist = plan.distributions.get(key)
            if dist is None:
                raise ConfigError(
                    f"sweep.enqueue: {key} is not a searched key (searched: "
                    f"{', '.join(plan.distributions) or 'none'})"
                )
            if not holds(dist, value):
                raise ConfigError(f"sweep.enqueue: {key}={value!r} is outside its range {dist}")
        if params:
            kept.append(params)
    return kept
