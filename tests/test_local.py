"""Real (tiny) GPT-2 training: the local loop, a tracked sweep, the logged model, reproduction."""

from __future__ import annotations

import json
import math

import mlflow
import optuna
import pytest

from harness.backends.local import LocalBackend
from harness.config import with_params
from harness.data import load_dataset
from harness.storage import storage_for
from harness.study import Sweep, train_once
from harness.tracking import tracking_uri
from tests.helpers import (
    RecordingReporter,
    save_tiny_gpt2,
    study_runs,
    trial_spec,
    window_ends,
    write,
)

pytestmark = pytest.mark.slow

GOOD = {
    "train.learning_rate": 3e-3,
    "train.batch_size": 16,
    "train.epochs": 3,
    "train.dropout": 0.1,
    "train.weight_decay": 0.01,
    "train.warmup_ratio": 0.1,
    "train.trainable_blocks": -1,
}


def test_local_loop_lowers_the_loss(make_cfg, tmp_path):
    cfg = with_params(make_cfg("train.patience=0"), {**GOOD, "train.epochs": 4})
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter("eval/f1")
    result = backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
    losses = [m["train/loss"] for _, m in reporter.calls if "train/loss" in m]
    per_epoch = len(losses) // 4
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)
    evals = [m["eval/loss"] for _, m in reporter.calls if "eval/loss" in m]
    assert min(evals) < math.log(3)  # below the cross-entropy of guessing among 3 classes
    assert result.metrics["eval/f1"] > 0.4  # 3 balanced classes: chance is ~0.33


def test_eval_every_n_steps_early_stopping_and_best_weights(make_cfg, tmp_path):
    # explicit train/validation files and no test file: the test split IS the validation split,
    # so test metrics show which weights the trial ended with
    source = load_dataset(make_cfg().data)
    files = {}
    for split in ("train", "validation"):
        rows = [json.dumps({"text": e.text, "label": e.target}) for e in getattr(source, split)]
        files[split] = write(tmp_path / f"{split}.jsonl", "\n".join(rows) + "\n")
    cfg = with_params(
        make_cfg(
            "train.eval_every_steps=10",
            "train.patience=2",
            "data.path=null",
            f"data.train={files['train']}",
            f"data.validation={files['validation']}",
        ),
        {**GOOD, "train.learning_rate": 1e-2, "train.epochs": 30},
    )
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter("eval/f1")
    result = backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
    eval_steps = [step for step, m in reporter.calls if "eval/f1" in m]
    assert eval_steps == list(range(10, 10 * len(eval_steps) + 1, 10))
    assert result.steps == eval_steps[-1] < 30 * 28  # stopped long before 30 epochs
    f1 = [m["eval/f1"] for _, m in reporter.calls if "eval/f1" in m]
    assert max(f1[-2:]) <= max(f1[:-2])  # the last `patience` evaluations did not improve
    assert result.metrics["eval/f1"] == max(f1)
    assert f1[-1] < max(f1)  # so the last weights were not the best ones...
    assert result.metrics["test/f1"] == pytest.approx(max(f1))  # ...and the best were restored


