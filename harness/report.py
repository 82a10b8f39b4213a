"""`harness report`: plots and a summary of a study, written to runs/reports/NAME/ and logged to
the study's parent MLflow run under ``report/``.

The folder holds one PNG per plot, ``report.html`` (the same plots, interactive, with plotly.js
inside: it opens offline) and ``summary.md``: counts, the best trial and the command that
reproduces it, the top trials, parameter importances, what pruning saved (an estimate, said to
be one) and advice on ranges whose edge the best trials crowd (harness.advice).

A plot that cannot be drawn (importances of a single trial, say) is left out with the reason in
summary.md; it never costs the rest of the report.
"""

from __future__ import annotations

import html
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from harness import advice, noise, pareto_pruner
from harness.config import ConfigError, load_config, runs_dir, with_params
from harness.display import format_value
from harness.secrets import redact_text
from harness.storage import describe_storage
from harness.study.plan import make_backend
from harness.study.queries import (
    load_study,
    ranked_trials,
    reproduce_command,
    stored_objectives,
    study_spend,
)
from harness.study.stop_rules import UNSET_TO_GO_ON, rules_met
from harness.tracking import MLflowStore, tracking_uri

SUMMARY = "summary.md"
HTML = "report.html"
TOP_N = 5
IMPORTANCE_SEED = 0  # fANOVA fits a random forest: one seed, so the table and plots agree


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


@dataclass
class Savings:
    """What pruning saved, estimated: each pruned trial extrapolated to the median number of
    evaluations of the complete trials (see ``pruning_savings``). None: not measurable."""

    pruned: int
    estimated: int  # pruned trials the estimate covers (those with at least one evaluation)
    median_evaluations: float | None
    seconds_spent: float
    seconds_saved: float
    steps_spent: float | None = None
    steps_saved: float | None = None
    usd_spent: float | None = None
    usd_saved: float | None = None

    @staticmethod
    def share(saved: float | None, spent: float | None) -> float | None:
        """saved / (spent + saved): the part of the study's compute without pruning saved."""
        if saved is None or spent is None or spent + saved <= 0:
            return None
        return saved / (spent + saved)


@dataclass
class Plot:
    name: str  # file stem: NAME.png
    title: str
    html: str = ""  # a plotly <div>, without plotly.js
    skipped: str = ""  # why it was not drawn
    width_in: float = 0.0  # PNG width in inches, where Optuna's default is too cramped


@dataclass
class Facts:
    """Everything summary.md says, computed once."""

    study: optuna.Study
    objectives: list[Objective]
    trials: list[FrozenTrial]
    ranked: list[FrozenTrial]  # COMPLETE, best first on the primary objective
    savings: Savings
    importances: dict[str, float] = field(default_factory=dict)
    importance_problem: str = ""  # why there are no importances
    advice: list[advice.EdgeAdvice] = field(default_factory=list)
    follow_advice: str | None = None  # the command that widens the advised ranges
    follow_unset: list[str] = field(default_factory=list)  # stop rules it unsets: met already
    pareto: list[FrozenTrial] = field(default_factory=list)
    spend_usd: float | None = None  # where money was spent
    overrides: list[str] = field(default_factory=list)
    parent_id: str = ""
    seed_noise: noise.SeedNoise | None = None  # from confirm runs
    confirmed: list[noise.Confirmed] = field(default_factory=list)  # best mean first

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def best(self) -> FrozenTrial:
        return self.ranked[0]


