"""The backend protocol: what every way of running a trial (local GPT-2, a hosted job, the fake)
must do, and what it declares about itself. Implementations share no base code; the contract
test suite (tests/test_backend_contract.py) checks each against the contract stated here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig

from harness.data import Dataset, ExampleCheck

# The values a config key may take: (low, high), None for an open end.
Limit = tuple[float | None, float | None]


class Reporter(Protocol):
    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records metrics at a training step (``train/loss`` each step, ``eval/*`` at each
        evaluation). When the metrics include the study's objective metric, the value is also
        reported to Optuna, and ``optuna.TrialPruned`` is raised if the trial should stop: the
        backend lets it propagate, which stops the trial at once. A backend that spends money
        reports ``cost_usd`` (the trial's spend so far) as it goes, and once its work is
        stopped (pruned, interrupted, failed) what that work billed, in a report without an
        evaluation, so nothing is pruned on it."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Labels the trial's run as soon as something is known (a hosted job's id, say)."""

    def set_total_steps(self, total: int) -> None:
        """The steps the trial will take if nothing stops it early, as soon as it is known
        (again if the estimate changes): the length of the trial's progress bar."""


@dataclass(frozen=True)
class TrialSpec:
    number: int  # Optuna trial number; -1 for a single `harness train` run
    config: DictConfig  # the full config with this trial's params applied
    prepared: Any  # what Backend.prepare returned: shared by every trial of the study
    workdir: Path  # this trial's scratch folder: artifacts and a saved model go here
    save_model: bool = True  # save the final model under workdir/model
    # Stable identity of this trial's work. A retry of a trial whose process died has the key of
    # the trial it retries, so a hosted backend finds the job that process started rather than
    # paying for another. Empty: the backend makes up a unique one.
    key: str = ""
    _: KW_ONLY
    # What the trial's evaluations are judged by (the study's sweep.metric and sweep.direction,
    # also in a multi-objective study): the metric early stopping and the kept checkpoint follow.
    metric: str  # one of the backend's eval_metrics or eval_metrics_on_demand
    direction: str  # "maximize" or "minimize"


def optimized_metrics(spec: TrialSpec) -> frozenset[str]:
    """What the study optimizes: sweep.metric and any key of sweep.objectives. An evaluation
    measures an on-demand metric (Backend.eval_metrics_on_demand) only when one is here."""
    return frozenset({spec.metric, *spec.config.sweep.objectives})


@dataclass
class TrialResult:
    metrics: dict[str, float]  # eval/* of the kept model (best evaluation) and test/*
    artifacts: list[Path] = field(default_factory=list)  # files to attach to the trial's run
    model_dir: Path | None = None  # saved model (transformers format) when spec.save_model
    steps: int = 0  # optimizer steps taken
    # A model that lives with a provider, not on disk: its id and details (job id, base model),
    # recorded in MLflow as an external model entry beside local ones.
    hosted_model: dict[str, str] | None = None


