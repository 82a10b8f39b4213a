"""One contract every backend passes unchanged (the Optuna storage-test idea). Hosted backends
join by adding a fixture param below."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from harness.backends.base import Backend, TrialSpec
from harness.backends.fake import FakeBackend
from harness.backends.local import LocalBackend
from harness.config import with_params
from harness.data import load_dataset


class RecordingReporter:
    def __init__(self, metric: str, prune_at_eval: int | None = None) -> None:
        self.metric, self.prune_at_eval = metric, prune_at_eval
        self.calls: list[tuple[int, dict[str, float]]] = []

    def report(self, step, metrics):
        self.calls.append((step, dict(metrics)))
        evals = sum(1 for _, m in self.calls if self.metric in m)
        if self.metric in metrics and evals == self.prune_at_eval:
            raise optuna.TrialPruned(f"pruned at evaluation {evals}")


PARAMS = {"train.epochs": 2, "train.batch_size": 32, "train.learning_rate": 2e-3}


@pytest.fixture(params=["fake", "local"])
def setup(request, make_cfg):
    backend: Backend = {"fake": FakeBackend(), "local": LocalBackend()}[request.param]
    cfg = with_params(make_cfg(f"backend={request.param}"), PARAMS)
    dataset = load_dataset(cfg.data)
    return backend, cfg, backend.prepare(cfg, dataset)


def spec(cfg, prepared, tmp_path: Path, save_model=False) -> TrialSpec:
    return TrialSpec(0, cfg, prepared, tmp_path, save_model)


class TestBackendContract:
    def test_declares_tunable_keys_covering_the_training_knobs(self, setup):
        backend, _, _ = setup
        assert any(key.startswith("train.") for key in backend.tunable_keys)

    def test_run_reports_steps_in_order_and_one_evaluation_per_epoch(self, setup, tmp_path):
        backend, cfg, prepared = setup
        reporter = RecordingReporter(cfg.sweep.metric)
        result = backend.run(spec(cfg, prepared, tmp_path), reporter)
        steps = [step for step, _ in reporter.calls]
        assert steps == sorted(steps) and steps[0] >= 1
        train_losses = [m["train/loss"] for _, m in reporter.calls if "train/loss" in m]
        assert len(train_losses) == result.steps
        assert all(math.isfinite(x) for x in train_losses)
        evals = [m for _, m in reporter.calls if cfg.sweep.metric in m]
        assert len(evals) == 2  # epochs=2, eval every epoch, no early stop in 2 evals
        for key in ("eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1"):
            assert key in evals[-1]

    def test_result_has_objective_validation_and_test_metrics(self, setup, tmp_path):
        backend, cfg, prepared = setup
        result = backend.run(spec(cfg, prepared, tmp_path), RecordingReporter(cfg.sweep.metric))
        assert 0.0 <= result.metrics["eval/f1"] <= 1.0
        for key in ("test/loss", "test/accuracy", "test/f1", "test/precision", "test/recall"):
            assert key in result.metrics
        assert all(path.exists() for path in result.artifacts)

    def test_pruning_stops_the_trial_at_once(self, setup, tmp_path):
        backend, cfg, prepared = setup
        reporter = RecordingReporter(cfg.sweep.metric, prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec(cfg, prepared, tmp_path), reporter)
        last_step, last_metrics = reporter.calls[-1]
        assert cfg.sweep.metric in last_metrics  # nothing trained or reported after the prune
        assert last_step == max(step for step, _ in reporter.calls)

    def test_same_params_same_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        first = backend.run(spec(cfg, prepared, tmp_path / "1"), RecordingReporter("eval/f1"))
        second = backend.run(spec(cfg, prepared, tmp_path / "2"), RecordingReporter("eval/f1"))
        assert first.metrics == pytest.approx(second.metrics, abs=1e-6)

    def test_params_change_the_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        base = backend.run(spec(cfg, prepared, tmp_path / "1"), RecordingReporter("eval/f1"))
        other_cfg = with_params(cfg, {"train.learning_rate": 1e-5})
        other = backend.run(spec(other_cfg, prepared, tmp_path / "2"), RecordingReporter("eval/f1"))
        assert other.metrics["eval/loss"] != pytest.approx(base.metrics["eval/loss"])
