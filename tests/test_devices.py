"""Devices without a GPU: precision settings and their checks, loss scaling's order, memory
options, the out-of-memory message, and sweep.devices (one worker per GPU, each seeing only its
own), checked by a test backend that records what each worker process sees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from harness.backends.base import Backend, Reporter, TrialResult, TrialSpec
from harness.backends.devices import (
    Precision,
    apply_memory_options,
    out_of_memory_message,
    precision_for,
)
from harness.backends.fake import FakeBackend
from harness.config import ConfigError
from harness.gpus import VISIBLE, worker_envs
from harness.study import load_study, plan_study
from tests.helpers import cli_env, start_cli

CPU = torch.device("cpu")


# --- precision ---------------------------------------------------------------------------------


def test_precision_on_a_cpu():
    assert precision_for("auto", CPU).dtype is None  # fp32: no autocast, no scaler
    assert precision_for("fp32", CPU).name == "fp32"
    bf16 = precision_for("bf16", CPU)
    assert bf16.scaler is None
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"train\.precision=fp16 needs a CUDA device"):
        precision_for("fp16", CPU)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp16", r"train.precision=fp16 needs a CUDA device \(its loss scaling"),
        ("train.precision=fp8", r"train.precision='fp8' is not a precision: choose auto, fp32"),
        # searched: each choice is checked, not only the config's own value
        ("train.precision=choice(fp32,fp16)", r"train.precision=fp16 needs a CUDA device"),
        ("train.precision=choice(fp32,fp8)", r"train.precision='fp8' is not a precision"),
    ],
)
def test_precision_a_cpu_cannot_run_is_refused_before_any_trial(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        plan_study(make_cfg(override, "train.device=cpu"))


def test_loss_scaling_unscales_before_clipping():
    """fp16's step (scaled loss, unscaled gradients, clipped, stepped) moves the weights as the
    plain step does: clipping saw the true gradients, not ones 65536 times larger. The CPU's
    GradScaler stands in for CUDA's (the same class and calls)."""

    def step(precision: Precision) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        loss = model(torch.randn(8, 4)).pow(2).mean()
        precision.backward(loss)
        precision.step(optimizer, model.parameters(), grad_clip=0.01)
        return model.weight.detach()

    plain = step(Precision(CPU))
    scaled = step(Precision(CPU, scaler=torch.amp.GradScaler("cpu")))
    torch.testing.assert_close(scaled, plain)
    torch.manual_seed(0)
    assert not torch.equal(plain, torch.nn.Linear(4, 3).weight)  # the step moved the weights


# --- model options and the out-of-memory message -----------------------------------------------


def test_gradient_checkpointing_is_switched_on_without_the_cache():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20))
    train = OmegaConf.create({"gradient_checkpointing": True, "compile": False})
    apply_memory_options(model, train)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing and model.config.use_cache is False


def test_out_of_memory_message_names_the_settings_and_what_to_change():
    train = OmegaConf.create(
        {
            "batch_size": 32,
            "micro_batch_size": 0,
            "max_length": 512,
            "gradient_checkpointing": False,
        }
    )
    message = out_of_memory_message(train, torch.device("cuda", 0), 1)
    assert message.startswith(
        "out of memory on cuda:0 at micro-batch 1 of train.batch_size=32 (halved automatically "
        "down to 1), train.max_length=512; to fit, try train.gradient_checkpointing=true; "
    )
    assert "micro_batch_size" not in message  # it cannot get smaller
    assert message.endswith("adapter=qlora (4-bit base, CUDA) or adapter=lora")
    train.micro_batch_size = 8
    assert "a smaller train.micro_batch_size" in out_of_memory_message(train, CPU, 8)


# --- sweep.devices -----------------------------------------------------------------------------


