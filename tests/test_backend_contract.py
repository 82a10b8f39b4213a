"""One contract every backend passes unchanged (the Optuna storage-test idea): the fake, local
GPT-2 training, and the OpenAI backend talking HTTP to the loopback fake through the real SDK."""

from __future__ import annotations

import math

import optuna
import pytest

from harness.backends.base import Backend
from harness.backends.fake import FakeBackend
from harness.backends.local import LocalBackend
from harness.backends.openai_ft import OpenAIBackend
from harness.config import with_params
from harness.data import load_dataset
from harness.metrics import EVAL_METRICS
from harness.study import make_backend
from tests.helpers import RecordingReporter, Setup, spec

PARAMS = {"train.epochs": 2, "train.batch_size": 32, "train.learning_rate": 2e-3}
# a change of one knob each backend tunes
OTHER_PARAMS = {
    "fake": {"train.learning_rate": 1e-5},
    "local": {"train.learning_rate": 1e-5},
    "openai": {"train.learning_rate_multiplier": 0.05},
}
# what each evaluation carries, beyond the objective metric
EVAL_KEYS = {
    "fake": EVAL_METRICS["classification"],
    "local": EVAL_METRICS["classification"],
    "openai": ("eval/loss", "eval/token_accuracy", "eval/perplexity"),
}


# local trains a real tiny model: the slow tier (the fake and OpenAI ones run the contract fast)
@pytest.fixture(params=["fake", pytest.param("local", marks=pytest.mark.slow), "openai"])
def setup(request, make_cfg):
    if request.param == "openai":
        cfg = request.getfixturevalue("openai_cfg")()  # tickets_openai on the fake, eval/loss
        backend: Backend = make_backend(cfg)
        assert isinstance(backend, OpenAIBackend)
    else:
        backend = {"fake": FakeBackend(), "local": LocalBackend()}[request.param]
        cfg = make_cfg(f"backend={request.param}")
    cfg = with_params(cfg, PARAMS)
    dataset = load_dataset(cfg.data)
    return Setup(request.param, backend, cfg, backend.prepare(cfg, dataset))


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
        for key in EVAL_KEYS[setup.name]:
            assert key in evals[-1]
        # the backend gave the progress bar its length, and it was the real one
        assert reporter.totals and reporter.totals[-1] == result.steps == steps[-1]

    def test_result_has_objective_validation_and_test_metrics(self, setup, tmp_path):
        backend, cfg, prepared = setup
        result = backend.run(spec(cfg, prepared, tmp_path), RecordingReporter(cfg.sweep.metric))
        assert math.isfinite(result.metrics[cfg.sweep.metric])
        for key in ("test/accuracy", "test/f1", "test/precision", "test/recall"):
            assert 0.0 <= result.metrics[key] <= 1.0
        assert all(path.exists() for path in result.artifacts)

    def test_pruning_stops_the_trial_at_once(self, setup, tmp_path):
        backend, cfg, prepared = setup
        reporter = RecordingReporter(cfg.sweep.metric, prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(spec(cfg, prepared, tmp_path), reporter)
        # a paid backend reports what its stopped job billed after the prune: cost only
        trained = [(s, m) for s, m in reporter.calls if set(m) - {"cost_usd", "trained_tokens"}]
        last_step, last_metrics = trained[-1]
        assert cfg.sweep.metric in last_metrics  # nothing trained or reported after the prune
        assert last_step == max(step for step, _ in trained)

    def test_same_params_same_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        metric = cfg.sweep.metric
        first = backend.run(spec(cfg, prepared, tmp_path / "1"), RecordingReporter(metric))
        second = backend.run(spec(cfg, prepared, tmp_path / "2"), RecordingReporter(metric))
        assert first.metrics == pytest.approx(second.metrics, abs=1e-6)

    def test_params_change_the_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        metric = cfg.sweep.metric
        base = backend.run(spec(cfg, prepared, tmp_path / "1"), RecordingReporter(metric))
        other_cfg = with_params(cfg, OTHER_PARAMS[setup.name])
        other = backend.run(spec(other_cfg, prepared, tmp_path / "2"), RecordingReporter(metric))
        assert other.metrics["eval/loss"] != pytest.approx(base.metrics["eval/loss"])
