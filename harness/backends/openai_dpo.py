"""What the OpenAI fine-tuning API (OpenAI and Azure OpenAI alike) needs for the two training
methods harness runs there: a job's ``method`` field (supervised, or dpo with its beta), the
beta's hard limit, and the base model of an ``ft:`` model id (DPO often starts from a model that
supervised fine-tuning made: the SFT-then-DPO chain), which is what prices and token limits
follow.

Field names are the openai SDK's own (openai/types/fine_tuning/dpo_method_param.py,
dpo_hyperparameters_param.py): ``{"type": "dpo", "dpo": {"hyperparameters": {"beta",
"n_epochs", "batch_size", "learning_rate_multiplier"}}}``; beta is "auto" or in (0, 2].
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from harness.config import ConfigError

BETA_LIMIT = (0.0, 2.0)  # the API's beta: above 0, at most 2


def method_json(cfg: DictConfig) -> dict[str, Any]:
    """The job's ``method``: the trial's hyperparameters under supervised or dpo."""
    hyperparameters: dict[str, Any] = {
        "n_epochs": int(cfg.train.epochs),
        "batch_size": int(cfg.train.batch_size),
        "learning_rate_multiplier": float(cfg.train.learning_rate_multiplier),
    }
    if str(cfg.train.method) != "dpo":
        return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    hyperparameters["beta"] = float(cfg.train.dpo_beta)
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def check_beta(cfg: DictConfig, searched: frozenset[str]) -> None:
    """train.dpo_beta, fixed or at either end of its search range, within the API's (0, 2]:
    a ConfigError before any job otherwise (the API would refuse every such trial)."""
    if str(cfg.train.method) != "dpo":
        return
    from harness import search

    key = "train.dpo_beta"
    if key in searched:
        expression = str(cfg.search.space[key])
        values = list(search.extremes(search.to_distributions({key: expression})[key]))
        where = f"search space {key}={expression}"
    else:
        values, where = [float(cfg.train.dpo_beta)], f"{key}={cfg.train.dpo_beta}"
    low, high = BETA_LIMIT
    bad = [v for v in values if not low < float(v) <= high]
    if bad:
        raise ConfigError(
            f"{where}: {bad[0]!r} is outside what the fine-tuning API takes for DPO's beta "
            f"({low:g}, {high:g}]; keep it within, e.g. 'train.dpo_beta=tag(log, "
            "interval(0.02, 2.0))'"
        )


def base_model(model: str) -> str:
    """The base model of a fine-tuned model id, for prices and limits: OpenAI's
    ``ft:BASE:org:suffix:id`` gives BASE; Azure's ``BASE.ft-<id>`` starts with its base, as
    every other id does, so the prefix lookups find it as it is."""
    return model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else model
