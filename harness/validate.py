"""`harness validate`: check a dataset and describe it, training nothing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness.config import load_config
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
        console.print(f"  {path}  sha256 {digest[:16]}")
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
