"""`harness validate`: check a dataset and describe it, training nothing."""

from __future__ import annotations

import statistics
from typing import Any

from omegaconf import DictConfig

from harness.backends.base import Backend, PaidBackend
from harness.config import load_config, with_params
from harness.data import (
    Dataset,
    Example,
    detect_task,
    label_balance,
    load_dataset,
    resolve_path,
)

TRUNCATED_SHOWN = 5  # offending lines listed in the truncation notice


def config_for(arguments: list[str]) -> tuple[DictConfig, str]:
    """The config `harness validate ARGS` checks, and how its task was chosen. A file given by
    path becomes data.path (its name data.name); its task is detected from its rows
    (``detect_task``) unless data.task= is on the command line."""
    files = [resolve_path(a) for a in arguments if "=" not in a]
    # group choices (data=NAME, study=NAME) apply before any key, so the file still wins over
    # them, while the user's own data.* keys, coming after, win over the file's defaults
    given = [o for path in files for o in (f"data.path={path}", f"data.name={path.stem}")]
    cfg = load_config(given + [a for a in arguments if "=" in a])
    if not files:
        return cfg, "from the config"
    if any(argument.startswith("data.task=") for argument in arguments):
        return cfg, "data.task on the command line"
    task, why = detect_task(resolve_path(cfg.data.path), cfg.data)
    return with_params(cfg, {"data.task": task}), f"detected: {why}"


def token_lengths(cfg: Any, dataset: Dataset) -> list[int]:
    from harness.config import runs_dir
    from harness.tokenization import load_tokenizer, model_text

    tokenizer, _ = load_tokenizer(cfg, dataset, runs_dir(cfg) / "cache")
    texts = [model_text(e, dataset.task) for e in all_examples(dataset)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def all_examples(dataset: Dataset) -> list[Example]:
    return dataset.train + dataset.validation + dataset.test


def truncation_notice(examples: list[Example], lengths: list[int], max_length: int) -> str:
    """How many examples exceed max_length, and the first of them in file order."""
    over = sorted(
        ((e.source, n) for e, n in zip(examples, lengths, strict=True) if n > max_length),
        key=lambda pair: _file_order(pair[0]),
    )
    notice = (
        f"{len(over)} of {len(examples)} examples exceed train.max_length={max_length} "
        "and will be truncated"
    )
    if not over:
        return notice
    shown = ", ".join(f"{source} ({n} tokens)" for source, n in over[:TRUNCATED_SHOWN])
    more = f", and {len(over) - TRUNCATED_SHOWN} more" if len(over) > TRUNCATED_SHOWN else ""
    return f"{notice}: {shown}{more}"


def _file_order(source: str) -> tuple[str, int]:
    path, _, line = source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (source, 0)


def validate(arguments: list[str], console: Any) -> int:
    from rich.table import Table

    cfg, task_source = config_for(arguments)
    backend = make_backend(cfg)
    dataset = load_dataset(cfg.data, backend.example_check(cfg))
    console.print(
        f"dataset [bold]{cfg.data.name}[/bold] ({dataset.task}, {task_source}): OK",
        soft_wrap=True,
    )
    for path, digest in dataset.file_hashes.items():
        console.print(f"  {path}  sha256 {digest[:16]}", markup=False, soft_wrap=True)
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
    if isinstance(backend, PaidBackend):
        return hosted_costs(cfg, backend, dataset, console)
    if dataset.task == "preference":  # the local model's token counts would not apply
        console.print(
            "  preference pairs train with train.method=dpo on a hosted backend that offers "
            f"it (backend=openai, azure_openai or together); `harness validate {cfg.data.path} "
            "backend=openai` counts their tokens and what a job would cost",
            soft_wrap=True,
        )
        return 0
    lengths = token_lengths(cfg, dataset)
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    tokenizer_name = cfg.model.name_or_path or "BPE trained on the training split"
    console.print(
        f"  tokens per example ({tokenizer_name}): min {ordered[0]}, "
        f"mean {statistics.mean(ordered):.1f}, p95 {p95}, max {ordered[-1]}, "
        f"total {sum(ordered)}",
        soft_wrap=True,
    )
    notice = truncation_notice(all_examples(dataset), lengths, cfg.train.max_length)
    console.print(f"  {notice}", soft_wrap=True)
    return 0


def make_backend(cfg: Any) -> Backend:
    from harness.study.plan import make_backend as instantiate

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


def hosted_costs(cfg: Any, backend: PaidBackend, dataset: Dataset, console: Any) -> int:
    """The API's data rules, token counts and the cost of every trial shape; spends nothing."""
    from rich.table import Table

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