@runtime_checkable
class Backend(Protocol):
    """One way of running trials. The contract (tests/test_backend_contract.py checks it):

    Declared, before any trial:
    - ``name``: the backend's name in messages, the CLI and the study's fingerprint; stored with
      every study, so it never changes (a renamed backend would refuse its own studies).
    - ``tunable_keys(cfg)``: what a search space may vary under this config.
    - ``hard_limits()``: the values the backend accepts for a key, narrower than harness's own.
    - ``eval_metrics(task)``: the metrics every evaluation reports.
    - ``eval_metrics_on_demand(task)``: the metrics evaluations report only when the study
      optimizes one of them (they cost more: generated text). The objective is one of these or
      of ``eval_metrics`` (or a test/* metric).
    - ``example_check(cfg)``: the backend's own rule per data example, or None.
    - ``check_config(cfg, searched)``: the backend's own checks of the config, before any trial.

    A trial (``run``):
    - calls ``reporter.set_total_steps`` before its first report, and again if the estimate
      changes; the last value given is the number of steps a trial run to the end took;
    - reports ``train/loss`` at each optimizer step 1, 2, ... in increasing order, and at each
      evaluation (one per epoch unless configured otherwise) every one of ``eval_metrics``,
      and every one of ``eval_metrics_on_demand`` when ``spec.metric`` or a key of the config's
      ``sweep.objectives`` is one of them (none of them otherwise). A hosted backend, whose
      provider evaluates during the job, measures its on-demand metrics once, after the job,
      at the job's last step (they need the finished model's answers): a study optimizing one
      has nothing to prune on before;
    - lets ``optuna.TrialPruned`` from the reporter propagate: nothing is trained or evaluated
      after it (a paid backend then reports only what the stopped work billed);
    - returns the eval/* metrics of the model it keeps (the best evaluation by ``spec.metric``
      and ``spec.direction`` where it can choose, as the local backend does; a hosted job's
      final model), that model's test/* metrics on the test split, and artifacts that exist;
    - is deterministic: the same config (seed included) and prepared data give the same
      metrics, and a change of a tunable key changes them.
    """

    name: str

    def tunable_keys(self, cfg: DictConfig) -> frozenset[str]:
        """Config keys a search space may vary under ``cfg``: exact keys, or prefixes "train.*".
        Keys that shape what ``prepare`` made once per study (a checkpoint, a tokenizer) are
        never tunable."""

    def hard_limits(self) -> Mapping[str, Limit]:
        """The values this backend accepts for a key, where they are narrower than harness's
        valid ranges (a provider's API limits): advice never suggests a value beyond them."""

    def eval_metrics(self, task: str) -> tuple[str, ...]:
        """The metrics every evaluation of a ``task`` trial reports: what sweep.metric may be."""

    def eval_metrics_on_demand(self, task: str) -> tuple[str, ...]:
        """Metrics the evaluations of a ``task`` trial can report but measure only when the
        study optimizes one of them (sweep.metric or a key of sweep.objectives), since they
        cost more (the local backend generates text for the whole validation split at each
        evaluation); then every evaluation reports all of them. sweep.metric may be one of
        these too. Disjoint from ``eval_metrics``; empty where the backend cannot measure any."""

    def example_check(self, cfg: DictConfig) -> ExampleCheck | None:
        """The backend's own rules per data example (see harness.data.ExampleCheck), for
        ``load_dataset`` to run on each file as it is loaded; None: no rule beyond harness's."""

    def check_config(self, cfg: DictConfig, searched: frozenset[str]) -> None:
        """Raises a ConfigError for a config this backend cannot run, before any trial and any
        write: a setting the model or the machine lacks (a knob the loaded architecture does not
        have, 4-bit quantization without CUDA). ``searched``: the keys the search space varies.
        Reads at most a model's config file, never the network beyond it."""

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> Any:
        """Once per study: tokenize / upload / convert the data; the result is reused by every
        trial (as TrialSpec.prepared), so it must not depend on searched keys."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        """Runs one trial to the end (or until the reporter raises TrialPruned)."""


class CostBasis(Protocol):
    """What a paid backend counts in the data before spending anything: the basis of its cost
    estimates, and what `harness validate` shows."""

    file_tokens: int  # tokens in the training file: billed once per epoch
    tokens_note: str  # how they were counted (exact encoding or an estimate)
    usd_per_token: float


@runtime_checkable
class PaidBackend(Backend, Protocol):
    """A backend whose trials cost money: the study checks its credentials first and its budget
    before each trial, `harness validate` shows what the trials would cost, and a trial may
    have ``cost_usd`` as an objective. Checked with ``isinstance(backend, PaidBackend)``."""

    model: str  # the provider's base model: what prices and data limits depend on

    def check_credentials(self) -> None:
        """Raises a ConfigError when the provider's credentials are missing or refused; reads
        no file under runs/ and makes at most one request, so a sweep can check it before
        anything else."""

    def describe(self, cfg: DictConfig, dataset: Dataset) -> CostBasis:
        """Converts and checks the data and counts what is billed, touching no network: what
        ``harness validate`` shows and ``estimate_cost_usd`` accepts as ``prepared``."""

    def estimate_cost_usd(self, cfg: DictConfig, prepared: Any) -> float:
        """What a trial with this config would cost, before it is launched (``prepared``: what
        ``prepare`` or ``describe`` returned)."""

    def abandon(self, key: str) -> float | None:
        """Stops paid work started under this trial key that nobody will follow again; returns
        what that work billed in USD once stopped (None: unknown), for the caller to record."""


class UntunableKeyError(ValueError):
    pass


def check_tunable(backend_name: str, tunable: frozenset[str], keys: Iterable[str]) -> None:
    """Fails before any trial starts when the search space varies a key the backend ignores."""

    def allowed(key: str) -> bool:
        return key in tunable or any(p.endswith(".*") and key.startswith(p[:-1]) for p in tunable)

    bad = sorted(k for k in keys if not allowed(k))
    if bad:
        raise UntunableKeyError(
            f"backend {backend_name!r} cannot tune {', '.join(bad)}; it tunes "
            f"{', '.join(sorted(tunable))}. Fix the key with a plain value or remove it from "
            "the search space."
        )


# train.method -> what it trains on, for messages
TRAINING_METHODS = {
    "sft": "supervised fine-tuning on answers to imitate",
    "dpo": "preference tuning (DPO) on preferred/non-preferred answer pairs",
}


def check_training_method(cfg: DictConfig, backend_name: str, offered: Iterable[str]) -> None:
    """train.method names a method this backend offers, and the data fit it (preference pairs
    for dpo, and only for dpo): a ConfigError before any trial otherwise."""
    from harness.config import ConfigError

    method, offered = str(cfg.train.method), tuple(offered)
    if method not in TRAINING_METHODS:
        raise ConfigError(
            f"train.method={method!r} is not a training method: choose "
            + " or ".join(f"{m} ({why})" for m, why in TRAINING_METHODS.items())
        )
    preference = str(cfg.data.task) == "preference"
    # preference pairs need dpo whatever train.method says: say so at once, not one key later
    needed = "dpo" if preference else method
    if needed not in offered:
        what = f"train.method={method}" if needed == method else "data.task=preference (dpo)"
        raise ConfigError(
            f"{what}: backend {backend_name!r} offers only "
            f"{', '.join(offered)}. Preference tuning runs on hosted backends that offer it: "
            "backend=openai, backend=azure_openai or backend=together."
        )
    if preference != (method == "dpo"):
        fix = "train.method=dpo" if preference else "a data set with data.task=preference"
        raise ConfigError(
            f"train.method={method} with data.task={cfg.data.task}: {method} trains on "
            f"{'preference pairs' if method == 'dpo' else 'answers to imitate'}; use {fix}"
        )
