"""One contract every backend passes unchanged (the Optuna storage-test idea): the fake, local
GPT-2 training, and the OpenAI and Together backends talking HTTP to their loopback fakes through
the real SDKs.
The contract is the one harness.backends.base.Backend's docstring states: what a backend
declares (name, tunable keys from the config, hard limits, evaluation metrics: those every
evaluation reports and those measured on demand, example check, whether it is paid) and what a
trial does (steps, evaluations, pruning, determinism)."""

from __future__ import annotations

import math

import optuna
import pytest

from harness import advice
from harness.backends.base import Backend, PaidBackend, UntunableKeyError, check_tunable
from harness.backends.local import LocalBackend
from harness.backends.openai_ft import OpenAIBackend
from harness.backends.together_ft import TogetherBackend
from harness.config import VALID_RANGES, with_params
from harness.data import load_dataset
from harness.metrics import EVAL_METRICS, GENERATED_TEXT_METRICS
from harness.search import to_distributions
from harness.study import make_backend, plan_study
from tests.helpers import OrderReporter, RecordingReporter, Setup, trial_spec

PARAMS = {"train.epochs": 2, "train.batch_size": 32, "train.learning_rate": 2e-3}
# a change of one knob each backend tunes
OTHER_PARAMS = {
    "fake": {"train.learning_rate": 1e-5},
    "local": {"train.learning_rate": 1e-5},
    "openai": {"train.learning_rate_multiplier": 0.05},
    "together": {"train.learning_rate": 1e-5},
}
# each backend's name: stored in every study's fingerprint, so it never changes
NAMES = {
    "fake": "FakeBackend",
    "local": "LocalBackend",
    "openai": "OpenAIBackend",
    "together": "TogetherBackend",
}
# what each evaluation carries, beyond the objective metric
EVAL_KEYS = {
    "fake": EVAL_METRICS["classification"],
    "local": EVAL_METRICS["classification"],
    "openai": ("eval/loss", "eval/token_accuracy", "eval/perplexity"),
    "together": ("eval/loss", "eval/perplexity"),
}

# what evaluations measure only when the study optimizes it, by task: generated text costs a
# completion per validation example, and only the local backend generates during training
ON_DEMAND = {
    "fake": {"classification": (), "generation": ()},
    "local": {"classification": (), "generation": GENERATED_TEXT_METRICS["generation"]},
    "openai": {"classification": (), "generation": ()},
    "together": {"classification": (), "generation": ()},
}


# local trains a real tiny model: the slow tier (the fake and OpenAI ones run the contract fast)
@pytest.fixture(
    params=["fake", pytest.param("local", marks=pytest.mark.slow), "openai", "together"]
)
def setup(request, make_cfg):
    if request.param == "openai":
        cfg = request.getfixturevalue("openai_cfg")()  # tickets_openai on the fake, eval/loss
        backend: Backend = make_backend(cfg)
        assert isinstance(backend, OpenAIBackend)
    elif request.param == "together":  # tickets_together (LoRA) on Together's fake, eval/loss
        fake = request.getfixturevalue("fake_together")
        cfg = make_cfg(
            "study=tickets_together",
            f"backend.base_url={fake.base_url}",
            "backend.poll_interval_s=0.01",
            "backend.max_poll_interval_s=0.05",
        )
        backend = make_backend(cfg)
        assert isinstance(backend, TogetherBackend)
    else:
        cfg = make_cfg(f"backend={request.param}")
        backend = make_backend(cfg)  # built from conf/backend/NAME.yaml, as a sweep builds it
    cfg = with_params(cfg, PARAMS)
    dataset = load_dataset(cfg.data)
    return Setup(request.param, backend, cfg, backend.prepare(cfg, dataset))


# wall-clock measures a backend may report itself (a hosted job's time less its pre-empted wait):
# never the same twice
TIMED = ("train/seconds", "paused_seconds")


def untimed(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in TIMED}


