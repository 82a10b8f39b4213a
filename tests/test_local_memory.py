"""The local backend and device memory, in real (tiny) trials: accumulation to the same result,
the automatic micro-batch, an out-of-memory trial failing alone with a hint, memory released
after every trial, gradient checkpointing and compilation."""

from __future__ import annotations

import pytest
import torch

from harness.backends.devices import allocated_bytes, free_memory, pick_device
from harness.backends.local import LocalBackend
from harness.config import with_params
from harness.data import load_dataset
from harness.study import Sweep
from harness.tracking import InMemoryStore
from tests.helpers import RecordingReporter, trial_spec

pytestmark = pytest.mark.slow

SHORT = {  # a few steps, one evaluation at the end
    "train.batch_size": 8,
    "train.epochs": 1,
    "train.max_steps": 6,
    "train.learning_rate": 3e-3,
    "train.dropout": 0.1,
}


def run_trial(make_cfg, tmp_path, overrides=(), params=None, study="sentiment_tiny", save=False):
    """One trial of the tiny study: (its result, the train/loss of each step)."""
    cfg = with_params(make_cfg(f"study={study}", *overrides), {**SHORT, **(params or {})})
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter(cfg.sweep.metric)
    result = backend.run(trial_spec(cfg, prepared, tmp_path / "trial", save_model=save), reporter)
    return result, [m["train/loss"] for _, m in reporter.calls if "train/loss" in m]


def oom_in_training_above(monkeypatch, cls, rows: int) -> list[int]:
    """``cls``'s training forward passes run out of memory above ``rows`` examples (raised
    before computing anything, as a GPU's allocator raises at its first big allocation);
    returns the list of rows of each training pass."""
    seen: list[int] = []
    forward = cls.forward

    def limited(self, *args, **kwargs):
        if self.training:
            n = len(kwargs["input_ids"])
            seen.append(n)
            if n > rows:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {n} rows)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", limited)
    return seen


@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_micro_batches_train_as_the_whole_batch_does(make_cfg, tmp_path, study):
    """Without dropout (its masks are drawn per pass, so they differ with the pass's shape)."""
    no_dropout = {"train.dropout": 0.0}
    whole, whole_losses = run_trial(make_cfg, tmp_path / "a", params=no_dropout, study=study)
    micro, micro_losses = run_trial(
        make_cfg, tmp_path / "b", params={**no_dropout, "train.micro_batch_size": 3}, study=study
    )
    assert micro_losses == pytest.approx(whole_losses, rel=1e-4)
    assert micro.metrics == pytest.approx(whole.metrics, rel=1e-4)


def test_automatic_micro_batch_finds_what_fits(make_cfg, tmp_path, monkeypatch):
    from transformers import GPT2ForSequenceClassification

    explicit, explicit_losses = run_trial(
        make_cfg, tmp_path / "explicit", params={"train.micro_batch_size": 2}
    )
    seen = oom_in_training_above(monkeypatch, GPT2ForSequenceClassification, 2)
    automatic, automatic_losses = run_trial(make_cfg, tmp_path / "automatic")
    assert seen[:3] == [8, 4, 2]  # halved twice at the first step...
    assert set(seen[3:]) == {2}  # ...and micro-batches of 2 from then on
    assert automatic_losses == explicit_losses
    assert automatic.metrics == explicit.metrics


def test_out_of_memory_trial_fails_alone_with_a_hint(make_cfg, monkeypatch):
    from transformers import GPT2ForSequenceClassification

    oom_in_training_above(monkeypatch, GPT2ForSequenceClassification, 4)
    overrides = [
        "sampler=grid",
        "search=none",
        "pruner=none",
        "train.batch_size=choice(8, 4)",
        "sweep.enqueue=[{train.batch_size: 8}, {train.batch_size: 4}]",  # the failing one first
        "train.micro_batch_size=8",  # set by the user: kept, so batch size 8 cannot fit
        "train.epochs=1",
        "train.max_steps=3",
    ]
    cfg = make_cfg(*overrides, "sweep.n_trials=2")
    study = Sweep(cfg, overrides, tracker_factory=InMemoryStore().tracker).run()
    assert [t.params["train.batch_size"] for t in study.trials] == [8, 4]
    failed, after = study.trials
    assert after.state.name == "COMPLETE"  # the next trial ran, on the memory given back
    assert failed.state.name == "FAIL"
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith("TrialOutOfMemoryError: out of memory on cpu at micro-batch 8 ")
    for hint in (
        "train.batch_size=8",
        "train.max_length=64",
        "a smaller train.micro_batch_size",
        "train.gradient_checkpointing=true",
        "adapter=qlora",
        "adapter=lora",
    ):
        assert hint in reason