def write_report(cfg: DictConfig, console: Any) -> Path:
    """Writes the report of study ``cfg.name`` and logs it to MLflow; returns its folder."""
    study = load_study(cfg)
    trials = study.get_trials(deepcopy=False)
    objectives = [Objective(m, d) for m, d in stored_objectives(study, cfg)]
    ranked = ranked_trials(study)
    if not ranked:
        raise ConfigError(
            f"study {cfg.name!r} has no complete trial yet ({count_line(trials)}): a report "
            "needs at least one. Run `harness sweep` with the study's overrides to add trials."
        )
    folder = runs_dir(cfg) / "reports" / cfg.name
    _clear(folder)
    facts = gather(study, cfg, objectives, ranked)
    plots = make_plots(facts, folder)
    (folder / SUMMARY).write_text(summary_markdown(facts, plots, cfg), encoding="utf-8")
    write_html(folder / HTML, facts, plots)
    logged = log_report(cfg, facts.parent_id, folder)
    _print(console, folder, facts, plots, logged)
    return folder


def by_primary(trials: Sequence[FrozenTrial], primary: Objective) -> list[FrozenTrial]:
    """Trials with a value, best first on the primary objective (the earlier wins a tie)."""
    sign = -1.0 if primary.direction == "maximize" else 1.0
    valued = [t for t in trials if t.values]
    return sorted(valued, key=lambda t: (sign * t.values[0], t.number))


def gather(
    study: optuna.Study, cfg: DictConfig, objectives: list[Objective], ranked: list[FrozenTrial]
) -> Facts:
    """Counts, savings, importances, advice, the Pareto front and spend of the study."""
    trials = study.get_trials(deepcopy=False)
    facts = Facts(
        study=study,
        objectives=objectives,
        trials=trials,
        ranked=ranked,
        savings=pruning_savings(study),
        overrides=list(
            ranked[0].user_attrs.get("overrides", study.user_attrs.get("overrides", []))
        ),
        parent_id=str(study.user_attrs.get("mlflow_parent_run_id", "")),
    )
    facts.importances, facts.importance_problem = param_importances(facts)
    if not facts.multi:  # seed noise is measured on the one objective
        facts.seed_noise, facts.confirmed = noise.seed_noise(study), noise.confirmed_ranking(study)
    try:
        limits = advice.hard_limits(make_backend(cfg))
    except ConfigError:  # a backend this config no longer builds: harness's own limits
        limits = dict(advice.LIMITS)
    distributions = searched_distributions(trials)
    facts.advice = advice.boundary_advice(ranked, distributions, limits)
    stored = list(study.user_attrs.get("overrides", facts.overrides))
    if facts.advice:
        facts.follow_unset = rules_to_unset(study, cfg, stored, objectives[0])
    facts.follow_advice = advice.follow_command(
        study, facts.advice, distributions, stored, facts.follow_unset
    )
    if facts.multi:
        facts.pareto = by_primary(study.best_trials, objectives[0])
    if any("cost_usd" in t.user_attrs for t in trials):
        facts.spend_usd = study_spend(study)
    return facts


def unset_note(facts: Facts) -> str:
    """What the command that follows the advice sets to null, and why ("" if nothing)."""
    unset = ", ".join(f"{key}=null" for key in facts.follow_unset)
    why = "kept, a stop rule this study meets already could stop it before its first trial"
    return f"{unset}: {why}" if unset else ""


def rules_to_unset(
    study: optuna.Study, cfg: DictConfig, overrides: list[str], primary: Objective
) -> list[str]:
    """The stop-rule settings the command that follows the advice sets to null: those of each
    rule the study meets already, in the config the study's own overrides compose (the
    command's, but for its new ranges; where they no longer compose on this host, such as
    sweep.devices it lacks, the report's config with the stop-rule settings those overrides
    give). Kept, such a rule would stop the command before its first trial."""
    try:
        composed = load_config(overrides)
    except ConfigError:
        composed = with_params(cfg, overridden_rules(overrides))
    met = rules_met(composed, study, (primary.metric, primary.direction))
    return [
        key
        for stop in met
        for key in UNSET_TO_GO_ON[stop.rule]
        if OmegaConf.select(composed, key) is not None
    ]


def overridden_rules(overrides: list[str]) -> dict[str, Any]:
    """The stop-rule settings (UNSET_TO_GO_ON's keys) that ``overrides`` set, as values."""
    import yaml

    keys = {key for settings in UNSET_TO_GO_ON.values() for key in settings}
    found = {}
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") in keys:
            found[key.lstrip("+")] = yaml.safe_load(value)
    return found


