"""`harness <command> [hydra overrides...]`.

Kept import-light: `harness --help` answers without loading torch, mlflow or transformers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

USAGE = """usage: harness <command> [overrides...] [--cfg job]

Hyperparameter search for fine-tuning language models (Hydra configs, Optuna, MLflow).

commands:
  sweep      run the study, or resume it up to sweep.n_trials finished trials
             (--quiet: the final summary only)
  train      one run with fixed hyperparameters (e.g. the overrides `harness best` prints);
             +from_best=true: retrain the study's best and register it as NAME@champion
             (+with_validation=true: on train + validation)
  confirm    re-run the best trials (sweep.confirm_top_k, else 3) with sweep.confirm_seeds new
             seeds and rank them by the mean over seeds; resumes where it stopped
  best       print the best trial and the command that reproduces it
  report     plots and summary.md of a study in runs/reports/NAME/, also logged to MLflow
  ui         the MLflow UI on the study's store (--port 5000); --optuna: optuna-dashboard
             on its Optuna storage (--port 8080); both on 127.0.0.1
  validate   check a dataset (data=NAME, or a file path): size, labels, token statistics;
             for a hosted backend also the API's rules and tokens and cost per trial shape
  fake-openai  serve a loopback fake of the OpenAI fine-tuning API, for free dry runs
             (--port 8787; --help lists its fault-injection options)
  fake-together  the same for Together's fine-tuning API (--port 8788; the together SDK's
             base_url is the server's root, http://127.0.0.1:8788)

overrides (Hydra syntax; the last one wins):
  study=NAME                                  a study from studies/ (default: sentiment_tiny)
  sweep.n_trials=40 sampler=random pruner=hyperband backend=fake model=gpt2 ...
  'train.learning_rate=tag(log, interval(1e-5, 1e-2))'   search this key (choice/range/interval)
  train.epochs=3                              fix a key and take it out of the search

  --cfg job   print the composed config and exit

examples:
  harness sweep
  harness sweep study=spam_tiny sweep.n_trials=40 'train.batch_size=choice(8,16)'
  harness best study=spam_tiny
  harness confirm study=spam_tiny sweep.confirm_seeds=3
  harness fake-openai --port 8787 &
  harness sweep study=tickets_openai backend.base_url=http://127.0.0.1:8787/v1
  harness report study=spam_tiny
  harness ui
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import logging
    import warnings

    # model-card and license lookups fail for local checkpoints by design; say nothing
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    # MLflow logs every database error with its traceback, then raises it: harness reports the
    # error it raises (a full disk: one line), so the logged copy is only noise
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="mlflow")


# Off a terminal (CI, `> log.txt`, a pipe) rich would wrap lines at 80 columns (or $COLUMNS),
# splitting the commands, model ids and paths people copy out of a log. There a line is as long
# as it is, and a table as wide as its content (no table of ours expands to the console width).
UNWRAPPED_WIDTH = 10_000


def _console() -> Any:
    from rich.console import Console

    if _stdout_is_terminal():
        return Console(highlight=False)
    return Console(highlight=False, width=UNWRAPPED_WIDTH, soft_wrap=True)


def _stdout_is_terminal() -> bool:
    # the stream itself, not rich's is_terminal: FORCE_COLOR makes that true in CI logs too
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return False


def cmd_sweep(args: list[str]) -> int:
    from harness.config import load_config, runs_dir
    from harness.display import SweepDisplay
    from harness.storage import stopped_by_full_disk
    from harness.study.sweep import Sweep
    from harness.workers import inherited_overrides

    # workers started by this sweep inherit the environment: quiet too
    quiet = "--quiet" in args or os.environ.get("HARNESS_QUIET") == "1"
    if quiet:
        os.environ["HARNESS_QUIET"] = "1"
    # a worker of `sweep.n_workers` gets the sweep's overrides through its environment
    overrides = [*inherited_overrides(), *(a for a in args if a != "--quiet")]
    console = _console()
    cfg = load_config(overrides)
    # the plan's checks (config, search space, data) before the storage is read
    sweep = Sweep(cfg, overrides)
    display = SweepDisplay(
        console,
        cfg.sweep.metric,
        cfg.sweep.n_trials,
        done=0,  # until the sweep has read the stored study: on_start
        quiet=quiet,
        # Bars are redrawn in place; lines that worker processes print to the same terminal
        # would tear them. With workers, every process prints plain lines.
        bars=cfg.sweep.n_workers == 1,
    )
    sweep.on_trial, sweep.on_progress = display.on_trial, display.on_progress
    sweep.on_start = display.on_start
    if not quiet:  # each confirm run's line (sweep.confirm_top_k)
        sweep.on_confirm = lambda line: console.print(line, markup=False)
    if sweep.is_helper:  # a worker process of `sweep.n_workers`: trial lines only
        with stopped_by_full_disk(runs_dir(cfg)):
            sweep.run()
        return 0
    say = (lambda *a, **k: None) if quiet else console.print
    said = _announce_sweep(say, cfg, sweep)
    with display, stopped_by_full_disk(runs_dir(cfg)):
        study = sweep.run()
    _say_notices(say, sweep.plan.notices[said:])  # found while it ran (a warm start's source)
    return _sweep_ending(console, say, cfg, sweep.ending(study))


