"""What the benchmarks measure besides time: peak memory (the CUDA allocator's, one process's
resident high-water mark, a process tree's resident set) and model FLOPs utilisation.

Imported by the scripts beside it (`python benchmarks/X.py` puts this folder on sys.path).
"""

from __future__ import annotations

import contextlib
import re
import resource
import threading
from pathlib import Path
from typing import Any

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by the name torch.cuda.get_device_name()
# gives; the first pattern that matches wins. None: not known here, pass --peak-tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    (r"H200", 989.0),
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", None),
    (r"H100", 989.0),  # SXM: reported as "NVIDIA H100 80GB HBM3"
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),  # not L40/L40S
)


def peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matrix product per token: all but the embedding tables
    (a lookup, no multiply; a classification model has no LM head using them). The estimate of
    training FLOPs per token below multiplies this; it leaves attention's score and value
    products out (about 12 * layers * width * sequence length more per token), so MFU is
    slightly understated at long sequences."""
    import torch

    embedded = sum(
        p.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    )
    return sum(p.numel() for p in model.parameters()) - embedded


def train_flops_per_token(params: int, adapter: str) -> float:
    """The usual estimate: full fine-tuning 6N (forward 2N, backward 4N: gradients of the
    activations and of the weights); LoRA and QLoRA 4N (the frozen weights get no gradient;
    the adapters' own work is negligible)."""
    return (6.0 if adapter == "none" else 4.0) * params


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the card's bf16 peak."""
    return None if peak is None else tokens_per_s * flops_per_token / (peak * 1e12)


class HighWater:
    """This process's peak resident set size since reset(), in bytes. Linux: the kernel's
    high-water mark VmHWM, reset by writing 5 to /proc/self/clear_refs (exact, no sampling).
    Elsewhere, or where the reset is refused: ru_maxrss, the peak over the process's whole life
    (``exact`` is then False: call reset() before the process grows)."""

    def __init__(self) -> None:
        self.exact = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = self.peak() <= self.current() * 1.05
        except OSError:
            self.exact = False

    @staticmethod
    def current() -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def peak(self) -> int:
        try:
            status = Path("/proc/self/status").read_text()
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        # Linux reports kilobytes, macOS bytes
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if Path("/System").exists() else maxrss * 1024


class TreeRSS:
    """The peak resident set size of a process and all its descendants, summed (pages shared
    between processes count once per process), sampled every ``interval`` seconds in a thread:
    a spike shorter than the interval can be missed."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += process.memory_info().rss  # unless it ended since the listing
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def children_max_rss() -> int:
    """ru_maxrss of RUSAGE_CHILDREN: the largest peak RSS of any single descendant this process
    has waited for (and that descendant's waited-for descendants), in bytes (Linux)."""
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return maxrss if Path("/System").exists() else maxrss * 1024
