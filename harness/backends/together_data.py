"""A Together study's data, once per study: uploaded once per content (found again by file name,
or by the checksum the SDK sends, before uploading again), the base model's own limits read once
and the search space checked against them, and Together's price estimate compared with
harness's arithmetic (epochs x file tokens x price), both recorded.

Together counts tokens with the model's own tokenizer; harness counts them with tiktoken before
anything is uploaded, an estimate for a Llama or Qwen model: the provider's estimate and the
job's own ``token_count`` / ``total_price`` are the figures that bill.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.chat_data import Chat
from harness.config import ConfigError
from harness.data import DataError


@dataclass
class Prepared:
    """What every trial of a study shares: uploaded files, the scored splits, token counts, the
    model's limits and the price check."""

    task: str
    labels: list[str]
    training_file: str
    validation_file: str
    test: list[Chat]
    validation: list[Chat]  # scored after a preference (DPO) job: eval/preferred_rate
    file_tokens: int  # tokens in the training file: billed once per epoch
    validation_tokens: int  # tokens in the validation file: billed once per evaluation
    tokens_note: str  # how they were counted: an estimate for Together's own tokenizers
    usd_per_token: float
    max_answer_tokens: int
    n_train: int  # training examples: steps per epoch ~ ceil(n_train / batch_size)
    training_type: str  # "Lora" (adapter=lora) or "Full" (adapter=none)
    method: str  # train.method: sft or dpo
    n_evals_per_epoch: int  # backend.n_evals_per_epoch
    model_limits: Any = None  # the SDK's FinetuneModelLimits, read once per study
    estimate_tags: dict[str, str] = field(default_factory=dict)  # our estimate vs Together's

    def n_evals(self, epochs: int) -> int:
        """The evaluations a job of ``epochs`` runs: what it bills validation tokens for."""
        from harness.backends.together_jobs import evaluations

        return evaluations(epochs, self.n_evals_per_epoch, self.model_limits)

    def billed_tokens(self, epochs: int) -> int:
        """What a whole job of ``epochs`` bills: each epoch's training file and each
        evaluation's validation file (Together's pricing page)."""
        return epochs * self.file_tokens + self.n_evals(epochs) * self.validation_tokens