def test_tracked_sweep_with_pruning_resume_best_model_and_reproduction(make_cfg, monkeypatch):
    import harness.backends.local as local

    encode_calls = []
    real_encode = local.encode
    monkeypatch.setattr(local, "encode", lambda *a: encode_calls.append(1) or real_encode(*a))
    overrides = [
        "sampler=tpe",
        "pruner=median",
        "pruner.n_startup_trials=1",
        "pruner.n_warmup_steps=0",
        "train.patience=0",
    ]
    cfg = make_cfg(*overrides, "sweep.n_trials=3")
    # Seed the study: a good trial first, then one whose learning rate cannot learn anything,
    # which the median pruner must stop at its first evaluation.
    study = optuna.create_study(study_name=cfg.name, storage=storage_for(cfg), direction="maximize")
    study.enqueue_trial(GOOD)
    study.enqueue_trial({**GOOD, "train.learning_rate": 3e-4, "train.trainable_blocks": 0})
    study = Sweep(cfg, overrides).run()
    assert len(encode_calls) == 1  # data tokenized once per study, not per trial
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and states[1] == "PRUNED" and states[0] == "COMPLETE"

    found = study_runs(cfg)
    client = found.client
    trials = {r.info.run_name: r for r in found.trials}
    assert set(trials) == {"trial-0000", "trial-0001", "trial-0002"}
    pruned = trials["trial-0001"]
    assert pruned.info.status == "FINISHED"
    assert pruned.data.tags["optuna.trial_state"] == "PRUNED"
    pruned_evals = client.get_metric_history(pruned.info.run_id, "eval/f1")
    assert len(pruned_evals) < 3  # stopped before its third and last epoch
    pruned_losses = client.get_metric_history(pruned.info.run_id, "train/loss")
    assert max(m.step for m in pruned_losses) == pruned_evals[-1].step  # no step after the prune
    done = trials["trial-0000"]
    assert done.info.status == "FINISHED"
    losses = client.get_metric_history(done.info.run_id, "train/loss")
    steps_per_epoch = -(-len(load_dataset(cfg.data).train) // 16)
    assert [m.step for m in losses] == window_ends(3 * steps_per_epoch)
    f1_steps = [m.step for m in client.get_metric_history(done.info.run_id, "eval/f1")]
    assert f1_steps == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert {"config.yaml", "confusion_matrix_test.png"} <= artifacts

    # the best trial's model is logged, registered, loads back and predicts labels
    best_run = trials[f"trial-{study.best_trial.number:04d}"]
    assert client.get_run(best_run.info.run_id).data.tags["harness.model_logged"] == "true"
    others = [r for name, r in trials.items() if r.info.run_id != best_run.info.run_id]
    assert all(
        "model" not in {a.path for a in client.list_artifacts(r.info.run_id)} for r in others
    )
    versions = client.search_model_versions(f"name='{cfg.name}-best'")
    assert len(versions) == 1 and versions[0].run_id == best_run.info.run_id
    mlflow.set_tracking_uri(tracking_uri(cfg))
    classifier = mlflow.transformers.load_model(f"models:/{cfg.name}-best/1")
    predictions = classifier(
        [
            "The soup was cold and the waiter ignored us.",
            "Absolutely loved this phone, best purchase this year!",
        ]
    )
    assert {p["label"] for p in predictions} <= {"negative", "neutral", "positive"}

    # resume: one more trial, same parent run
    resumed = Sweep(make_cfg(*overrides, "sweep.n_trials=4"), overrides).run()
    assert len(resumed.trials) == 4
    runs = study_runs(cfg, client=client).runs
    assert sum(r.data.tags.get("harness.role") == "study" for r in runs) == 1
    assert sum(r.data.tags.get("harness.role") == "trial" for r in runs) == 4

    # `harness train` with the best trial's params reproduces its objective
    best = resumed.best_trial
    train_cfg = make_cfg(*overrides, *(f"{k}={v!r}" for k, v in best.params.items()))
    result = train_once(train_cfg, []).result
    assert result.metrics["eval/f1"] == pytest.approx(best.value, abs=1e-6)


def test_generation_task_reports_loss_perplexity_and_text_metrics(make_cfg, tmp_path):
    cfg = with_params(
        make_cfg("study=faq_chat_tiny", "train.max_new_tokens=8"),
        {"train.epochs": 2, "train.learning_rate": 3e-3, "train.batch_size": 8},
    )
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter("eval/loss")
    result = backend.run(trial_spec(cfg, prepared, tmp_path, save_model=True), reporter)
    for key in (
        "eval/loss",
        "eval/perplexity",
        "eval/token_accuracy",
        "test/exact_match",
        "test/token_f1",
        "test/loss",
    ):
        assert key in result.metrics
    evals = [m["eval/loss"] for _, m in reporter.calls if "eval/loss" in m]
    assert evals[-1] < evals[0]
    assert 0.0 <= result.metrics["test/token_f1"] <= 1.0
    assert (result.model_dir / "config.json").exists()


@pytest.mark.parametrize("study", ["sentiment_tiny", "faq_chat_tiny"])
def test_pretrained_checkpoint_loads_with_from_pretrained(make_cfg, tmp_path, study):
    """model.name_or_path=<dir>: the code path real users take with model=gpt2, exercised on a
    tiny causal-LM checkpoint this test saves itself."""
    cfg = make_cfg(f"study={study}")
    dataset = load_dataset(cfg.data)
    checkpoint = save_tiny_gpt2(cfg, dataset, tmp_path / "tiny-gpt2")

    pretrained_cfg = with_params(
        make_cfg(f"study={study}", f"model.name_or_path={checkpoint}", "train.max_new_tokens=4"),
        {"train.epochs": 1, "train.trainable_blocks": 1},
    )
    backend = LocalBackend()
    prepared = backend.prepare(pretrained_cfg, dataset)
    assert prepared.tokenizer_source == str(checkpoint)
    result = backend.run(
        trial_spec(pretrained_cfg, prepared, tmp_path / "run", save_model=True),
        RecordingReporter(pretrained_cfg.sweep.metric),
    )
    assert pretrained_cfg.sweep.metric in result.metrics
    assert (result.model_dir / "config.json").exists()


def test_max_length_beyond_the_model_positions_is_a_clear_error(make_cfg, tmp_path):
    cfg = with_params(make_cfg(), {"train.max_length": 256})
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    with pytest.raises(ValueError, match=r"train.max_length=256 exceeds the model's 128"):
        backend.run(trial_spec(cfg, prepared, tmp_path), RecordingReporter("eval/f1"))