class TestBackendContract:
    def test_declares_tunable_keys_covering_the_training_knobs(self, setup):
        backend, cfg, _ = setup
        assert any(key.startswith("train.") for key in backend.tunable_keys(cfg))

    def test_declares_the_name_its_studies_are_stored_under(self, setup):
        assert setup.backend.name == NAMES[setup.name]

    def test_tunable_keys_come_from_the_config(self, setup):
        """The study's own search space is tunable; what prepare made once never is."""
        backend, cfg, _ = setup
        tunable = backend.tunable_keys(cfg)
        assert isinstance(tunable, frozenset)
        check_tunable(backend.name, tunable, to_distributions(dict(cfg.search.space)))
        for fixed in ("model.name_or_path", "model.vocab_size", "data.path", "seed"):
            with pytest.raises(UntunableKeyError):
                check_tunable(backend.name, tunable, [fixed])

    def test_hard_limits_narrow_the_valid_ranges_of_tunable_keys(self, setup):
        backend, cfg, _ = setup
        merged = advice.hard_limits(backend)
        for key, (low, high) in backend.hard_limits().items():
            check_tunable(backend.name, backend.tunable_keys(cfg), [key])
            valid = VALID_RANGES[key]
            assert all(valid.holds(end) for end in (low, high) if end is not None)
            assert merged[key] == (low, high)

    def test_declares_the_metrics_evaluations_measure_on_demand_apart(self, setup):
        """Either every evaluation reports a metric, or evaluations report it only when the
        study optimizes it: never both; and no backend claims one it cannot measure."""
        backend = setup.backend
        for task, expected in ON_DEMAND[setup.name].items():
            on_demand = backend.eval_metrics_on_demand(task)
            assert on_demand == expected
            assert not set(on_demand) & set(backend.eval_metrics(task))

    def test_declares_whether_it_is_paid_and_what_a_trial_costs(self, setup):
        """A paid backend counts the data without uploading (describe) what its estimates and
        `harness validate` use; it is the same count prepare made."""
        backend, cfg, prepared = setup
        assert isinstance(backend, PaidBackend) == (setup.name in ("openai", "together"))
        dataset = load_dataset(cfg.data, backend.example_check(cfg))  # its own rules pass
        if not isinstance(backend, PaidBackend):
            return
        described = backend.describe(cfg, dataset)
        assert described.file_tokens == prepared.file_tokens > 0
        estimate = backend.estimate_cost_usd(cfg, described)
        assert estimate == backend.estimate_cost_usd(cfg, prepared) >= 0.0

    def test_total_steps_come_first_and_evaluations_carry_the_declared_metrics(
        self, setup, tmp_path
    ):
        backend, cfg, prepared = setup
        reporter = OrderReporter(cfg.sweep.metric)
        backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
        assert reporter.totals_before_first_report
        declared = backend.eval_metrics(cfg.data.task)
        assert cfg.sweep.metric in declared
        evals = [m for _, m in reporter.calls if cfg.sweep.metric in m]
        assert evals and all(set(declared) <= set(m) for m in evals)
        # the study optimizes none of the on-demand ones: no evaluation measures them
        on_demand = set(backend.eval_metrics_on_demand(cfg.data.task))
        assert cfg.sweep.metric not in on_demand
        assert not any(on_demand & set(m) for m in evals)

    def test_run_reports_steps_in_order_and_one_evaluation_per_epoch(self, setup, tmp_path):
        backend, cfg, prepared = setup
        reporter = RecordingReporter(cfg.sweep.metric)
        result = backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
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
        result = backend.run(
            trial_spec(cfg, prepared, tmp_path), RecordingReporter(cfg.sweep.metric)
        )
        assert math.isfinite(result.metrics[cfg.sweep.metric])
        for key in ("test/accuracy", "test/f1", "test/precision", "test/recall"):
            assert 0.0 <= result.metrics[key] <= 1.0
        assert all(path.exists() for path in result.artifacts)

    def test_pruning_stops_the_trial_at_once(self, setup, tmp_path):
        backend, cfg, prepared = setup
        reporter = RecordingReporter(cfg.sweep.metric, prune_at_eval=1)
        with pytest.raises(optuna.TrialPruned):
            backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
        # a paid backend reports what its stopped job billed after the prune: cost only
        trained = [(s, m) for s, m in reporter.calls if set(m) - {"cost_usd", "trained_tokens"}]
        last_step, last_metrics = trained[-1]
        assert cfg.sweep.metric in last_metrics  # nothing trained or reported after the prune
        assert last_step == max(step for step, _ in trained)

    def test_same_params_same_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        metric = cfg.sweep.metric
        first = backend.run(trial_spec(cfg, prepared, tmp_path / "1"), RecordingReporter(metric))
        second = backend.run(trial_spec(cfg, prepared, tmp_path / "2"), RecordingReporter(metric))
        assert untimed(first.metrics) == pytest.approx(untimed(second.metrics), abs=1e-6)

    def test_params_change_the_result(self, setup, tmp_path):
        backend, cfg, prepared = setup
        metric = cfg.sweep.metric
        base = backend.run(trial_spec(cfg, prepared, tmp_path / "1"), RecordingReporter(metric))
        other_cfg = with_params(cfg, OTHER_PARAMS[setup.name])
        other = backend.run(
            trial_spec(other_cfg, prepared, tmp_path / "2"), RecordingReporter(metric)
        )
        assert other.metrics["eval/loss"] != pytest.approx(base.metrics["eval/loss"])


def test_local_tunes_the_architecture_only_of_a_model_built_from_scratch(make_cfg):
    backend = LocalBackend()
    scratch = make_cfg("backend=local", "model=tiny_gpt2")
    pretrained = make_cfg("backend=local", "model=gpt2")
    architecture = {"model.n_layer", "model.n_head", "model.n_embd"}
    assert architecture <= backend.tunable_keys(scratch)
    assert not architecture & backend.tunable_keys(pretrained)
    # the study refuses it before anything is loaded: a checkpoint brings its own shape
    with pytest.raises(UntunableKeyError, match=r"cannot tune model\.n_layer"):
        plan_study(make_cfg("backend=local", "model=gpt2", "model.n_layer=choice(1, 2)"))
