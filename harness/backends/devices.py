"""Where a local trial runs: the device it picks, and what it knows about that device."""

from __future__ import annotations

from typing import Any


def pick_device(name: str) -> Any:
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
