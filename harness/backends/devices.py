"""Where a local trial runs and what it does with that device's memory: the device it picks, the
precision it computes in (autocast, fp16 loss scaling), the memory-saving options it applies to
the model, how much memory is held, and an out-of-memory trial turned into a clear failure with
its memory given back."""

from __future__ import annotations

import contextlib
import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from omegaconf import DictConfig

from harness.config import ConfigError


def pick_device(name: str) -> Any:
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --- precision ---------------------------------------------------------------------------------


@dataclass
class Precision:
    """How a trial's passes compute: in fp32, or under autocast to ``dtype``; fp16 also scales
    the loss (``scaler``) so that small gradients do not underflow to zero."""

    device: Any
    dtype: Any = None  # None: fp32, no autocast
    scaler: Any = None  # a torch.amp.GradScaler with fp16

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def autocast(self) -> Any:
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: Any) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: Any, parameters: Any, grad_clip: float) -> None:
        """The optimizer step on the accumulated gradients, clipped to ``grad_clip`` (0: not
        clipped). With loss scaling the gradients are unscaled before clipping, and a step whose
        gradients overflowed is skipped (the scaler then lowers its scale)."""
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip > 0:
            # foreach: one kernel over all gradients (the default loops on CPU)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def precision_for(name: str, device: Any) -> Precision:
    """train.precision on ``device``: auto is bf16 autocast on a CUDA card that has bf16, fp16
    with loss scaling on one that does not, and fp32 elsewhere (CPU autocast is slower than fp32
    for the small models a CPU trains; MPS's bf16 support varies by chip)."""
    import torch

    if name == "auto":
        if device.type != "cuda":
            return Precision(device)
        # emulated bf16 (cards before Ampere) counts as missing: fp16 + scaling is much faster there
        name = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if name == "fp32":
        return Precision(device)
    if name == "bf16":
        return Precision(device, torch.bfloat16)
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError(_FP16_OFF_CUDA.format(device=device))
        return Precision(device, torch.float16, torch.amp.GradScaler("cuda"))
    raise ValueError(f"train.precision={name!r}: choose auto, fp32, bf16 or fp16")


_FP16_OFF_CUDA = (
    "train.precision=fp16 needs a CUDA device (its loss scaling is CUDA's), not {device}: use "
    "bf16 (autocast on CPUs too), fp32, or auto"
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(cfg: DictConfig, searched: frozenset[str]) -> None:
    """train.precision names a precision, and fp16 only where the trial will run on CUDA:
    refused before any trial (fp16 autocast on a CPU is slow and its loss scaler is CUDA's)."""
    from harness.search import searched_choices

    names = [str(v) for v in searched_choices(cfg, "train.precision", searched)]
    for name in names:  # the value, or each choice of a searched precision
        if name not in PRECISIONS:
            raise ConfigError(
                f"train.precision={name!r} is not a precision: choose {', '.join(PRECISIONS)}"
            )
    if "fp16" in names:
        device = pick_device(str(cfg.train.device))
        if device.type != "cuda":
            raise ConfigError(_FP16_OFF_CUDA.format(device=device))


# --- the model's memory options ----------------------------------------------------------------


def apply_memory_options(model: Any, train: DictConfig) -> None:
    """train.gradient_checkpointing and train.compile on the model, in place.

    Checkpointing recomputes each block's activations in the backward pass instead of keeping
    them (non-reentrant: works with frozen inputs and autocast); the KV cache is of no use in
    training and transformers refuses it with checkpointing. Compiling uses ``Module.compile``,
    which compiles the module's call in place: the model stays the same object, so
    ``state_dict`` keys carry no ``_orig_mod.`` prefix and save_pretrained saves as before."""
    if train.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        model.config.use_cache = False
    if train.compile:
        model.compile()


# --- memory ------------------------------------------------------------------------------------


def free_memory(device: Any) -> None:
    """Collects unreachable objects (tensors in reference cycles) and hands the CUDA caching
    allocator's free blocks back, so that the next trial (or another process) can have them."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def allocated_bytes(device: Any) -> int:
    """Bytes of tensor memory held on ``device``: the CUDA allocator's count on CUDA; elsewhere
    the sizes of the distinct storages of every live tensor the garbage collector tracks (every
    torch.Tensor and Parameter is tracked). Views share their base's storage, counted once."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # type(), not isinstance: isinstance asks some lazy proxies' __class__ (a warning)
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != device.type:
                continue
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
            storages[pointer] = max(storages.get(pointer, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # sparse, meta, fake tensors: no storage
            continue
    return sum(storages.values())


Result = TypeVar("Result", covariant=True)


class MemoryTrial(Protocol[Result]):
    """A trial whose big objects (model, optimizer, batches) ``release`` drops."""

    device: Any

    def run(self) -> Result: ...

    def release(self) -> None: ...

    def micro_batch_size(self) -> int: ...


# What CUDA libraries say when they cannot allocate, raised as a plain RuntimeError (cuBLAS
# creating its handle or workspace, cuDNN, kernels of Triton or bitsandbytes), not as torch's
# OutOfMemoryError
_ALLOCATION_FAILED = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOCATION_FAILED)


class TrialOutOfMemoryError(RuntimeError):
    """A trial ran out of device memory: the message says where, with which settings, and what
    to change. Only that trial fails; the study goes on."""


def run_releasing_memory(train: DictConfig, start: Callable[[], MemoryTrial[Result]]) -> Result:
    """``start()`` then its ``run()``; whatever happens, the trial's memory is released before
    this returns or raises. An out-of-memory error becomes TrialOutOfMemoryError.

    An exception's traceback keeps the frames it passed through, and with them their tensors
    (a batch, the best weights kept so far), alive as long as the exception is: those frames are
    cleared here (the traceback still shows where it failed), and an out-of-memory error is
    replaced by one that holds no traceback of the trial at all."""
    import torch

    trial: MemoryTrial[Result] | None = None
    failure: TrialOutOfMemoryError | None = None
    device = pick_device(str(train.device))
    try:
        trial = start()
        device = trial.device
        return trial.run()
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        if not is_out_of_memory(exc) or isinstance(exc, TrialOutOfMemoryError):
            raise
        from harness.backends.accumulation import first_micro_batch

        micro = trial.micro_batch_size() if trial is not None else first_micro_batch(train)
        failure = TrialOutOfMemoryError(out_of_memory_message(train, device, micro))
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if trial is not None:
            trial.release()
        del trial
        if train.compile:
            # dynamo's caches hold the compiled model, and the next trial's model would count
            # against their recompilation limit (compiled code is shared by every Module)
            torch._dynamo.reset()
        free_memory(device)
    raise failure  # here, outside the handler: it carries no context of the trial's frames


def out_of_memory_message(train: DictConfig, device: Any, micro_batch: int) -> str:
    """Out of memory on ``device``: with which batch settings, and what would fit."""
    automatic = not train.micro_batch_size and micro_batch == 1 < train.batch_size
    hints = []
    if micro_batch > 1:
        hints.append("a smaller train.micro_batch_size (gradients accumulate to the same batch)")
    if not train.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    hints += ["a shorter train.max_length", "adapter=qlora (4-bit base, CUDA) or adapter=lora"]
    return (
        f"out of memory on {device} at micro-batch {micro_batch} of train.batch_size="
        f"{train.batch_size}{' (halved automatically down to 1)' if automatic else ''}, "
        f"train.max_length={train.max_length}; to fit, try {'; '.join(hints)}"
    )