def test_devices_set_the_workers(make_cfg, monkeypatch):
    monkeypatch.delenv(VISIBLE, raising=False)
    cfg = make_cfg("backend=fake", "sweep.devices=[0,1]")
    assert cfg.sweep.n_workers == 2
    assert make_cfg("backend=fake", "sweep.devices=[1,0]", "sweep.n_workers=2").sweep.n_workers == 2
    assert worker_envs([1, 0]) == [{VISIBLE: "1"}, {VISIBLE: "0"}]
    monkeypatch.setenv(VISIBLE, "4,6")  # indices count among the GPUs this process sees
    assert worker_envs([1, 0]) == [{VISIBLE: "6"}, {VISIBLE: "4"}]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.devices=[0,0]"], r"sweep.devices=\[0, 0\] names GPU 0 twice"),
        (["sweep.devices=[0,-1]"], r"sweep.devices=\[0, -1\]: -1 is no GPU index"),
        (["sweep.devices=[0,1]", "sweep.n_workers=3"], r"sweep.n_workers=3 with sweep.devices"),
        (["sweep.devices=[0,2]"], r"GPU 2 is not among the 2 this process sees \(CUDA_VIS"),
    ],
)
def test_bad_devices_are_refused_before_any_trial(make_cfg, monkeypatch, overrides, message):
    monkeypatch.setenv(VISIBLE, "3,5")
    with pytest.raises(ConfigError, match=message):
        make_cfg("backend=fake", *overrides)


def test_devices_beyond_the_hosts_gpus_are_refused(make_cfg, monkeypatch):
    """Without CUDA_VISIBLE_DEVICES the indices are the host's GPUs, counted through NVML
    (torch.cuda.device_count: 0 on this CPU machine, so the count is stood in for)."""
    from harness import gpus

    monkeypatch.delenv(VISIBLE, raising=False)
    monkeypatch.setattr(gpus, "_gpu_count", lambda: 2)
    make_cfg("backend=fake", "sweep.devices=[1,0]")
    with pytest.raises(ConfigError, match=r"GPU 2 is not among the 2 GPUs of this host"):
        make_cfg("backend=fake", "sweep.devices=[0,2]")


def test_devices_with_sqlite_storage_are_refused(make_cfg, tmp_path, monkeypatch):
    """Several workers, so the rule for sweep.n_workers > 1 applies."""
    monkeypatch.delenv(VISIBLE, raising=False)
    cfg = make_cfg("backend=fake", "sweep.devices=[0,1]", f"storage.url=sqlite:///{tmp_path}/o.db")
    with pytest.raises(ConfigError, match="SQLite is not"):
        plan_study(cfg)


RECORDS = "HARNESS_TEST_DEVICE_RECORDS"  # the folder VisibleDeviceBackend records in


class VisibleDeviceBackend(FakeBackend):
    """Records, per trial, its process and the GPUs the process sees (CUDA_VISIBLE_DEVICES) in
    $HARNESS_TEST_DEVICE_RECORDS; then waits until two processes have recorded a trial, so
    that both of a 2-worker sweep run trials whatever their start-up times."""

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        folder = Path(os.environ[RECORDS])
        record = {"pid": os.getpid(), "visible": os.environ.get(VISIBLE)}
        (folder / f"trial-{spec.number}.json").write_text(json.dumps(record))
        deadline = time.monotonic() + 120
        while len({json.loads(p.read_text())["pid"] for p in folder.glob("*.json")}) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("no second worker process ran a trial in 120 s")
            time.sleep(0.05)  # polls the other process's file: no event crosses processes
        return super().run(spec, reporter)


_: type[Backend] = VisibleDeviceBackend


@pytest.mark.slow  # worker processes
def test_each_worker_sees_only_its_gpu(make_cfg, runs, tmp_path, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    overrides = [
        "backend=fake",
        "backend._target_=tests.test_devices.VisibleDeviceBackend",
        "backend.seconds_per_epoch=0",
        "sweep.n_trials=2",
        "sweep.devices=[0,1]",
        "pruner=none",
    ]
    allowed = f"{os.environ['HARNESS_BACKENDS']},tests.test_devices.VisibleDeviceBackend"
    monkeypatch.setenv("HARNESS_BACKENDS", allowed)
    env = cli_env(**{RECORDS: str(records), VISIBLE: None})
    process = start_cli("sweep", *overrides, runs=runs, env=env)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "2 workers" in output
    seen = [json.loads(path.read_text()) for path in sorted(records.glob("*.json"))]
    by_process = {record["pid"]: record["visible"] for record in seen}
    assert len(seen) == 2 and len(by_process) == 2  # each trial in its own process
    assert by_process.pop(process.pid) == "0"  # the sweep's own process: the first device
    assert list(by_process.values()) == ["1"]  # its helper: the second
    cfg = make_cfg(*overrides)
    trials = load_study(cfg).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {r["pid"] for r in seen}
