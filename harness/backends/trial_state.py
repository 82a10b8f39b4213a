"""A local trial's full state, saved at each evaluation (train.save_state), so that a retry of a
trial whose process died (kill -9, a lost node) or was pre-empted (SIGTERM) goes on from the last
evaluation instead of from step 0, and ends with the metrics an uninterrupted run has (exactly,
on CPU).

One file, ``<workdir>/trial-state.pt``, written to a temporary name and renamed over the last
one (atomic: a kill while saving leaves the previous state whole), so a trial's disk holds one
state: its trainable weights, the best evaluation's weights and the optimizer's moments. It
holds what the rest of the trial cannot rebuild:

- the model's trainable state: parameters with requires_grad and buffers (with an adapter, the
  adapter and the head; the frozen rest is rebuilt from the seed and the checkpoint);
- the optimizer, the LR scheduler and any other part with a ``state_dict``;
- the RNG states (torch CPU, CUDA, Python's ``random``, NumPy's) and the data order's generator
  as the current epoch began, with the batches of that epoch done: the epoch's batch order is
  drawn again, identically, and the done batches skipped;
- the step, early stopping's best (score, metrics, weights, stale count), the evaluations so far
  (replayed to the retry's reporter: its run and its pruner see the whole trial) and training
  losses not yet reported;
- the trial's identity (its key and the config that shapes its training): a state saved by
  another trial, or by this one under other settings, is never loaded.

The state is deleted when the trial ends in any way this process sees (``deleted_at_the_end``),
but pre-emption (SIGTERM): only a dead or pre-empted process leaves it, for its retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from harness.backends.base import Reporter, TrialSpec

STATE_FILE = "trial-state.pt"
RESUMED_TAG = "harness.resumed_from_step"
# the config sections whose values shape a trial's training (train.save_state aside)
SHAPING_SECTIONS = ("seed", "model", "adapter", "lora", "train")


class BestSoFar(Protocol):
    """Early stopping's record (local._Best): what the state saves of it."""

    score: float
    metrics: dict[str, float]
    state: Any  # the best evaluation's trainable state, on the CPU
    stale: int
    latest: dict[str, float]  # the last evaluation offered


def trainable_state(model: Any) -> dict[str, Any]:
    """The model's state that training changes: parameters with requires_grad and persistent
    buffers, by their state_dict names (tied weights under each of their names). References,
    not copies."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return {
        name: value
        for name, value in model.state_dict().items()
        if name in buffers or (name in params and params[name].requires_grad)
    }


def cpu_copy(state: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


def load_trainable(model: Any, state: Mapping[str, Any]) -> None:
    """Loads a trainable state into ``model``; what it lacks must be frozen weights, and it may
    hold nothing the model does not have."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    unfilled = set(missing) & set(trainable_state(model))
    if unexpected or unfilled:
        raise ValueError(
            f"the saved state does not fit the model: unexpected {sorted(unexpected)[:5]}, "
            f"trainable but missing {sorted(unfilled)[:5]}"
        )