def test_memory_returns_to_its_starting_level_after_each_trial(make_cfg, tmp_path, monkeypatch):
    """Model, optimizer, scheduler, the kept best weights and the batches are gone after a
    trial, finished or failed for memory. Measured after one trial has run, so that what the
    first trial loads for good (transformers' and torch's own lazily built tables) is not
    counted; exact: a tensor left over is at least a few bytes."""
    from transformers import GPT2ForSequenceClassification

    device = pick_device("auto")
    cfg = with_params(make_cfg(), SHORT)
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))

    class MeasuringReporter(RecordingReporter):
        during: list[int] = []  # noqa: RUF012 (one list per test: the class is the test's)

        def report(self, step, metrics):
            self.during.append(allocated_bytes(device))
            super().report(step, metrics)

    def trial(name: str):
        spec = trial_spec(cfg, prepared, tmp_path / name)
        return backend.run(spec, MeasuringReporter(cfg.sweep.metric))

    trial("warm-up")
    free_memory(device)
    start = allocated_bytes(device)
    MeasuringReporter.during.clear()
    result = trial("finished")
    assert result.metrics["eval/f1"] >= 0
    # the measure sees a trial's tensors: the model's weights alone are more than 100 kB
    assert min(MeasuringReporter.during) > start + 100_000
    free_memory(device)
    assert allocated_bytes(device) == start
    oom_in_training_above(monkeypatch, GPT2ForSequenceClassification, 0)
    with pytest.raises(Exception, match="out of memory"):
        trial("out-of-memory")
    free_memory(device)
    assert allocated_bytes(device) == start


def test_gradient_checkpointing_trains_to_the_same_losses(make_cfg, tmp_path):
    _, plain = run_trial(make_cfg, tmp_path / "plain", params={"train.max_steps": 2})
    _, checkpointed = run_trial(
        make_cfg,
        tmp_path / "checkpointed",
        params={"train.max_steps": 2, "train.gradient_checkpointing": True},
    )
    assert len(plain) == 2  # the second loss is measured after one optimizer step
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_compiled_model_trains_and_saves_its_own_keys(make_cfg, tmp_path, monkeypatch):
    """train.compile: the same losses, the best weights restored, a saved model whose weights
    load back under the model's own names, and no memory kept after the trial (dynamo's caches
    hold the compiled model). Compiled by dynamo with its eager backend: the same capture,
    guards and recompiles, without inductor's minutes of C++ builds on a CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    compiled: list[str] = []  # names: holding what was compiled would keep the model
    real_compile = torch.compile

    def eager_compile(target, **options):
        compiled.append(target.__name__)
        return real_compile(target, **{**options, "backend": "eager"})

    _, plain_losses = run_trial(make_cfg, tmp_path / "plain")  # also the memory's warm-up
    device = pick_device("auto")
    free_memory(device)
    start = allocated_bytes(device)
    monkeypatch.setattr(torch, "compile", eager_compile)
    result, losses = run_trial(make_cfg, tmp_path, params={"train.compile": True}, save=True)
    monkeypatch.setattr(torch, "compile", real_compile)
    assert compiled == ["_call_impl"]  # the model's call, compiled in place
    assert losses == pytest.approx(plain_losses, rel=1e-3)
    free_memory(device)
    assert allocated_bytes(device) == start
    keys = load_file(result.model_dir / "model.safetensors").keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]
    AutoModelForSequenceClassification.from_pretrained(result.model_dir)  # loads back
