"""The champion: `harness train study=NAME +from_best=true` retrains with the study's best params
and registers the model in the MLflow model registry as NAME, alias ``champion``.

The champion is the confirmed winner where `harness confirm` (or sweep.confirm_top_k) ran: the
trial with the best mean over seeds (harness.noise); else the best trial. Its own command-line
overrides (its backend, data, fixed values) are applied again, then its params, then this
command's overrides, so any value can still be changed here.
``+with_validation=true`` trains on train + validation: the final fit once the search is over.
A hosted backend's champion is the best trial's fine-tuned model: it is registered as it is, and
nothing is paid again, unless ``+with_validation=true`` asks for a new job on more data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from harness.config import SWITCHES, ConfigError, load_config, split_overrides
from harness.noise import confirmed_winner
from harness.secrets import redact_text
from harness.study.plan import make_backend
from harness.study.queries import SWEEP_ONLY_KEYS, best_trial, load_study, override_value
from harness.study.train import train_once
from harness.tracking import MLflowStore

ALIAS = "champion"


def wants_champion(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "from_best", default=False))


def champion_overrides(overrides: list[str], best: optuna.trial.FrozenTrial) -> list[str]:
    """The best trial's plain overrides, then its params, then this command's overrides."""
    recorded = list(best.user_attrs.get("overrides", []))
    kept = [
        line
        for line in split_overrides(recorded).plain
        if _key(line) not in SWEEP_ONLY_KEYS | set(best.params) | set(SWITCHES)
        and "***" not in line  # a redacted secret: the real one comes from the environment
    ]
    params = [f"{key}={override_value(value)}" for key, value in best.params.items()]
    return [*kept, *params, *overrides]


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def champion_config(
    overrides: list[str], first: DictConfig | None = None
) -> tuple[DictConfig, optuna.trial.FrozenTrial, DictConfig]:
    """This command's config (``first``, when the caller has composed it already), the study's
    best trial, and the champion's config: composed once more, as only the stored study knows
    the best trial's overrides."""
    first = load_config(overrides) if first is None else first
    best = champion_trial(load_study(first))
    if best is None:
        raise ConfigError(f"study {first.name!r} has no completed trial: nothing to retrain")
    return first, best, load_config(champion_overrides(overrides, best))


def champion_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The confirmed winner (best mean over seeds, harness.noise) where the study has one;
    else its best trial."""
    winner = confirmed_winner(study)
    if winner is None:
        return best_trial(study)
    return study.get_trials(deepcopy=False)[winner.number]


def _champion_line(name: str, best: optuna.trial.FrozenTrial, first: DictConfig) -> str:
    """Which trial is the champion, and why: its value, or its confirmed mean over seeds."""
    winner = confirmed_winner(load_study(first))
    if winner is not None and winner.number == best.number:
        why = f"the confirmed winner: {winner.line(str(first.sweep.metric))}"
    else:
        why = f"{best.values[0]:.4f}"
    return f"champion of study {name}: trial {best.number}'s params ({why})"


def train_champion(
    overrides: list[str], say: Callable[[str], None], first: DictConfig | None = None
) -> int:
    first, best, cfg = champion_config(overrides, first)
    with_validation = bool(OmegaConf.select(first, "with_validation", default=False))
    name = str(first.name)
    store = MLflowStore.of(cfg)  # its user:pass@ as MLflow's basic auth
    say(_champion_line(name, best, first))

    hosted = _hosted_model_of(store, best)
    if hosted is not None and not with_validation:
        version = _register_hosted(store, name, hosted, best)
        say(
            f"champion: {hosted['id']} (the fine-tuned model of trial {best.number}; "
            f"no new job)\nregistered: models:/{name}@{ALIAS} (version {version})\n"
            "use it:\n  from openai import OpenAI\n"
            f"  OpenAI().chat.completions.create(model={hosted['id']!r}, messages=[...])"
        )
        return 0

    tags = {"harness.champion_of": name, "harness.from_trial": str(best.number)}
    trained = train_once(
        cfg, overrides, "champion", tags, with_validation, register_as=None if hosted else name
    )
    for key in sorted(trained.result.metrics):
        say(f"{key:24s} {trained.result.metrics[key]:.6f}")
    if with_validation:
        say("(eval/* were measured on validation data this run trained on; test/* are held out)")
    if hosted is not None or trained.result.hosted_model:
        model_id = (trained.result.hosted_model or {}).get("id", "")
        version = _register_hosted(store, name, {"run": trained.run_id, "id": model_id}, best)
        say(f"champion: {model_id}\nregistered: models:/{name}@{ALIAS} (version {version})")
        return 0
    if trained.model_uri is None:
        say(
            f"backend {make_backend(cfg).name} saves no model: nothing to "
            f"register (run {trained.run_id})"
        )
        return 1
    version = trained.model_uri.rsplit("/", 1)[-1]
    _set_alias(store, name, version, best)
    say(
        f"champion: models:/{name}@{ALIAS} (version {version}, run {trained.run_id})\n"
        "load it:\n  import mlflow\n"
        f"  mlflow.set_tracking_uri({redact_text(store.uri)!r})\n"
        f'  model = mlflow.transformers.load_model("models:/{name}@{ALIAS}")\n'
        '  model("a text to classify or complete")'
    )
    return 0


def _hosted_model_of(store: MLflowStore, best: optuna.trial.FrozenTrial) -> dict[str, str] | None:
    """The best trial's fine-tuned model, if a hosted backend made one: its id and the MLflow
    entry (an external model) the sweep recorded for it."""
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    tags = store.run_tags(run_id)
    if not tags.get("harness.hosted_model"):
        return None
    return {
        "id": tags["harness.hosted_model"],
        "run": run_id,
        "logged_model_id": tags.get("harness.logged_model_id", ""),
    }


def _register_hosted(
    store: MLflowStore, name: str, hosted: dict[str, str], best: optuna.trial.FrozenTrial | None
) -> str:
    """A registry version for a model that lives with a provider: the external model entry
    where there is one, else the run; the fine-tuned model id as a version tag."""
    model_id = hosted.get("logged_model_id")
    if not model_id:  # the new job's run: find the entry run_trial recorded
        model_id = store.run_tags(hosted["run"]).get("harness.logged_model_id", "")
    if not model_id:
        raise ConfigError(f"run {hosted['run']} has no model entry for {hosted['id']!r}")
    version = store.register_model(f"models:/{model_id}", name)
    _set_alias(store, name, version, best, {"hosted_model": hosted["id"]})
    return version


def _set_alias(
    store: MLflowStore,
    name: str,
    version: str,
    best: optuna.trial.FrozenTrial | None,
    extra: dict[str, Any] | None = None,
) -> None:
    tags = {**(extra or {})}
    if best is not None:
        tags |= {"from_trial": best.number, "objective": best.values[0]}
    store.set_alias(name, ALIAS, version, tags)
