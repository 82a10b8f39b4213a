"""What `harness sweep` and `harness best` print.

While a sweep runs, on a terminal: a progress bar per running trial (steps, loss, the last
evaluation, time left) and one for the study's trials; a line per finished trial above them.
Off a terminal (CI, a log file) there are no bars, only the lines, one per trial, which read well
in a log. ``quiet`` keeps the final summary only. After the sweep: a table of the best trials.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.study.queries import StudySummary
from harness.study.trial import TrialOutcome


def short(params: Mapping[str, Any]) -> str:
    """``lr=0.001 batch_size=16``: the last part of each dotted key."""
    return " ".join(f"{key.split('.')[-1]}={format_value(v)}" for key, v in params.items())


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_line(outcome: TrialOutcome) -> str:
    """One finished trial on one line (rich markup; its params and reason escaped, so that a
    list value or a path such as /runs/[x]/ prints as it is instead of vanishing as a tag)."""
    from rich.markup import escape

    if outcome.values is not None:
        value = "objectives=" + "/".join(f"{v:.4g}" for v in outcome.values)
    else:
        value = "" if outcome.value is None else f"objective={outcome.value:.4f}"
    style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(outcome.state, "white")
    cost = "" if outcome.cost_usd is None else f" ${outcome.cost_usd:.4f}"
    return (
        f"trial {outcome.number:4d} [{style}]{outcome.state:8s}[/{style}] "
        f"{value:18s} {outcome.seconds:6.1f}s{cost}  {escape(short(outcome.params))} "
        f"{escape(outcome.reason)}"
    )


class SweepDisplay:
    """Live progress of one sweep process; a context manager around the sweep."""

    def __init__(
        self, console: Any, metric: str, n_trials: int, done: int, quiet: bool, bars: bool
    ) -> None:
        self.console, self.metric, self.quiet = console, metric, quiet
        self.n_trials, self.done = n_trials, done
        self.live = bars and bool(console.is_terminal) and not quiet  # no bars in log files
        self.progress: Any = None
        self.tasks: dict[int, Any] = {}  # trial number -> its bar
        self.last: dict[int, dict[str, float]] = {}  # trial -> its last loss and evaluation

    def __enter__(self) -> SweepDisplay:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description:>10}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=True,  # bars vanish when done: the trial lines stay
                refresh_per_second=4,
            )
            self.progress.start()
            self.study = self.progress.add_task(
                "trials", total=self.n_trials, completed=self.done, status=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_start(self, done: int) -> None:
        """The trials a resumed study had finished, told once the sweep has read it: where the
        study's bar stands."""
        self.done = done
        if self.progress is not None:
            self.progress.update(self.study, completed=done)

    def on_progress(self, number: int, step: int, total: int, metrics: Mapping[str, float]) -> None:
        """A running trial's step (from its reporter; many a second: kept cheap)."""
        if self.progress is None:
            return
        task = self.tasks.get(number)
        if task is None:
            task = self.tasks[number] = self.progress.add_task(
                f"trial {number}", total=total or None, status=""
            )
        if "train/loss" not in metrics and self.metric not in metrics:
            self.progress.update(task, completed=step, total=total or None)
            return
        last = self.last.setdefault(number, {})
        last.update((k, float(metrics[k])) for k in ("train/loss", self.metric) if k in metrics)
        status = "  ".join(f"{k.removeprefix('train/')} {v:.4f}" for k, v in last.items())
        self.progress.update(task, completed=step, total=total or None, status=status)

    def on_trial(self, outcome: TrialOutcome) -> None:
        if outcome.reason.startswith("surplus"):
            return  # a trial another worker made unnecessary: never run
        if self.progress is not None:
            self.last.pop(outcome.number, None)
            task = self.tasks.pop(outcome.number, None)
            if task is not None:
                self.progress.remove_task(task)
            if outcome.state in ("COMPLETE", "PRUNED"):  # a failed trial is run again
                self.progress.advance(self.study)
        if not self.quiet:
            self.console.print(trial_line(outcome), soft_wrap=True)  # one line, also in logs


def print_summary(console: Any, summary: StudySummary) -> None:
    """Trial counts, the best trials (the Pareto front of a multi-objective study) as a table,
    the best trial's metrics, and the command that reproduces it."""
    best, states, objectives = summary.best, summary.states, summary.objectives
    others = [f"{states.count(s)} {s.lower()}" for s in ("RUNNING", "WAITING") if s in states]
    console.print(  # every state counted: the numbers add up to the total
        f"\n{len(states)} trials: {states.count('COMPLETE')} complete, "
        f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed"
        + "".join(f", {o}" for o in others)
    )
    if best is None:
        return
    console.print(_best_trials_table(summary))
    console.print(_best_trial_table(best, objectives, summary.multi))
    console.print("reproduce with:")
    console.print(summary.reproduce, markup=False, soft_wrap=True)
    if summary.best_model_uri:
        console.print(f"best model: {summary.best_model_uri}", markup=False)
    if summary.confirmed:
        _print_confirmed(console, summary)


def _print_confirmed(console: Any, summary: StudySummary) -> None:
    """The confirm step's ranking (harness.noise): mean ± sd and CI over seeds per trial."""
    metric = summary.objectives[0][0]
    console.print("\nconfirmed across seeds (mean ± sd, best mean first):")
    for confirmed in summary.confirmed:
        console.print(f"  {confirmed.line(metric)}", markup=False)
    if summary.winner is not None:
        console.print(f"confirmed winner: trial {summary.winner.number}; reproduce with:")
        console.print(summary.winner_reproduce, markup=False, soft_wrap=True)


def _best_trials_table(summary: StudySummary) -> Any:
    """The best 5 trials, or the Pareto front of a multi-objective study."""
    from rich.table import Table
    from rich.text import Text

    ranked, objectives, paid = summary.shown, summary.objectives, summary.paid
    if summary.multi:
        title = f"Pareto front: {len(ranked)} trials no other beats on every objective"
    else:
        title = f"best {len(ranked)} of {summary.states.count('COMPLETE')} completed trials"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for metric, direction in objectives:
        table.add_column(f"{metric} ({direction[:3]})", justify="right")
    table.add_column("seconds", justify="right")
    if paid:
        table.add_column("cost", justify="right")
    table.add_column("params", ratio=1)
    for trial in ranked:
        assert trial.datetime_complete and trial.datetime_start  # a COMPLETE trial has both
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        row = [str(trial.number), *(f"{v:.4g}" for v in trial.values), f"{seconds:.1f}"]
        if paid:
            row.append(f"${float(trial.user_attrs.get('cost_usd', 0.0)):.4f}")
        table.add_row(*row, Text(short(trial.params)))  # Text: values are not markup
    return table


def _best_trial_table(best: Any, objectives: list[tuple[str, str]], multi: bool) -> Any:
    """The best trial's params and metrics."""
    from rich.table import Table
    from rich.text import Text

    which = " (the front's best on the first objective)" if multi else ""
    headline = f"{objectives[0][0]} = {best.values[0]:.4f}"
    detail = Table(title=f"best trial: {best.number}{which}  ({headline})")
    detail.add_column("key")
    detail.add_column("value", justify="right")
    for key, value in best.params.items():
        detail.add_row(key, Text(format_value(value)))
    metrics = best.user_attrs.get("metrics", {})
    for key in sorted(metrics, key=lambda k: (not k.startswith("eval/"), k)):
        detail.add_row(key, f"{metrics[key]:.4f}")
    return detail
