"""sweep.devices: one worker process per GPU of this host, each seeing only its own.

A process sees the GPUs that CUDA_VISIBLE_DEVICES names when CUDA initialises in it (the first
CUDA call, in the first trial): the sweep's first process takes devices[0] by setting the
variable in its own environment before then, and each helper it starts gets the next device in
its environment. Inside every worker the GPU is then cuda:0, which train.device=auto picks.
"""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig

from harness.config import ConfigError

VISIBLE = "CUDA_VISIBLE_DEVICES"
_before_pin: list[str | None] = []  # the variable before this process pinned itself, if it did


def settle_workers(cfg: DictConfig) -> None:
    """Checks sweep.devices and makes sweep.n_workers one worker per device (in place)."""
    devices = list(cfg.sweep.devices)
    if not devices:
        return
    negative = [d for d in devices if d < 0]
    if negative:
        raise ConfigError(
            f"sweep.devices={devices}: {negative[0]} is no GPU index; use the indices "
            "nvidia-smi shows (0, 1, ...)"
        )
    repeated = sorted({d for d in devices if devices.count(d) > 1})
    if repeated:
        raise ConfigError(
            f"sweep.devices={devices} names GPU {repeated[0]} twice: each worker gets a GPU of "
            "its own; list each GPU once"
        )
    if cfg.sweep.n_workers not in (1, len(devices)):
        raise ConfigError(
            f"sweep.n_workers={cfg.sweep.n_workers} with sweep.devices={devices}: the devices "
            f"set the workers (one per GPU, {len(devices)} here); leave sweep.n_workers out"
        )
    worker_envs(devices)  # each index is a GPU this process sees
    cfg.sweep.n_workers = len(devices)


def worker_envs(devices: list[int]) -> list[dict[str, str]]:
    """The environment entry of each worker (the first: the sweep's own process) that shows it
    only its GPU; [] without sweep.devices. An index counts among the GPUs this process sees:
    under CUDA_VISIBLE_DEVICES=2,3, sweep.devices=[0,1] means GPUs 2 and 3."""
    seen = ((_before_pin[0] if _before_pin else os.environ.get(VISIBLE)) or "").strip()
    if not seen:
        count = _gpu_count()
        missing = [device for device in devices if count and device >= count]
        if missing:
            raise ConfigError(
                f"sweep.devices={devices}: GPU {missing[0]} is not among the {count} GPUs of "
                "this host (nvidia-smi -L lists them)"
            )
        return [{VISIBLE: str(device)} for device in devices]
    names = [name.strip() for name in seen.split(",")]
    missing = [device for device in devices if device >= len(names)]
    if missing:
        raise ConfigError(
            f"sweep.devices={devices}: GPU {missing[0]} is not among the {len(names)} this "
            f"process sees ({VISIBLE}={seen})"
        )
    return [{VISIBLE: names[device]} for device in devices]


def _gpu_count() -> int:
    """The host's CUDA GPUs, counted through NVML without initialising CUDA (which would fix
    the GPUs this process sees before it is pinned); 0 where torch has no CUDA (nothing to
    check the indices against: the workers are pinned all the same)."""
    import torch

    return int(torch.cuda.device_count())


def pin_this_process(entry: dict[str, str]) -> None:
    """This process (the sweep's first worker) sees only the GPU ``entry`` names from now on.
    CUDA reads the variable once, when it initialises: if it already has, the pin is too late."""
    torch = sys.modules.get("torch")
    if entry and torch is not None and torch.cuda.is_initialized():
        logging.getLogger("harness").warning(
            "CUDA was initialised before sweep.devices could pin this process to GPU %s: its "
            "trials see every GPU",
            entry[VISIBLE],
        )
    if entry and not _before_pin:
        _before_pin.append(os.environ.get(VISIBLE))
    os.environ.update(entry)