def identity(spec: TrialSpec) -> str:
    """What a state must have been saved under to be loaded: the trial's key and the config
    that shapes its training."""
    container = OmegaConf.to_container(spec.config, resolve=True)
    assert isinstance(container, dict)
    shaping = {name: container[name] for name in SHAPING_SECTIONS if name in container}
    shaping["train"] = {k: v for k, v in shaping["train"].items() if k != "save_state"}
    payload = {"key": spec.key, "metric": spec.metric, "direction": spec.direction, **shaping}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TrialState:
    """Saves and restores one trial's state in its workdir. The loop calls ``resume`` once
    before training, ``start_epoch`` before drawing each epoch's batches, and ``save`` after
    each evaluation."""

    def __init__(
        self,
        spec: TrialSpec,
        model: Any,
        parts: Mapping[str, Any],
        order: Any,
        device: Any,
    ) -> None:
        self.path = spec.workdir / STATE_FILE
        self.enabled = bool(spec.config.train.save_state)
        self.identity = identity(spec)
        self.model, self.parts, self.order, self.device = model, parts, order, device
        self.evaluations: list[tuple[int, dict[str, float]]] = []
        self.epoch_start: Any = None  # the data order's state as the current epoch began
        self.epoch_first_step = 0  # the step before the current epoch's first batch
        self.resumed_epoch: tuple[Any, int] | None = None  # (epoch start, batches done)

    def resume(self, best: BestSoFar, losses: list[Any], reporter: Reporter) -> int:
        """Restores this trial's saved state, if there is one: the step it was saved at (0 if
        none). The evaluations before it are reported again (they may prune the trial)."""
        import torch

        if not self.enabled or not self.path.exists():
            return 0
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: start over rather than fail the retry
            logging.getLogger("harness").warning("ignoring %s: %s", self.path, exc)
            return 0
        # the same settings, and the same parts: train.precision=auto may have resolved to fp16
        # (a loss scaler) on the dead trial's card and to bf16 on the retry's
        if saved.get("identity") != self.identity or set(saved["parts"]) != set(self.parts):
            logging.getLogger("harness").warning(
                "ignoring %s: saved by another trial or other settings", self.path
            )
            return 0
        load_trainable(self.model, saved["model"])
        for name, part in self.parts.items():
            part.load_state_dict(saved["parts"][name])
        best.score, best.metrics = saved["best_score"], saved["best_metrics"]
        best.stale, best.state = saved["best_stale"], saved["best_state"]
        losses[:] = [loss.to(self.device) for loss in saved["losses"]]
        self.resumed_epoch = (saved["epoch_start"], saved["epoch_done"])
        step = int(saved["step"])
        reporter.set_tags({RESUMED_TAG: str(step)})
        for at, metrics in saved["evaluations"]:  # the retry's run and pruner see them all
            reporter.report(at, metrics)
        self.evaluations = list(saved["evaluations"])
        set_rng_states(saved["rng"])  # last: nothing above may draw from them
        return step

    def start_epoch(self, step: int) -> int:
        """Before an epoch's batches are drawn from the data order: after a resume, sets the
        order back to where the interrupted epoch began and returns the batches of it already
        trained, to skip; else 0."""
        done = 0
        if self.resumed_epoch is not None:
            start, done = self.resumed_epoch
            self.order.set_state(start)
            self.resumed_epoch = None
        self.epoch_start = self.order.get_state()
        self.epoch_first_step = step - done
        return done

    def save(self, step: int, best: BestSoFar, losses: list[Any]) -> None:
        """After the evaluation at ``step``: the state to go on from, replacing the last one."""
        import torch

        self.evaluations.append((step, dict(best.latest)))
        if not self.enabled:
            return
        state = {
            "identity": self.identity,
            "step": step,
            "epoch_start": self.epoch_start,
            "epoch_done": step - self.epoch_first_step,
            "model": cpu_copy(trainable_state(self.model)),
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
            "best_score": best.score,
            "best_metrics": dict(best.metrics),
            "best_stale": best.stale,
            "best_state": best.state,
            "evaluations": self.evaluations,
            "losses": [loss.detach().cpu() for loss in losses],
            "rng": rng_states(),
        }
        # named by process: a retry on another host that wrongly took this one for dead (a
        # heartbeat lost) does not write into the same temporary file on a shared disk
        temporary = self.path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before it replaces the last one (a lost node)
        os.replace(temporary, self.path)


def rng_states() -> dict[str, Any]:
    """Every random number generator training may draw from, in a form torch.load reads back
    with weights_only (tensors, numbers, tuples)."""
    import torch

    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # not imported: nothing drew from it
        import numpy as np

        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        as_tensor = torch.from_numpy(np.asarray(keys, dtype=np.int64))  # uint32: no torch dtype
        states["numpy"] = (kind, as_tensor, position, has_gauss, gauss)
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        # a retry may see fewer devices (a worker sees only its own)
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    if "numpy" in states:
        import numpy as np

        kind, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, gauss))


def discard(workdir: Path) -> None:
    """Deletes the trial's state, and temporary ones a kill left while they were written."""
    for path in [workdir / STATE_FILE, *workdir.glob(f"{STATE_FILE}.*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def deleted_at_the_end(workdir: Path) -> Iterator[None]:
    """Deletes the trial's state when the trial ends: returned, pruned, failed, interrupted
    (Ctrl-C: harness records the trial as failed and does not retry it). A process that dies
    leaves it for the retry of its trial, and so does one pre-empted (SIGTERM: its trial is
    retried, see harness.study.objective)."""
    from harness.workers import Preempted

    try:
        yield
    except Preempted:
        raise
    except (Exception, KeyboardInterrupt):
        discard(workdir)
        raise
    discard(workdir)
