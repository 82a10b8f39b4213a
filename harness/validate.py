"""`harness validate`: check a dataset and describe it, training nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness.config import load_config, with_params
from harness.data import Dataset, label_balance, load_dataset, resolve_path


def _guess_task(path: Path) -> str:
    """A file given by path: chat or prompt/completion rows mean generation."""
    with path.open(encoding="utf-8-sig") as handle:
        first = handle.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return "classification"  # CSV, or a malformed line the loader will report
    is_generation = isinstance(record, dict) and ("messages" in record or "prompt" in record)
    return "generation" if is_generation else "classification"


def overrides_for(arguments: list[str]) -> list[str]:
    """`harness validate some/file.jsonl` -> overrides pointing data.path at the file."""
    overrides = []
    for argument in arguments:
        if "=" in argument:
            overrides.append(argument)
            continue
        path = resolve_path(argument)
        overrides += [
            f"data.path={path}",
            f"data.name={path.stem}",
            f"data.task={_guess_task(path) if path.exists() else 'classification'}",
        ]
    return overrides


def token_lengths(cfg: Any, dataset: Dataset) -> list[int]:
    from harness.config import runs_dir
    from harness.tokenization import load_tokenizer, model_text

    tokenizer, _ = load_tokenizer(cfg, dataset, runs_dir(cfg) / "cache")
    texts = [model_text(e, dataset.task) for e in dataset.train + dataset.validation + dataset.test]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def validate(arguments: list[str], console: Any) -> int:
    from rich.table import Table

    cfg = load_config(overrides_for(arguments))
    dataset = load_dataset(cfg.data)
    console.print(f"dataset [bold]{cfg.data.name}[/bold] ({cfg.data.task}): OK")
    for path, digest in dataset.file_hashes.items():
        console.print(f"  {path}  sha256 {digest[:16]}", markup=False)  # a path, as it is
    sizes = {
        "train": len(dataset.train),
        "validation": len(dataset.validation),
        "test": len(dataset.test),
    }
    console.print(
        "  rows: "
        + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + f" (total {sum(sizes.values())})"
    )
    if dataset.task == "classification":
        table = Table(title="label balance")
        table.add_column("label")
        for split in sizes:
            table.add_column(split, justify="right")
        balances = {split: label_balance(getattr(dataset, split)) for split in sizes}
        for label in dataset.labels:
            table.add_row(label, *(str(balances[s].get(label, 0)) for s in sizes))
        console.print(table)
    if hasattr(make_backend(cfg), "estimate_cost_usd"):
        return hosted_costs(cfg, dataset, console)
    lengths = sorted(token_lengths(cfg, dataset))
    over = sum(1 for n in lengths if n > cfg.train.max_length)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    tokenizer_name = cfg.model.name_or_path or "BPE trained on the training split"
    console.print(
        f"  tokens per example ({tokenizer_name}): min {lengths[0]}, "
        f"mean {statistics.mean(lengths):.1f}, p95 {p95}, max {lengths[-1]}, "
        f"total {sum(lengths)}"
    )
    console.print(
        f"  {over} of {len(lengths)} examples exceed train.max_length="
        f"{cfg.train.max_length} and will be truncated"
    )
    return 0


def make_backend(cfg: Any) -> Any:
    from harness.study import make_backend as instantiate

    return instantiate(cfg)


def epochs_in_space(cfg: Any) -> list[int]:
    """Every value train.epochs can take in the study's search space (or its fixed value)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from harness.search import fixed_values, to_distributions

    space = dict(cfg.search.space)
    dist = to_distributions(space).get("train.epochs")
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, CategoricalDistribution):
        return sorted(int(str(v)) for v in dist.choices)
    return [int(str(fixed_values(space).get("train.epochs", cfg.train.epochs)))]


def hosted_costs(cfg: Any, dataset: Dataset, console: Any) -> int:
    """The API's data rules, token counts and the cost of every trial shape; spends nothing."""
    from rich.table import Table

    backend = make_backend(cfg)
    prepared = backend.describe(cfg, dataset)  # raises DataError where a rule is broken
    console.print(
        f"  hosted fine-tuning rules ({backend.model}): OK: {len(dataset.train)} training "
        "examples, roles valid, an assistant answer in each, every example within the token limit",
        soft_wrap=True,
    )
    exactness = "" if "estimate" not in prepared.tokens_note else " [yellow](estimate)[/yellow]"
    console.print(
        f"  training file: {prepared.file_tokens} tokens ({prepared.tokens_note}, plus the chat "
        f"format's overhead per message: close to, not exactly, what is billed){exactness}; "
        f"price ${prepared.usd_per_token * 1e6:.2f} per 1M training tokens",
        soft_wrap=True,
    )
    table = Table(title="cost per trial shape (billed tokens ~ n_epochs x file tokens)")
    for column in ("train.epochs", "training tokens", "cost USD"):
        table.add_column(column, justify="right")
    costs = []
    for epochs in epochs_in_space(cfg):
        trial_cfg = with_params(cfg, {"train.epochs": epochs})
        cost = backend.estimate_cost_usd(trial_cfg, prepared)
        costs.append(cost)
        table.add_row(str(epochs), str(epochs * prepared.file_tokens), f"{cost:.4f}")
    console.print(table)
    n = cfg.sweep.n_trials
    budget = cfg.sweep.budget_usd
    console.print(
        f"  {n} trials: ${n * min(costs):.4f} to ${n * max(costs):.4f} if none is pruned; "
        + ("no budget set (sweep.budget_usd)" if budget is None else f"budget ${budget:.2f}")
    )
    console.print("  test-split scoring (chat completions) is billed apart, at inference prices")
    return 0
