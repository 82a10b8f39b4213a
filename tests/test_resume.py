"""Resumable trials (issue 13): each evaluation saves the trial's full state in its workdir; a
trial whose process died goes on from there, to the metrics an uninterrupted run has; the state
is one file, replaced at each evaluation and deleted when the trial ends."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from harness.backends import trial_state
from harness.backends.local import LocalBackend
from harness.config import load_config, with_params
from harness.data import load_dataset
from harness.storage import existing_study
from tests.helpers import (
    RecordingReporter,
    run_cli,
    start_cli,
    study_runs,
    trial_spec,
    wait_for,
)

STATE = trial_state.STATE_FILE
SETTINGS = {
    "classification": (
        ("study=sentiment_tiny", "train.eval_every_steps=10"),
        {"train.learning_rate": 3e-3, "train.batch_size": 16},
    ),
    "generation": (
        ("study=faq_chat_tiny", "train.eval_every_steps=4", "train.max_new_tokens=4"),
        {"train.learning_rate": 3e-3, "train.batch_size": 8},
    ),
}


class Died(BaseException):
    """The process's death as the training loop sees it: nothing after it runs. Not an
    Exception: a trial that fails or is interrupted deletes its state, a dead one cannot."""


class DyingReporter(RecordingReporter):
    """Records reports up to ``last_step``; the first report past it kills the 'process'."""

    def __init__(self, metric: str, last_step: int) -> None:
        super().__init__(metric)
        self.last_step = last_step

    def report(self, step, metrics):
        if step > self.last_step:
            raise Died(f"killed after step {self.last_step}")
        super().report(step, metrics)


def setup(make_cfg, task: str, *overrides: str, **params):
    """A tiny trial of ``task`` with dropout (RNG restored or not shows), length grouping, and
    evaluations that do not divide an epoch (a resume lands mid-epoch); no early stopping."""
    words, base = SETTINGS[task]
    cfg = with_params(
        make_cfg(*words, "train.patience=0", "train.group_by_length=true", *overrides),
        {**base, "train.epochs": 2, "train.dropout": 0.1, **params},
    )
    backend = LocalBackend()
    return backend, cfg, backend.prepare(cfg, load_dataset(cfg.data))


def steps_per_epoch(cfg, prepared) -> int:
    return math.ceil(len(prepared.train) / cfg.train.batch_size)


def evaluation_steps(reporter: RecordingReporter) -> list[int]:
    return [step for step, metrics in reporter.calls if reporter.metric in metrics]


class StateWatcher(RecordingReporter):
    """At each evaluation (before its state is saved), records the files of the workdir, the
    size of the state and four times the bytes of the trainable weights it holds."""

    def __init__(self, metric: str, workdir: Path) -> None:
        super().__init__(metric)
        self.workdir = workdir
        self.seen: list[tuple[list[str], int, int]] = []

    def report(self, step, metrics):
        import torch

        path = self.workdir / STATE
        if self.metric in metrics and path.exists():
            saved = torch.load(path, weights_only=True)
            weights = sum(t.numel() * t.element_size() for t in saved["model"].values())
            files = sorted(p.name for p in self.workdir.iterdir())
            self.seen.append((files, path.stat().st_size, 4 * weights))
        super().report(step, metrics)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "generation"])
def test_a_trial_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(make_cfg, tmp_path, task):
    backend, cfg, prepared = setup(make_cfg, task)
    per_epoch, every = steps_per_epoch(cfg, prepared), cfg.train.eval_every_steps
    assert per_epoch % every != 0
    metric = str(cfg.sweep.metric)

    whole = RecordingReporter(metric)
    uninterrupted = backend.run(trial_spec(cfg, prepared, tmp_path / "whole"), whole)
    assert not (tmp_path / "whole" / STATE).exists()  # deleted at the end

    # killed after the first evaluation of the second epoch was saved, before the next one
    saved_at = next(s for s in evaluation_steps(whole) if s > per_epoch)
    assert saved_at % per_epoch != 0  # mid-epoch
    workdir = tmp_path / "killed"
    with pytest.raises(Died):
        backend.run(trial_spec(cfg, prepared, workdir), DyingReporter(metric, saved_at + 1))
    assert (workdir / STATE).exists()  # a dead process leaves it, for the retry

    retry = RecordingReporter(metric)
    resumed = backend.run(trial_spec(cfg, prepared, workdir), retry)
    assert retry.tags[trial_state.RESUMED_TAG] == str(saved_at)
    # the evaluations before the resume are replayed (the retry's run and pruner see them
    # all), then training goes on at the next step with the very losses of the whole run
    before = [(s, m) for s, m in whole.calls if metric in m and s <= saved_at]
    after = [(s, m) for s, m in whole.calls if s > saved_at]
    assert retry.calls == before + after
    assert retry.calls[len(before)][0] == saved_at + 1
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.steps == uninterrupted.steps
    assert not (workdir / STATE).exists()


@pytest.mark.slow
def test_one_state_of_about_four_copies_of_the_trainable_weights_then_none(make_cfg, tmp_path):
    """Kept: the trainable weights, the best evaluation's and AdamW's two moments; the frozen
    weights are not saved (trainable_blocks=0: the head only)."""
    sizes: dict[int, list[int]] = {}
    for blocks in (-1, 0):
        backend, cfg, prepared = setup(
            make_cfg, "classification", **{"train.trainable_blocks": blocks}
        )
        workdir = tmp_path / f"blocks{blocks}"
        reporter = StateWatcher(str(cfg.sweep.metric), workdir)
        backend.run(trial_spec(cfg, prepared, workdir), reporter)
        assert (
            len(reporter.seen) == len(evaluation_steps(reporter)) - 1
        )  # saved from the first one on
        for files, size, expected in reporter.seen:
            assert files == [STATE]  # the last state only, no temporary left
            # 4 copies, plus RNG states (~20 kB) and the pickle's own bytes
            assert expected < size < expected * 1.02 + 60_000
        sizes[blocks] = [size for _, size, _ in reporter.seen]
        assert not (workdir / STATE).exists()
    assert max(sizes[0]) < min(sizes[-1]) / 4


@pytest.mark.slow
def test_a_pruned_or_failed_trial_deletes_its_state(make_cfg, tmp_path):
    backend, cfg, prepared = setup(make_cfg, "classification", **{"train.epochs": 1})
    import optuna

    with pytest.raises(optuna.TrialPruned):
        backend.run(
            trial_spec(cfg, prepared, tmp_path / "pruned"),
            RecordingReporter(str(cfg.sweep.metric), prune_at_eval=2),
        )
    assert not (tmp_path / "pruned" / STATE).exists()

    class Failing(RecordingReporter):
        def report(self, step, metrics):
            if self.metric in metrics and len(evaluation_steps(self)) == 1:
                raise RuntimeError("the tracking store failed")
            super().report(step, metrics)

    with pytest.raises(RuntimeError):
        backend.run(trial_spec(cfg, prepared, tmp_path / "failed"), Failing(cfg.sweep.metric))
    assert not (tmp_path / "failed" / STATE).exists()


def test_a_retry_works_in_the_folder_of_the_trial_it_retries(tmp_path):
    """Where the dead trial's state is; the sweep deletes that folder after the retry."""
    from types import SimpleNamespace

    from harness.study.objective import trial_workdir

    first = SimpleNamespace(number=3, user_attrs={})
    retry = SimpleNamespace(number=7, user_attrs={"harness_retry_of": 3})
    assert trial_workdir(tmp_path, first) == tmp_path / "trial-0003"  # type: ignore[arg-type]
    assert trial_workdir(tmp_path, retry) == tmp_path / "trial-0003"  # type: ignore[arg-type]


