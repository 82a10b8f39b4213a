"""The local backend's batches: epochs of shuffled (optionally length-grouped) example indices,
and dynamically padded tensors built from them."""

from __future__ import annotations

from typing import Any

from harness.tokenization import EncodedSplit, fit_generation


def example_lengths(split: EncodedSplit, max_length: int) -> list[int]:
    return [
        min(len(ids) + len(target) if isinstance(target, list) else len(ids), max_length)
        for ids, target in zip(split.inputs, split.targets, strict=True)
    ]


def epoch_batches(
    lengths: list[int], batch_size: int, generator: Any, group_by_length: bool
) -> list[list[int]]:
    """One epoch's batches of example indices, in random order. With group_by_length, examples
    are sorted by length inside random megabatches of 16 batches (the idea of transformers'
    LengthGroupedSampler), so a batch carries little padding; the batches are then shuffled."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunks = []
    for start in range(0, len(order), 16 * batch_size):
        group = sorted(order[start : start + 16 * batch_size], key=lambda i: lengths[i])
        chunks += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]


def batches(
    split: EncodedSplit,
    chunks: list[list[int]],
    max_length: int,
    pad_id: int,
    task: str,
    device: Any,
) -> Any:
    """Dynamically padded batches, one per chunk of example indices: each is as long as its
    longest example, not max_length."""
    import torch

    for chunk in chunks:
        if task == "classification":
            rows = [split.inputs[i][:max_length] or [pad_id] for i in chunk]
            labels = torch.tensor([split.targets[i] for i in chunk])
        else:
            rows, label_rows = [], []
            for i in chunk:
                ids = fit_generation(split.inputs[i], split.targets[i], max_length)
                n_target = min(len(split.targets[i]), max_length)
                rows.append(ids)
                label_rows.append([-100] * (len(ids) - n_target) + ids[len(ids) - n_target :])
        width = max(len(r) for r in rows)
        # padded as Python lists, then one tensor each: far cheaper than a tensor per row
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        if task != "classification":
            labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
        non_blocking = device.type == "cuda"
        yield {
            "input_ids": input_ids.to(device, non_blocking=non_blocking),
            "attention_mask": attention.to(device, non_blocking=non_blocking),
            "labels": labels.to(device, non_blocking=non_blocking),
        }
