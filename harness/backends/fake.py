"""A deterministic fake backend: metrics computed from the params, with a learning curve.

It trains nothing, so study, pruning and tracking logic can be tested in milliseconds, and a
user can check a set-up (configs, storage, MLflow) in seconds with ``backend=fake``. The score
peaks at learning rate 1e-3, dropout 0.1, batch size 16 and rises with epochs, so samplers have
something real to find. The seed moves the score a little (``seed_noise``), as a real run's seed
does, so seed-noise estimates (harness.noise) have something to measure; seed 0, the default,
gives the noiseless score.
"""

from __future__ import annotations

import math
import time
from typing import Any

from omegaconf import DictConfig

from harness.backends.base import (
    Backend,
    Limit,
    Reporter,
    TrialResult,
    TrialSpec,
    check_training_method,
)
from harness.data import Dataset, ExampleCheck
from harness.metrics import EVAL_METRICS


def quality(train: DictConfig) -> float:
    """A number in (0, 1): how good these hyperparameters are, by a fixed smooth formula."""
    lr_term = (math.log10(train.learning_rate) + 3.0) ** 2  # 0 at 1e-3
    dropout_term = 4.0 * (train.dropout - 0.1) ** 2
    batch_term = 0.05 * (math.log2(train.batch_size) - 4.0) ** 2
    decay_term = 0.5 * train.weight_decay
    return 0.95 * math.exp(-(lr_term + dropout_term + batch_term + decay_term))


SEED_NOISE = 0.01  # the largest change of the score a seed makes
GOLDEN_ANGLE = 2.39996  # radians: consecutive seeds land far apart on the sine


def seed_noise(seed: int) -> float:
    """A deterministic stand-in for what a seed changes: within +-SEED_NOISE, spread over
    seeds, 0 at seed 0 (so the default seed's numbers stay those of ``quality``)."""
    return SEED_NOISE * math.sin(seed * GOLDEN_ANGLE)


class FakeBackend:
    name = "FakeBackend"

    def __init__(self, *, seconds_per_epoch: float) -> None:  # conf/backend/fake.yaml
        self.seconds_per_epoch = float(seconds_per_epoch)

    def tunable_keys(self, cfg: DictConfig) -> frozenset[str]:
        return frozenset({"train.*"})

    def hard_limits(self) -> dict[str, Limit]:
        return {}

    def eval_metrics(self, task: str) -> tuple[str, ...]:
        return EVAL_METRICS.get(task, ())

    def eval_metrics_on_demand(self, task: str) -> tuple[str, ...]:
        return ()  # it generates no text

    def check_config(self, cfg: DictConfig, searched: frozenset[str]) -> None:
        check_training_method(cfg, self.name, ("sft",))

    def example_check(self, cfg: DictConfig) -> ExampleCheck | None:
        return None

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> dict[str, Any]:
        return {"task": dataset.task, "n_train": len(dataset.train)}

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        train = spec.config.train
        final = min(0.999, max(0.001, quality(train) + seed_noise(int(spec.config.seed))))
        steps_per_epoch = max(1, math.ceil(spec.prepared["n_train"] / train.batch_size))
        generation = spec.prepared["task"] == "generation"
        reporter.set_total_steps(steps_per_epoch * train.epochs)
        step = 0
        metrics: dict[str, float] = {}
        for epoch in range(1, train.epochs + 1):
            if self.seconds_per_epoch:
                time.sleep(self.seconds_per_epoch)
            curve = final * (1.0 - math.exp(-epoch / 1.5))
            for _ in range(steps_per_epoch):
                step += 1
                reporter.report(step, {"train/loss": 1.2 - curve * step / (step + 5.0)})
            if generation:
                loss = 4.0 - 2.5 * curve
                metrics = {
                    "eval/loss": loss,
                    "eval/perplexity": math.exp(loss),
                    "eval/token_accuracy": curve,
                }
            else:
                metrics = {
                    "eval/loss": 1.1 - curve,
                    "eval/accuracy": curve + 0.02,
                    "eval/precision": curve + 0.01,
                    "eval/recall": curve,
                    "eval/f1": curve,
                }
            reporter.report(step, metrics)
        # held-out scores a little below validation ones, as they tend to be
        test = {f"test/{k.split('/', 1)[1]}": 0.97 * v for k, v in metrics.items()}
        return TrialResult(metrics={**metrics, **test}, steps=step)


_: type[Backend] = FakeBackend  # mypy checks the protocol; conf/backend/fake.yaml builds one
