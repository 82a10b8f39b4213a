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
  train      one run with fixed hyperparameters (e.g. the overrides `harness best` prints)
  best       print the best trial and the command that reproduces it
  validate   check a dataset (data=NAME, or a file path): size, labels, token statistics;
             for a hosted backend also the API's rules and tokens and cost per trial shape
  fake-openai  serve a loopback fake of the OpenAI fine-tuning API, for free dry runs
             (--port 8787; --help lists its fault-injection options)

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
  harness fake-openai --port 8787 &
  harness sweep study=tickets_openai backend.base_url=http://127.0.0.1:8787/v1
  mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db
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
    warnings.filterwarnings("ignore", module="mlflow")


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_sweep(overrides: list[str]) -> int:
    from harness.config import load_config
    from harness.study import Sweep, TrialOutcome, describe_storage
    from harness.tracking import redact_text, tracking_uri

    console = _console()
    cfg = load_config(overrides)

    def on_trial(outcome: TrialOutcome) -> None:
        if outcome.reason.startswith("surplus"):
            return  # a trial another worker made unnecessary: never run
        value = "" if outcome.value is None else f"objective={outcome.value:.4f}"
        params = " ".join(
            f"{k.split('.')[-1]}={_format_value(v)}" for k, v in outcome.params.items()
        )
        style = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}.get(outcome.state, "")
        cost = "" if outcome.cost_usd is None else f" ${outcome.cost_usd:.4f}"
        console.print(
            f"trial {outcome.number:4d} [{style}]{outcome.state:8s}[/{style}] "
            f"{value:18s} {outcome.seconds:6.1f}s{cost}  {params} {outcome.reason}",
            soft_wrap=True,  # one line per trial, also in log files
        )

    sweep = Sweep(cfg, overrides, on_trial)
    if sweep.is_helper:  # a worker process of `sweep.n_workers`: trial lines only
        sweep.run()
        return 0
    workers = f", {cfg.sweep.n_workers} workers" if cfg.sweep.n_workers > 1 else ""
    console.print(
        f"study [bold]{cfg.name}[/bold]: {cfg.sweep.n_trials} trials, "
        f"{cfg.sweep.direction} {cfg.sweep.metric}; sampler {cfg.sampler.name}, "
        f"pruner {cfg.pruner.name}, backend {cfg.backend._target_.rsplit('.', 1)[-1]}{workers}"
    )
    console.print(f"optuna storage: {describe_storage(cfg)}")
    console.print(f"mlflow: {redact_text(tracking_uri(cfg))}")
    study = sweep.run()
    if any("cost_usd" in t.user_attrs for t in study.trials):
        from harness.study import study_spend

        budget = cfg.sweep.budget_usd
        limit = "no budget set" if budget is None else f"budget ${budget:.2f}"
        console.print(f"spent ${study_spend(study):.4f} ({limit})")
    if sweep.stop_reason:
        console.print(f"[yellow]stopped[/yellow]: {sweep.stop_reason}", soft_wrap=True)
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not completed:
        console.print("[red]no trial completed[/red]: see the FAIL reasons above")
        return 1
    _print_best(console, study, cfg.sweep.metric)
    return 0


def _print_best(console: Any, study: Any, metric: str) -> None:
    from rich.table import Table

    from harness.study import reproduce_command

    best = study.best_trial
    states = [t.state.name for t in study.trials]
    console.print(
        f"\n{len(states)} trials: {states.count('COMPLETE')} complete, "
        f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed"
    )
    table = Table(title=f"best trial: {best.number}  ({metric} = {best.value:.4f})")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in best.params.items():
        table.add_row(key, _format_value(value))
    metrics = best.user_attrs.get("metrics", {})
    for key in sorted(metrics, key=lambda k: (not k.startswith("eval/"), k)):
        table.add_row(key, f"{metrics[key]:.4f}")
    console.print(table)
    # the overrides of the invocation that ran the best trial (a resume may have had others)
    overrides = list(best.user_attrs.get("overrides", study.user_attrs.get("overrides", [])))
    console.print("reproduce with:")
    console.print(reproduce_command("train", overrides, best.params), markup=False, soft_wrap=True)
    if "best_model_uri" in study.user_attrs:
        console.print(f"best model: {study.user_attrs['best_model_uri']}")


def cmd_best(overrides: list[str]) -> int:
    from harness.config import load_config
    from harness.study import load_study

    cfg = load_config(overrides)
    study = load_study(cfg)
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        print(f"study {cfg.name!r} has no completed trial yet", file=sys.stderr)
        return 1
    _print_best(_console(), study, cfg.sweep.metric)
    return 0


def cmd_train(overrides: list[str]) -> int:
    from harness.config import ConfigError, load_config, split_overrides
    from harness.study import train_once

    if split_overrides(overrides).sweeps:
        raise ConfigError(
            "`harness train` takes fixed values; sweep expressions are for `harness sweep`"
        )
    cfg = load_config(overrides)
    result, run_id = train_once(cfg, overrides)
    console = _console()
    for key in sorted(result.metrics):
        console.print(f"{key:24s} {result.metrics[key]:.6f}")
    console.print(f"objective ({cfg.sweep.metric}) = {result.metrics[cfg.sweep.metric]:.8f}")
    console.print(f"mlflow run: {run_id}")
    return 0


def cmd_validate(overrides: list[str]) -> int:
    from harness.validate import validate

    return validate(overrides, _console())


def cmd_fake_openai(args: list[str]) -> int:
    from harness.fake_openai import serve_forever

    return serve_forever(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "sweep": cmd_sweep,
    "train": cmd_train,
    "best": cmd_best,
    "validate": cmd_validate,
    "fake-openai": cmd_fake_openai,
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
    if ("-h" in rest or "--help" in rest) and command != "fake-openai":
        print(USAGE)
        return 0
    _quiet_libraries()
    _exit_on_second_interrupt()
    from harness.backends.base import UntunableKeyError
    from harness.config import ConfigError
    from harness.data import DataError
    from harness.search import SearchSpaceError

    try:
        if "--cfg" in rest:
            return _print_config(rest)
        return COMMANDS[command](rest)
    except (ConfigError, DataError, SearchSpaceError, UntunableKeyError) as exc:
        print(f"harness {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


def _exit_on_second_interrupt() -> None:
    """The first Ctrl-C raises KeyboardInterrupt: the running trial stops, is recorded as
    failed, its runs are closed. A second one, while that cleanup runs, exits at once."""
    import signal

    interrupted = False

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:
            print("\ninterrupted again: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        else:
            interrupted = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)  # SLURM and Kubernetes stop jobs with it


def _print_config(rest: list[str]) -> int:
    from harness.config import load_config
    from harness.tracking import config_yaml

    index = rest.index("--cfg")
    print(config_yaml(load_config(rest[:index] + rest[index + 2 :])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