def upload(client: Any, folder: Path, name: str, content: bytes) -> str:
    """The id of an upload of ``content`` named ``name``: one already there (same name and
    size), else a new upload through the SDK, whose own file check runs first. The SDK sends
    the file's sha256; Together answers an identical file with the existing upload's id."""
    from together.lib.types.error import FileTypeError

    for existing in client.files.list().data:
        if existing.filename == name and existing.bytes == len(content):
            return str(existing.id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name  # the SDK uploads a path: the content's hash is in its name
    if not path.exists() or path.read_bytes() != content:
        partial = path.with_suffix(".partial")
        partial.write_bytes(content)
        partial.replace(path)
    try:
        return str(client.files.upload(path, purpose="fine-tune", check=True).id)
    except FileTypeError as exc:
        raise DataError(f"{path}: Together's file check refused it: {exc}") from None


def read_model_limits(client: Any, model: str, refusal: Any) -> Any:
    """The base model's fine-tuning limits (epochs, learning rates, batch sizes, LoRA rank),
    once per study; a model Together does not fine-tune is a ConfigError before any trial
    (``refusal(exc)`` words it)."""
    import together

    try:
        return client.fine_tuning.model_limits(model_name=model)
    except (together.NotFoundError, together.BadRequestError, together.PermissionDeniedError) as e:
        raise ConfigError(refusal(e)) from None


def check_space(cfg: DictConfig, limits: Any, training_type: str, method: str) -> None:
    """Every value the study's trials may give a knob, inside the base model's own limits: a
    ConfigError naming the key before any job is created."""
    bounds: dict[str, tuple[float, float]] = {
        "train.epochs": (1, limits.max_num_epochs),
        "train.learning_rate": (limits.min_learning_rate, limits.max_learning_rate),
    }
    if training_type == "Lora":
        lora = limits.lora_training
        bounds["lora.r"] = (1, lora.max_rank)
        batch = (
            lora.min_batch_size,
            lora.max_batch_size_dpo if method == "dpo" else lora.max_batch_size,
        )
    elif not limits.supports_full_training or limits.full_training is None:
        raise ConfigError(
            f"adapter=none: Together offers no full fine-tuning of {limits.api_model_name}; "
            "use adapter=lora"
        )
    else:
        full = limits.full_training
        batch = (
            full.min_batch_size,
            full.max_batch_size_dpo if method == "dpo" else full.max_batch_size,
        )
    bounds["train.batch_size"] = batch
    for key, (low, high) in bounds.items():
        for value in values_of(cfg, key):
            if not low <= float(value) <= high:
                raise ConfigError(
                    f"{key}={value}: Together takes {low:g} to {high:g} for "
                    f"{limits.api_model_name} ({training_type}, {method}); narrow the search "
                    "space or the value"
                )


def values_of(cfg: DictConfig, key: str) -> list[Any]:
    """The values that bound what ``key`` takes in the study: its search range's ends or
    choices, else its value."""
    from harness.search import extremes, to_distributions

    space = OmegaConf.to_container(cfg.search.space) if "search" in cfg else {}
    distribution = to_distributions(dict(space or {})).get(key)  # type: ignore[arg-type]
    return extremes(distribution) if distribution is not None else [OmegaConf.select(cfg, key)]


@dataclass(frozen=True)
class EstimateCheck:
    ours_usd: float
    epochs: int
    n_evals: int
    tolerance: float  # relative gap that warns
    training_type: dict[str, Any]  # as the trials' jobs send it (Full, or Lora with its rank)


def compare_estimate(client: Any, prepared: Prepared, check: EstimateCheck, model: str) -> None:
    """Asks Together's estimate for a job of the study's shape once, compares it with harness's
    arithmetic, records both in ``prepared.estimate_tags`` (every trial's run carries them) and
    warns when they differ by more than ``check.tolerance``. Never fails the study: an
    estimate is advice; the jobs' own figures bill."""
    log = logging.getLogger("harness")
    tags = {
        "together.estimate_usd": f"{check.ours_usd:.6f}",
        "together.estimate_basis": f"({check.epochs} epochs x {prepared.file_tokens} + "
        f"{check.n_evals} evaluations x {prepared.validation_tokens}) tokens "
        f"({prepared.tokens_note}) x ${prepared.usd_per_token * 1e6:g}/1M",
    }
    try:
        answer = client.fine_tuning.estimate_price(**_estimate_request(prepared, check, model))
    except Exception as exc:  # the estimate is advice: the study goes on without it
        tags["together.provider_estimate"] = f"unavailable: {type(exc).__name__}: {exc}"[:500]
        prepared.estimate_tags = tags
        return
    theirs = getattr(answer, "estimated_total_price", None)
    if answer.estimation_available is False or theirs is None:
        reason = getattr(answer, "unavailable_reason", None) or "no estimated_total_price"
        tags["together.provider_estimate"] = f"unavailable: {reason}"
        prepared.estimate_tags = tags
        return
    gap = (float(theirs) - check.ours_usd) / check.ours_usd if check.ours_usd else math.inf
    tags["together.provider_estimate_usd"] = f"{float(theirs):.6f}"
    tags["together.provider_train_tokens"] = str(answer.estimated_train_token_count)
    tags["together.estimate_gap"] = f"{gap:+.3f}"
    prepared.estimate_tags = tags
    if abs(gap) > check.tolerance:
        log.warning(
            "Together estimates a %d-epoch job at $%.4f; harness's arithmetic says $%.4f "
            "(%+.0f%%, more than backend.estimate_tolerance=%g). harness counts tokens with "
            "%s and prices from backend.prices_per_1m_training_tokens: check those prices; "
            "sweep.budget_usd is checked against harness's figure until jobs bill.",
            check.epochs,
            float(theirs),
            check.ours_usd,
            100 * gap,
            check.tolerance,
            prepared.tokens_note,
        )


def _estimate_request(prepared: Prepared, check: EstimateCheck, model: str) -> dict[str, Any]:
    method: dict[str, Any] = {"method": prepared.method}
    if prepared.method == "sft":
        method["train_on_inputs"] = "auto"
    return {
        "training_file": prepared.training_file,
        "validation_file": prepared.validation_file,
        "model": model,
        "n_epochs": check.epochs,
        "n_evals": check.n_evals,
        "training_type": check.training_type,
        "training_method": method,
    }


def nested_prices(mapping: Any) -> dict[str, dict[str, dict[str, float]]]:
    """backend.prices_per_1m_training_tokens as plain dicts: training type (lora, full) ->
    method (sft, dpo) -> model id or prefix -> USD per 1M tokens."""
    plain = OmegaConf.to_container(mapping) if isinstance(mapping, DictConfig) else mapping
    shape_ok = isinstance(plain, Mapping) and all(
        isinstance(by_method, Mapping) and all(isinstance(m, Mapping) for m in by_method.values())
        for by_method in plain.values()
    )
    if not shape_ok:
        raise ConfigError(
            "backend.prices_per_1m_training_tokens must map a training type (lora, full) to a "
            f"method (sft, dpo) to model names and USD per 1M tokens, not {mapping!r}; "
            "conf/backend/together.yaml shows it"
        )
    assert isinstance(plain, Mapping)  # shape_ok says so
    return {
        str(kind): {str(method): dict(prices) for method, prices in by_method.items()}
        for kind, by_method in plain.items()
    }