def searched_distributions(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Each searched key's distribution; the latest trial's where a resume changed a range."""
    return {key: dist for t in trials for key, dist in t.distributions.items()}


def duration_s(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def pruning_savings(study: optuna.Study) -> Savings:
    """An estimate of the compute and money pruning saved.

    A pruned trial that made k evaluations in d seconds (s steps, c dollars) would, run to the
    end like the complete trials (a median of M evaluations), have taken about d*M/k seconds
    (s*M/k steps, c*M/k dollars). The saving is the sum over pruned trials of
    max(0, estimate - actual). Money is counted per trial where the trial knows what its whole
    job would cost (a hosted trial's ``cost_estimate_usd``, what the budget checks): that less
    what the provider billed for it, so a job that finished before its cancel landed saved
    nothing."""
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    lengths = [
        _evaluations(t) for t in trials if t.state == TrialState.COMPLETE and _evaluations(t)
    ]
    median = float(statistics.median(lengths)) if lengths else None
    finished = [t for t in trials if t.state.is_finished()]
    savings = Savings(
        pruned=len(pruned),
        estimated=0,
        median_evaluations=median,
        seconds_spent=sum(duration_s(t) or 0.0 for t in finished),
        seconds_saved=0.0,
    )
    steps = [float(t.user_attrs["steps"]) for t in finished if "steps" in t.user_attrs]
    if steps:
        savings.steps_spent, savings.steps_saved = sum(steps), 0.0
    if any("cost_usd" in t.user_attrs for t in trials):
        savings.usd_spent, savings.usd_saved = study_spend(study), 0.0
    for trial in pruned:
        done = _evaluations(trial)
        if median is None or done == 0:
            continue  # nothing to extrapolate from
        savings.estimated += 1
        more = max(0.0, median / done - 1.0)  # estimate - actual = actual * (M/k - 1)
        savings.seconds_saved += (duration_s(trial) or 0.0) * more
        if savings.steps_saved is not None and "steps" in trial.user_attrs:
            savings.steps_saved += float(trial.user_attrs["steps"]) * more
        if savings.usd_saved is not None and "cost_usd" in trial.user_attrs:
            savings.usd_saved += usd_saved(trial, more)
    return savings


def _evaluations(trial: FrozenTrial) -> int:
    # a multi-objective trial's evaluations are its stored vectors (harness.pareto_pruner)
    return len(trial.intermediate_values) or pareto_pruner.evaluations(trial)


def usd_saved(trial: FrozenTrial, more: float) -> float:
    """What pruning saved on one paid trial: its whole job's estimated cost less what it was
    billed, where it has that estimate; else its cost extrapolated (``more`` = M/k - 1)."""
    billed = float(trial.user_attrs["cost_usd"])
    if "cost_estimate_usd" in trial.user_attrs:
        return max(0.0, float(trial.user_attrs["cost_estimate_usd"]) - billed)
    return billed * more


def _primary_target(facts: Facts) -> Callable[[FrozenTrial], float] | None:
    """Single-objective plots of a multi-objective study show the primary objective."""
    return (lambda t: t.values[0]) if facts.multi else None


def _importance_evaluator() -> Any:
    from optuna.importance import FanovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)


def importance_problem(facts: Facts) -> str:
    """Why importances cannot be measured on this study, or ""."""
    keys = searched_distributions(facts.ranked)
    if len(facts.ranked) < 2:
        return f"they need at least 2 complete trials; the study has {len(facts.ranked)}"
    if len(keys) < 2:
        return f"the space searches {len(keys)} parameter(s): nothing to compare"
    if len({t.values[0] for t in facts.ranked}) < 2:
        return "every complete trial has the same objective value"
    return ""


def param_importances(facts: Facts) -> tuple[dict[str, float], str]:
    """fANOVA importances on the primary objective, largest first; or ({}, the reason)."""
    problem = importance_problem(facts)
    if problem:
        return {}, problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            found = optuna.importance.get_param_importances(
                facts.study, evaluator=_importance_evaluator(), target=_primary_target(facts)
            )
    except (ValueError, RuntimeError) as exc:
        return {}, f"Optuna could not measure them: {exc}"
    return {k: float(v) for k, v in found.items()}, ""


def plot_specs(facts: Facts) -> list[tuple[Plot, Callable[[Any], Any]]]:
    """Each plot, with a function drawing it with optuna.visualization or its matplotlib twin
    (same signatures), or with the reason it is skipped."""
    target = _primary_target(facts)
    name = facts.objectives[0].metric
    keys = searched_distributions(facts.trials)
    curves = any(t.intermediate_values for t in facts.trials)
    single = {"target": target, "target_name": name}
    specs: list[tuple[Plot, Callable[[Any], Any]]] = [
        (
            Plot("optimization_history", f"Optimization history ({name})"),
            lambda v: v.plot_optimization_history(facts.study, **single),
        ),
        (
            Plot(
                "param_importances",
                f"Parameter importances ({name})",
                skipped=facts.importance_problem,
            ),
            lambda v: v.plot_param_importances(
                facts.study, evaluator=_importance_evaluator(), **single
            ),
        ),
        (
            Plot(
                "parallel_coordinate",
                f"Parallel coordinates ({name})",
                skipped="" if keys else "no parameter was searched",
                width_in=1.6 * (len(keys) + 1),  # an axis per parameter, and the objective's
            ),
            lambda v: v.plot_parallel_coordinate(facts.study, **single),
        ),
        (
            Plot("slice", f"Slice plots ({name})", skipped="" if keys else "no parameter searched"),
            lambda v: v.plot_slice(facts.study, **single),
        ),
        (
            Plot(
                "intermediate_values",
                "Learning curves (the pruning metric at each evaluation; pruned trials stop early)",
                skipped="" if curves else _no_curves_reason(facts),
            ),
            lambda v: v.plot_intermediate_values(facts.study),
        ),
    ]
    if facts.multi:
        specs.append(_pareto_front_spec(facts))
    return specs


def _pareto_front_spec(facts: Facts) -> tuple[Plot, Callable[[Any], Any]]:
    """The Pareto front plot of a multi-objective study, skipped past 3 objectives."""
    names = [o.metric for o in facts.objectives]
    too_many = len(names) > 3
    return (
        Plot(
            "pareto_front",
            "Pareto front",
            skipped=f"{len(names)} objectives: Optuna plots 2 or 3" if too_many else "",
        ),
        lambda v: v.plot_pareto_front(facts.study, target_names=names),
    )


def _no_curves_reason(facts: Facts) -> str:
    if facts.multi:
        return (
            "no learning curves: a multi-objective study has no Optuna intermediate values (with "
            "Pareto pruning, its trials store their objectives at each evaluation instead: "
            "harness.pareto_pruner)"
        )
    return "no trial reported an intermediate value"


def make_plots(facts: Facts, folder: Path) -> list[Plot]:
    """Draws every plot as folder/NAME.png and as a plotly <div> for report.html."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    plots = []
    for plot, draw in plot_specs(facts):
        if not plot.skipped:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    warnings.simplefilter("ignore", UserWarning)  # "would be different"
                    _save_png(draw(static), folder / f"{plot.name}.png", plot.width_in)
                    figure = draw(interactive)
                plot.html = figure.to_html(full_html=False, include_plotlyjs=False)
            except Exception as exc:  # one plot's failure must not cost the report
                (folder / f"{plot.name}.png").unlink(missing_ok=True)
                plot.skipped = f"Optuna could not draw it: {type(exc).__name__}: {exc}"
        plots.append(plot)
    return plots


def _save_png(axes: Any, path: Path, width_in: float = 0.0) -> None:
    """Saves the figure that ``axes`` (one Axes or an array of them) belongs to, and closes it."""
    import matplotlib.pyplot as plt

    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.figure
    try:
        if width_in > figure.get_figwidth():
            figure.set_size_inches(width_in, max(5.0, figure.get_figheight()))
        figure.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)


def _clear(folder: Path) -> None:
    """Makes the folder and removes an earlier report's files (a plot skipped now must not
    linger from before)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), folder / SUMMARY, folder / HTML]:
        old.unlink(missing_ok=True)


# ---- text -------------------------------------------------------------------------------------


def count_line(trials: Sequence[FrozenTrial]) -> str:
    states = [t.state for t in trials]
    line = (
        f"{len(states)} trials: {states.count(TrialState.COMPLETE)} complete, "
        f"{states.count(TrialState.PRUNED)} pruned, {states.count(TrialState.FAIL)} failed, "
        f"{states.count(TrialState.RUNNING)} running"
    )
    waiting = states.count(TrialState.WAITING)
    return f"{line}, {waiting} waiting" if waiting else line


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def _percent(share: float | None) -> str:
    return "" if share is None else f" ({share:.0%} of what the study would have used unpruned)"


def _cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def objective_line(facts: Facts) -> str:
    parts = [f"{o.direction} `{o.metric}`" for o in facts.objectives]
    if facts.multi:
        return f"Objectives: {', '.join(parts)} (multi-objective: a Pareto front)"
    return f"Objective: {parts[0]}"


def best_line(facts: Facts) -> str:
    best = facts.best
    values = ", ".join(
        f"{o.metric} = {format_value(v)}"
        for o, v in zip(facts.objectives, best.values, strict=True)
    )
    which = f" (best on {facts.objectives[0].metric}, the first objective)" if facts.multi else ""
    return f"Best trial: {best.number}{which} ({values})"


def savings_line(facts: Facts) -> str:
    s = facts.savings
    if s.pruned == 0:
        return f"Pruning: no trial was pruned (of {len(facts.trials)})"
    if s.median_evaluations is None or s.estimated == 0:
        return f"Pruning: {s.pruned} trials pruned; no complete trial to estimate savings from"
    share = s.share(s.seconds_saved, s.seconds_spent)
    parts = [f"~{_seconds(s.seconds_saved)} of compute{_percent(share)}"]
    if s.steps_saved is not None:
        share = s.share(s.steps_saved, s.steps_spent)
        parts.append(f"~{s.steps_saved:,.0f} optimizer steps{_percent(share)}")
    if s.usd_saved is not None:
        parts.append(f"~${s.usd_saved:.4f}{_percent(s.share(s.usd_saved, s.usd_spent))}")
    return f"Pruning: {s.pruned} trials pruned, saving an estimated {'; '.join(parts)}"


def advice_line(facts: Facts) -> str:
    if not facts.advice:
        return "Search space: no boundary problems"
    keys = ", ".join(a.key for a in facts.advice)
    return f"Search space: the best trial lies at the edge of {keys} (see summary.md)"


def key_lines(facts: Facts) -> list[str]:
    lines = [objective_line(facts), count_line(facts.trials), best_line(facts)]
    if facts.multi:
        lines.append(f"Pareto front: {len(facts.pareto)} trials")
    lines += [savings_line(facts), advice_line(facts)]
    if facts.spend_usd is not None:
        lines.append(f"Spent: ${facts.spend_usd:.4f}")
    return lines


def summary_markdown(facts: Facts, plots: Sequence[Plot], cfg: DictConfig) -> str:
    sections = [
        _header_section(facts, cfg),
        _best_section(facts),
        _top_section(facts),
        _pareto_section(facts),
        _confirm_section(facts),
        _importance_section(facts),
        _pruning_section(facts),
        _advice_section(facts),
        _spend_section(facts),
        _plots_section(plots),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def _header_section(facts: Facts, cfg: DictConfig) -> list[str]:
    parent = facts.parent_id or "none recorded in the study"
    return [
        f"# Study `{facts.name}`",
        "",
        f"- {objective_line(facts)}",
        f"- {count_line(facts.trials)}",
        f"- Optuna storage: `{describe_storage(cfg)}`",
        f"- MLflow: `{redact_text(tracking_uri(cfg))}`, parent run `{parent}`",
        f"- Interactive plots: [{HTML}]({HTML}) (opens offline)",
        *_stopped_line(facts),
    ]


def _stopped_line(facts: Facts) -> list[str]:
    """Why the last sweep stopped starting trials early (a stop rule, a budget), if it did."""
    reason = facts.study.user_attrs.get("stop_reason")
    return [f"- Stopped: {reason}"] if reason else []


def _best_section(facts: Facts) -> list[str]:
    best = facts.best
    lines = ["## Best trial", "", f"{best_line(facts)}, took {_seconds(duration_s(best))}.", ""]
    lines += _table(["parameter", "value"], [[k, v] for k, v in best.params.items()])
    metrics = best.user_attrs.get("metrics", {})
    if metrics:
        order = sorted(metrics, key=lambda k: (not k.startswith("eval/"), k))
        lines += ["", *_table(["metric", "value"], [[k, float(metrics[k])] for k in order])]
    command = reproduce_command("train", facts.overrides, best.params)
    lines += ["", "Reproduce it:", "", "```", command, "```"]
    return lines


def _top_section(facts: Facts) -> list[str]:
    """The best complete trials; in a small study, the best pruned ones fill the table (their
    value is the last one they reported, so they are labelled)."""
    pruned = [t for t in facts.trials if t.state == TrialState.PRUNED]
    top = (facts.ranked + by_primary(pruned, facts.objectives[0]))[:TOP_N]
    keys = list(searched_distributions(facts.trials))
    cost = any("cost_usd" in t.user_attrs for t in facts.trials)
    header = ["trial", *(o.metric for o in facts.objectives), "state", "duration", *keys]
    rows = []
    for t in top:
        state = t.state.name
        if t.state == TrialState.PRUNED:
            state += f" at eval {len(t.intermediate_values)}"
        row = [t.number, *t.values, state, _seconds(duration_s(t))]
        row += [t.params.get(k, "") for k in keys]
        if cost:
            row.append(_usd(t.user_attrs.get("cost_usd")))
        rows.append(row)
    title = f"## Top {len(top)} trials (by {facts.objectives[0].metric})"
    return [title, "", *_table([*header, "cost"] if cost else header, rows)]


def _usd(value: Any) -> str:
    return "" if value is None else f"${float(value):.4f}"


def _pareto_section(facts: Facts) -> list[str]:
    if not facts.multi:
        return []
    keys = list(searched_distributions(facts.trials))
    rows = [
        [t.number, *t.values, _seconds(duration_s(t)), *(t.params.get(k, "") for k in keys)]
        for t in facts.pareto
    ]
    header = ["trial", *(o.metric for o in facts.objectives), "duration", *keys]
    return [
        f"## Pareto front ({len(facts.pareto)} trials)",
        "",
        "No trial on the front is better on every objective than another one on it: choose by "
        "the trade-off you want. Sorted by the first objective.",
        "",
        *_table(header, rows),
    ]


def _importance_section(facts: Facts) -> list[str]:
    lines = ["## Parameter importances", ""]
    if facts.importance_problem:
        return [*lines, f"Not measured: {facts.importance_problem}."]
    rows = [[k, f"{v:.1%}"] for k, v in facts.importances.items()]
    return [
        *lines,
        f"fANOVA (Optuna's default evaluator, seed {IMPORTANCE_SEED}) on "
        f"{facts.objectives[0].metric} over {len(facts.ranked)} complete trials: the share of "
        "the objective's variance each parameter explains.",
        "",
        *_table(["parameter", "importance"], rows),
        *_weak_effects_lines(facts),
    ]


def _weak_effects_lines(facts: Facts) -> list[str]:
    """Parameters whose effect is smaller than seed noise (harness.noise.weak_effects)."""
    values = [t.values[0] for t in facts.ranked]
    weak = noise.weak_effects(facts.importances, values, facts.seed_noise)
    if not weak or facts.seed_noise is None:
        return []
    effects = ", ".join(f"`{key}` ({effect:.3g})" for key, effect in weak.items())
    return [
        "",
        f"Within seed noise ({facts.seed_noise.describe()}): the effect of {effects} (the "
        "standard deviation of the objective it explains) is smaller than what changing only "
        "the seed does; its importance is not meaningful.",
    ]


def _confirm_section(facts: Facts) -> list[str]:
    """The confirm step's ranking (harness.study.confirm): mean, sd and CI over seeds."""
    if not facts.confirmed:
        return []
    metric = facts.objectives[0].metric
    lines = [
        "## Confirmed across seeds",
        "",
        "The best trials re-run with new seeds (`harness confirm`), ranked on the new seeds "
        "only (the search run, picked for being best, is shown apart). Mean ± standard "
        f"deviation, {noise.CONFIDENCE:.0%} confidence interval of the mean (Student t), best "
        "mean first:",
        "",
        *(f"- {c.line(metric)}" for c in facts.confirmed),
    ]
    if facts.confirmed:  # ranked best first, two new seeds or more each: the first is the winner
        winner = facts.confirmed[0].number
        lines += ["", f"Confirmed winner: trial {winner} (`+from_best=true` retrains it)."]
    return lines


def _pruning_section(facts: Facts) -> list[str]:
    s = facts.savings
    lines = ["## Pruning", ""]
    lines.append(f"{s.pruned} of {len(facts.trials)} trials were pruned.")
    if facts.multi and facts.study.user_attrs.get("pareto_pruning"):  # as the last sweep did
        lines.append("Several objectives: a trial is pruned by its Pareto rank at an evaluation.")
    if s.pruned == 0:
        return lines
    if s.median_evaluations is None or s.estimated == 0:
        return [*lines, "No complete trial made evaluations to compare with: no estimate."]
    lines += [
        "",
        f"Estimated saving: {savings_line(facts).split('saving an estimated ', 1)[1]}.",
        "",
        f"How this is estimated: a pruned trial that made k evaluations in d seconds (s "
        f"optimizer steps, c dollars) is assumed to have needed, had it run to the end, as many "
        f"evaluations as the complete trials' median (M = {s.median_evaluations:g}): about "
        "d×M/k seconds (s×M/k steps, c×M/k dollars). The saving is the sum over pruned trials "
        "of that estimate minus what the trial took (never below zero); the percentage is "
        f"saving / (spent + saving), where the study spent {_seconds(s.seconds_spent)} on its "
        "finished trials.",
    ]
    if s.estimated < s.pruned:
        lines.append(f"{s.pruned - s.estimated} pruned trial(s) made no evaluation: not counted.")
    if s.steps_saved is None:
        lines.append("Steps: not recorded by this study's trials.")
    return lines


def _advice_section(facts: Facts) -> list[str]:
    lines = [
        "## Search-space advice",
        "",
        "Best trials at the edge of a searched range mean the optimum may lie beyond it: widen "
        "the range there (Deep Learning Tuning Playbook). Checked for numeric parameters: the "
        f"best trial within {advice.EDGE_FRACTION:.0%} of an end of its range (log scale for "
        "log ranges; the largest or smallest of numeric choices).",
        "",
    ]
    if len(facts.ranked) < advice.MIN_TRIALS_FOR_ADVICE:
        lines += [
            f"Tentative: only {len(facts.ranked)} complete trial(s); run more before trusting it.",
            "",
        ]
    within = advice.noise_advice(facts.ranked, facts.seed_noise, facts.objectives[0].metric)
    lines += [within, ""] if within else []
    if not facts.advice:
        return [*lines, "No boundary problems: the best trial lies inside every searched range."]
    lines += [f"- {a.text()}" for a in facts.advice]
    if facts.follow_advice:
        unset = unset_note(facts)  # said, as the command departs from the study's overrides
        lines += [
            "",
            f"To follow it ({advice.MORE_TRIALS} more trials, the study's own overrides with the "
            f"wider ranges{f'; {unset}' if unset else ''}):",
            "",
            f"`{facts.follow_advice}`",
        ]
    return lines


def _spend_section(facts: Facts) -> list[str]:
    if facts.spend_usd is None:
        return []
    paid = sum(1 for t in facts.trials if "cost_usd" in t.user_attrs)
    return ["## Spend", "", f"Total: ${facts.spend_usd:.4f} over {paid} trials that spent money."]


def _plots_section(plots: Sequence[Plot]) -> list[str]:
    lines = ["## Plots", ""]
    for plot in plots:
        if plot.skipped:
            lines += [f"- {plot.title}: not drawn: {plot.skipped}."]
        else:
            lines += [f"### {plot.title}", "", f"![{plot.title}]({plot.name}.png)", ""]
    return lines


def write_html(path: Path, facts: Facts, plots: Sequence[Plot]) -> None:
    """One self-contained page: plotly.js inline once, then each figure's <div>."""
    from plotly.offline import get_plotlyjs

    lines = key_lines(facts) + [a.text() for a in facts.advice]
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>Study {html.escape(facts.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>Study {html.escape(facts.name)}</h1>",
        "<ul>",
        *(f"<li>{html.escape(line.replace('`', ''))}</li>" for line in lines),
        "</ul>",
        f'<p>Details: <a href="{SUMMARY}">{SUMMARY}</a></p>',
    ]
    for plot in plots:
        parts.append(f"<h2>{html.escape(plot.title)}</h2>")
        if plot.skipped:
            parts.append(f"<p>Not drawn: {html.escape(plot.skipped)}.</p>")
        else:
            parts.append(plot.html)
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def log_report(cfg: DictConfig, parent_id: str, folder: Path) -> str:
    """Logs the folder to the study's parent MLflow run under report/; says what happened."""
    if not parent_id:
        return "not logged to MLflow: the study records no parent run id"
    try:  # the config's store, its user:pass@ as MLflow's basic auth
        MLflowStore.of(cfg).log_artifacts(parent_id, folder, "report")
    except Exception as exc:  # the files are written: a tracking problem is reported, not fatal
        return f"not logged to MLflow run {parent_id}: {redact_text(str(exc))[:300]}"
    return f"logged to MLflow run {parent_id} under report/"


def _print(console: Any, folder: Path, facts: Facts, plots: Sequence[Plot], logged: str) -> None:
    from rich.markup import escape  # paths and errors print as they are, brackets and all

    console.print(
        f"report of study [bold]{facts.name}[/bold] written to {escape(str(folder))}",
        soft_wrap=True,
    )
    files = [SUMMARY, HTML, *(f"{p.name}.png" for p in plots if not p.skipped)]
    for name in files:
        console.print(f"  {folder / name}", markup=False, soft_wrap=True)
    for plot in plots:
        if plot.skipped:
            console.print(f"  skipped {plot.name}: {plot.skipped}", markup=False, soft_wrap=True)
    for line in key_lines(facts):
        console.print(line.replace("`", ""), markup=False, soft_wrap=True)
    for item in facts.advice:
        console.print(f"  {item.text().replace('`', '')}", markup=False, soft_wrap=True)
    if facts.follow_advice:
        unset = unset_note(facts)
        console.print(f"to follow it{f' ({unset})' if unset else ''}:", markup=False)
        console.print(facts.follow_advice, markup=False, soft_wrap=True)
    style = "green" if logged.startswith("logged") else "yellow"
    console.print(f"[{style}]mlflow[/{style}]: {escape(logged)}", soft_wrap=True)