def killed_after_first_evaluation(backend, cfg, prepared, workdir: Path) -> int:
    """A run of ``cfg`` that dies after its first evaluation: the step it saved at."""
    every = cfg.train.eval_every_steps
    with pytest.raises(Died):
        backend.run(trial_spec(cfg, prepared, workdir), DyingReporter(cfg.sweep.metric, every))
    return int(every)


@pytest.mark.slow
def test_save_state_false_writes_none_and_a_retry_starts_at_step_0(make_cfg, tmp_path):
    backend, cfg, prepared = setup(
        make_cfg, "classification", "train.save_state=false", **{"train.epochs": 1}
    )
    workdir = tmp_path / "trial"
    killed_after_first_evaluation(backend, cfg, prepared, workdir)
    assert not workdir.exists() or list(workdir.iterdir()) == []

    # a state saved with save_state on is not read with it off
    on = with_params(cfg, {"train.save_state": True})
    killed_after_first_evaluation(backend, on, prepared, workdir)
    assert (workdir / STATE).exists()
    retry = RecordingReporter(cfg.sweep.metric)
    backend.run(trial_spec(cfg, prepared, workdir), retry)
    assert retry.calls[0] == (1, retry.calls[0][1]) and "train/loss" in retry.calls[0][1]
    assert trial_state.RESUMED_TAG not in retry.tags