def _announce_sweep(say: Callable[..., Any], cfg: Any, sweep: Any) -> int:
    """The study, its storages and the plan's notices, before the first trial; returns how many
    notices were said."""
    from harness import pareto_pruner
    from harness.secrets import redact_text
    from harness.storage import describe_storage
    from harness.tracking import tracking_uri

    workers = f", {cfg.sweep.n_workers} workers" if cfg.sweep.n_workers > 1 else ""
    goals = sweep.plan.objectives
    target = ", ".join(f"{d} {m}" for m, d in goals)
    pruner = cfg.pruner.name
    if len(goals) > 1:
        pruner = f"{pruner} (Pareto rank)" if pareto_pruner.active(cfg.pruner, goals) else "none"
    say(
        f"study [bold]{cfg.name}[/bold]: {cfg.sweep.n_trials} trials, {target}; "
        f"sampler {cfg.sampler.name}, pruner {pruner}, "
        f"backend {sweep.plan.backend.name}{workers}"
    )
    say(f"optuna storage: {describe_storage(cfg)}", markup=False)
    say(f"mlflow: {redact_text(tracking_uri(cfg))}", markup=False)
    _say_notices(say, sweep.plan.notices)
    return len(sweep.plan.notices)


def _say_notices(say: Callable[..., Any], notices: list[str]) -> None:
    from rich.markup import escape

    for notice in notices:
        say(f"[yellow]note[/yellow]: {escape(notice)}", soft_wrap=True)


def _sweep_ending(console: Any, say: Callable[..., Any], cfg: Any, ending: Any) -> int:
    """Spend, why it stopped or fell short, the summary; the exit code: 1 for a short study (a
    script must not take a short study for a whole) or one where no trial completed."""
    from rich.markup import escape

    from harness.display import print_summary

    if ending.spent_usd is not None:
        budget = cfg.sweep.budget_usd
        limit = "no budget set" if budget is None else f"budget ${budget:.2f}"
        console.print(f"spent ${ending.spent_usd:.4f} ({limit})")
    if ending.stop_reason:
        console.print(f"[yellow]stopped[/yellow]: {escape(ending.stop_reason)}", soft_wrap=True)
    short = ending.shortfall
    if ending.summary.best is None:
        last = ending.last_failure
        if ending.stop_reason and ending.stop_reason in last:  # said above: once is enough
            console.print("[red]no trial completed[/red]")
        else:
            console.print(f"[red]no trial completed[/red]; the last failure: {escape(last)}")
        if short:
            console.print(short, markup=False, soft_wrap=True)
        return 1
    print_summary(console, ending.summary)
    say(f"plots and summary.md: {ending.report_command}", markup=False, soft_wrap=True)
    if short and ending.stop_rule:  # a stop rule ended it: a normal end, exit 0
        console.print(short, markup=False, soft_wrap=True)
    elif short:
        console.print(f"[red]short of sweep.n_trials[/red]: {escape(short)}", soft_wrap=True)
        return 1
    return 0


def cmd_confirm(args: list[str]) -> int:
    """`harness sweep` with the confirm step alone (harness.study.confirm)."""
    from harness.config import load_config
    from harness.study.confirm import confirm_overrides

    cfg = load_config([a for a in args if a != "--quiet"])
    return cmd_sweep([*args, *confirm_overrides(cfg)])


def cmd_best(overrides: list[str]) -> int:
    from harness.config import load_config
    from harness.display import print_summary
    from harness.study.queries import load_study, stored_objectives, summarize

    cfg = load_config(overrides)
    study = load_study(cfg)
    summary = summarize(study, stored_objectives(study, cfg))
    if summary.best is None:
        print(f"study {cfg.name!r} has no completed trial yet", file=sys.stderr)
        return 1
    print_summary(_console(), summary)
    return 0


