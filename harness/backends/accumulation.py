"""Gradient accumulation: an optimizer step's batch (train.batch_size examples) passed through the
model in micro-batches (train.micro_batch_size), each loss weighted so that the accumulated
gradient equals the whole batch's. With train.micro_batch_size=0 the micro-batch starts at the
whole batch and halves at each out-of-memory error until the step fits.

The halving reacts to an out-of-memory error (devices.is_out_of_memory: torch's, or a CUDA
library's allocation failure) wherever it is raised: CUDA's allocator raises it, and so does the
CPU's when an allocation fails, so it is the same code on every device (and the tests exercise
it on a CPU by raising the error themselves)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from harness.backends.devices import Precision, free_memory, is_out_of_memory


def micro_batches(
    batch: dict[str, Any], size: int, task: str
) -> list[tuple[dict[str, Any], float]]:
    """The batch cut into micro-batches of ``size`` rows, each with the weight of its mean loss
    in the batch's: the model's loss is a mean over examples (classification) or over target
    tokens (generation: labels other than -100 after the shift by one), so a micro-batch weighs
    its share of those. A micro-batch with no target token is left out (its mean would be NaN;
    it weighs nothing). The whole batch, weight 1, when it fits in one."""
    labels = batch["labels"]
    rows = len(labels)
    if size >= rows:
        return [(batch, 1.0)]
    # generation: one host sync per step, only when accumulating
    targets = [1] * rows if task == "classification" else (labels[:, 1:] != -100).sum(1).tolist()
    total = sum(targets)
    if total == 0:  # no target at all: as the whole batch would be (its loss is NaN)
        return [(batch, 1.0)]
    parts = []
    for start in range(0, rows, size):
        share = sum(targets[start : start + size])
        if share:
            parts.append(({k: v[start : start + size] for k, v in batch.items()}, share / total))
    return parts


def first_micro_batch(train: DictConfig) -> int:
    """The micro-batch a trial starts with: train.micro_batch_size, 0 meaning the whole batch."""
    return int(min(train.micro_batch_size or train.batch_size, train.batch_size))


class GradientAccumulation:
    """A trial's forward and backward passes: its micro-batch size, halved for good (the rest
    of the trial) when a step runs out of memory with train.micro_batch_size=0."""

    def __init__(self, train: DictConfig, task: str, precision: Precision) -> None:
        self.size = first_micro_batch(train)
        self.automatic = not train.micro_batch_size
        self.task, self.precision = task, precision

    def backward(self, model: Any, batch: dict[str, Any]) -> Any:
        """The batch's gradients accumulated in the parameters' ``.grad``; returns the batch's
        loss, detached, still on the device. An out-of-memory error when the micro-batch can be
        halved (automatic, above 1): gradients zeroed, memory freed, and the step redone with
        half the micro-batch; otherwise it is raised."""
        while True:
            try:
                return self._accumulate(model, batch)
            except Exception as exc:
                if not (is_out_of_memory(exc) and self.automatic and self.size > 1):
                    raise
            # out of the handler: the error, and the activations its traceback held, are gone
            model.zero_grad(set_to_none=True)
            free_memory(self.precision.device)
            logging.getLogger("harness").warning(
                "out of memory at micro-batch %d on %s: redoing the step with micro-batches of %d",
                self.size,
                self.precision.device,
                self.size // 2,
            )
            self.size //= 2

    def _accumulate(self, model: Any, batch: dict[str, Any]) -> Any:
        total = None
        for part, weight in micro_batches(batch, self.size, self.task):
            with self.precision.autocast():
                loss = model(**part).loss
            if weight != 1.0:
                loss = loss * weight
            self.precision.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total