@pytest.mark.slow
def test_a_state_saved_under_other_settings_or_another_trial_key_is_not_loaded(make_cfg, tmp_path):
    backend, cfg, prepared = setup(make_cfg, "classification", **{"train.epochs": 1})
    for other in (
        trial_spec(with_params(cfg, {"train.learning_rate": 1e-3}), prepared, tmp_path),
        trial_spec(cfg, prepared, tmp_path, key="another-trial"),
    ):
        killed_after_first_evaluation(backend, cfg, prepared, tmp_path)
        retry = RecordingReporter(cfg.sweep.metric)
        backend.run(other, retry)
        assert retry.calls[0][0] == 1 and trial_state.RESUMED_TAG not in retry.tags
        assert not (tmp_path / STATE).exists()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_sweep_killed_mid_trial_resumes_the_trial_from_its_saved_state(runs, stop):
    """kill -9 of `harness sweep` once its trial has saved a state, or SIGTERM (a scheduler
    pre-empting the node: the process closes its runs and keeps the state); the same command
    again retries the trial, which goes on from that state and finishes the study."""
    import signal

    import torch

    words = [
        "study=sentiment_tiny",
        "sampler=random",
        "pruner=none",
        "sweep.n_trials=1",
        "tracking.log_best_model=false",
        "train.batch_size=16",
        "train.epochs=4",  # ~100 steps after the first state: the kill lands mid-trial
        "train.eval_every_steps=10",
        "train.patience=0",
        f"paths.runs_dir={runs}",
    ]
    cfg = load_config(words)
    state = runs / "checkpoints" / cfg.name / "trial-0000" / STATE
    process = start_cli("sweep", "--quiet", *words, stdout=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: state.exists() or process.poll() is not None,
            240,
            "a state is saved",
            interval=0.05,
        )
        process.send_signal(getattr(signal, stop))
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (-signal.SIGKILL if stop == "SIGKILL" else 130)
    saved_at = int(torch.load(state, weights_only=True)["step"])
    if stop == "SIGTERM":  # closed by the process itself, retry enqueued
        stopped = existing_study(cfg)
        assert stopped is not None
        assert [t.state.name for t in stopped.trials] == ["FAIL", "WAITING"]
        assert "pre-empted" in stopped.trials[0].user_attrs["fail_reason"]

    done = run_cli("sweep", "--quiet", *words)
    assert done.returncode == 0, done.stdout + done.stderr
    study = existing_study(cfg)
    assert study is not None
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["harness_retry_of"] == 0
    found = study_runs(cfg)
    retry = next(r for r in found.trials if r.data.tags["optuna.trial_number"] == "1")
    assert retry.data.tags[trial_state.RESUMED_TAG] == str(saved_at)
    losses = found.client.get_metric_history(retry.info.run_id, "train/loss")
    assert min(m.step for m in losses) > saved_at  # trained from there on, not from step 1
    evaluations = found.client.get_metric_history(retry.info.run_id, "eval/f1")
    assert sorted(m.step for m in evaluations)[:2] == [10, 20]  # the dead trial's, replayed
    # Optuna heard every evaluation, numbered from the first: pruning compares like with like
    assert sorted(study.trials[1].intermediate_values) == list(range(1, len(evaluations) + 1))
    assert not state.parent.exists()  # the retry's folder, the dead trial's, is gone