def cmd_train(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from harness.champion import train_champion, wants_champion
    from harness.config import ConfigError, load_config, split_overrides
    from harness.study.train import train_once

    if split_overrides(overrides).sweeps:
        raise ConfigError(
            "`harness train` takes fixed values; sweep expressions are for `harness sweep`"
        )
    cfg = load_config(overrides)
    console = _console()
    if wants_champion(cfg):
        return train_champion(overrides, lambda text: console.print(text, markup=False), cfg)
    with_validation = bool(OmegaConf.select(cfg, "with_validation", default=False))
    trained = train_once(cfg, overrides, with_validation=with_validation)
    metrics = trained.result.metrics
    for key in sorted(metrics):
        console.print(f"{key:24s} {metrics[key]:.6f}")
    console.print(f"objective ({cfg.sweep.metric}) = {metrics[cfg.sweep.metric]:.8f}")
    console.print(f"mlflow run: {trained.run_id}")
    return 0


def cmd_report(overrides: list[str]) -> int:
    from harness.config import load_config
    from harness.report import write_report

    write_report(load_config(overrides), _console())
    return 0


def cmd_ui(args: list[str]) -> int:
    from harness.config import ConfigError, load_config
    from harness.ui import serve

    optuna = "--optuna" in args
    # --port=N is --port N
    words = [w for a in args for w in (a.split("=", 1) if a.startswith("--port=") else [a])]
    overrides = [a for a in words if a != "--optuna"]
    port = 8080 if optuna else 5000
    if "--port" in overrides:
        index = overrides.index("--port")
        try:
            port = int(overrides[index + 1])
        except (IndexError, ValueError) as exc:
            raise ConfigError("--port takes a number: harness ui --port 5001") from exc
        del overrides[index : index + 2]
    console = _console()

    def say(text: str) -> None:
        console.print(text, markup=False)  # URLs and paths, as they are

    return serve(load_config(overrides), port, optuna, say)


def cmd_validate(overrides: list[str]) -> int:
    from harness.validate import validate

    return validate(overrides, _console())


def cmd_fake_openai(args: list[str]) -> int:
    from harness.fake_openai import serve_forever

    return serve_forever(args)


def cmd_fake_together(args: list[str]) -> int:
    from harness.fake_together import serve_forever

    return serve_forever(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "sweep": cmd_sweep,
    "train": cmd_train,
    "best": cmd_best,
    "confirm": cmd_confirm,
    "report": cmd_report,
    "ui": cmd_ui,
    "validate": cmd_validate,
    "fake-openai": cmd_fake_openai,
    "fake-together": cmd_fake_together,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"harness: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if ("-h" in rest or "--help" in rest) and not command.startswith("fake-"):
        print(USAGE)
        return 0
    _quiet_libraries()
    _exit_on_second_interrupt()
    from harness.backends.base import UntunableKeyError
    from harness.config import ConfigError
    from harness.data import DataError
    from harness.search import SearchSpaceError
    from harness.secrets import redact_error

    _redact_uncaught(rest)
    try:
        if "--cfg" in rest:
            return _print_config(rest)
        return COMMANDS[command](rest)
    except (ConfigError, DataError, SearchSpaceError, UntunableKeyError) as exc:
        print(f"harness {command}: error: {redact_error(str(exc), rest)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


def _redact_uncaught(overrides: list[str]) -> None:
    """A traceback this process dies with (or a thread of it) is printed with secrets
    redacted: its messages and frames may quote a storage URL or a key."""
    import threading
    import traceback

    from harness.secrets import redact_error

    def print_redacted(kind: Any, value: Any, tb: Any) -> None:
        text = "".join(traceback.format_exception(kind, value, tb))
        print(redact_error(text, overrides), file=sys.stderr, end="", flush=True)

    def print_thread_error(args: Any) -> None:
        if args.exc_type is not SystemExit:  # as threading's own hook: a thread's exit is quiet
            print_redacted(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = print_redacted
    threading.excepthook = print_thread_error


def _exit_on_second_interrupt() -> None:
    """The first Ctrl-C raises KeyboardInterrupt: the running trial stops, is recorded as
    failed, its runs are closed. SIGTERM (a scheduler taking the machine) raises Preempted, a
    KeyboardInterrupt after which the trial is retried from its saved state. A second one,
    while that cleanup runs, exits at once. The interrupt also cuts an MLflow request that is
    retrying short (a tracking server gone), and the requests that close the runs get one
    short try each."""
    import signal
    import threading

    interrupted = False

    def on_interrupt(signum: int, frame: Any) -> None:
        from harness.workers import Preempted

        nonlocal interrupted
        if interrupted:
            print("\ninterrupted again: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        else:
            interrupted = True
            tracking = sys.modules.get("harness.tracking")  # not loaded: no request to hurry
            if tracking is not None:
                tracking.hurry_server_requests()
            raise Preempted if signum == signal.SIGTERM else KeyboardInterrupt

    def on_unraisable(unraisable: Any) -> None:
        # A Ctrl-C that lands in a garbage collector's callback (SQLAlchemy has weakref ones)
        # is printed and dropped by Python ("Exception ignored in ..."): the command would go
        # on. It is sent again, as a first Ctrl-C, from a thread a moment later: a signal
        # raised here would be handled (and dropped) here.
        nonlocal interrupted
        if unraisable.exc_type is KeyboardInterrupt:
            interrupted = False
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:
            sys.__unraisablehook__(unraisable)

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)  # SLURM and Kubernetes stop jobs with it
    sys.unraisablehook = on_unraisable


def _print_config(rest: list[str]) -> int:
    from harness.config import load_config
    from harness.tracking import config_yaml

    index = rest.index("--cfg")
    print(config_yaml(load_config(rest[:index] + rest[index + 2 :])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
