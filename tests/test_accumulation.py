"""Gradient accumulation: micro-batches whose weighted losses give the whole batch's gradient,
and the automatic micro-batch that halves at each out-of-memory error."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from harness.backends.accumulation import GradientAccumulation, micro_batches
from harness.backends.devices import Precision

PAD = 0


def tiny_model(task: str):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=PAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=3,
    )  # fmt: skip
    cls = GPT2ForSequenceClassification if task == "classification" else GPT2LMHeadModel
    return cls(config)


def padded_batch(task: str) -> dict[str, torch.Tensor]:
    """5 rows of unequal lengths, right-padded as batching.batches pads them; generation rows
    have prompts (label -100) and completions of unequal lengths."""
    lengths, completions = [9, 3, 7, 2, 5], [6, 1, 2, 1, 4]
    width = max(lengths)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 50, (len(lengths), width), generator=generator)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (length, completion) in enumerate(zip(lengths, completions, strict=True)):
        input_ids[row, length:] = PAD
        attention[row, :length] = 1
        labels[row, length - completion : length] = input_ids[row, length - completion : length]
    if task == "classification":
        labels = torch.tensor([0, 2, 1, 2, 0])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def gradients(task: str, micro_batch_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model(task)
    train = OmegaConf.create({"batch_size": 5, "micro_batch_size": micro_batch_size})
    accumulation = GradientAccumulation(train, task, Precision(torch.device("cpu")))
    loss = accumulation.backward(model, padded_batch(task))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("task", ["classification", "generation"])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_give_the_whole_batchs_loss_and_gradient(task, micro):
    whole_loss, whole = gradients(task, 0)
    loss, accumulated = gradients(task, micro)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    assert accumulated.keys() == whole.keys() and len(whole) > 10
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generation_micro_batches_weigh_their_target_tokens():
    """A micro-batch weighs its target tokens (labels other than -100 after the shift) over
    the batch's; one with no target is left out."""
    batch = padded_batch("generation")
    batch["labels"][1] = -100  # row 1: no target at all
    parts = micro_batches(batch, 2, "generation")
    # targets per row: 6, 0, 2, 1, 4 (13 in all); rows [0,1] -> 6, [2,3] -> 3, [4] -> 4
    assert [w for _, w in parts] == pytest.approx([6 / 13, 3 / 13, 4 / 13])
    assert [len(p["labels"]) for p, _ in parts] == [2, 2, 1]
    alone = micro_batches(batch, 1, "generation")
    assert len(alone) == 4  # row 1 is left out
    assert micro_batches(batch, 5, "generation") == [(batch, 1.0)]


def test_classification_micro_batches_weigh_their_examples():
    parts = micro_batches(padded_batch("classification"), 2, "classification")
    assert [w for _, w in parts] == pytest.approx([2 / 5, 2 / 5, 1 / 5])


def raise_oom_above(model, rows: int, calls: list[int], error=None) -> None:
    """The model runs out of memory in training when a forward pass gets more than ``rows``
    examples (as a GPU would), before computing anything; ``calls`` records each pass's rows.
    ``error``: what it raises (torch's OutOfMemoryError by default)."""
    forward = model.forward

    def limited(*args, **kwargs):
        n = len(kwargs["input_ids"])
        calls.append(n)
        if model.training and n > rows:
            raise error or torch.OutOfMemoryError(f"CUDA out of memory (simulated: {n} rows)")
        return forward(*args, **kwargs)

    model.forward = limited


def test_automatic_micro_batch_halves_until_the_step_fits():
    model = tiny_model("generation")
    train = OmegaConf.create({"batch_size": 5, "micro_batch_size": 0})
    accumulation = GradientAccumulation(train, "generation", Precision(torch.device("cpu")))
    calls: list[int] = []
    raise_oom_above(model, 1, calls)
    loss = accumulation.backward(model, padded_batch("generation"))
    assert accumulation.size == 1
    assert calls == [5, 2, 1, 1, 1, 1, 1]  # 5 -> 2 -> 1, then the step over 5 micro-batches
    whole_loss, whole = gradients("generation", 0)
    assert float(loss) == pytest.approx(whole_loss, rel=1e-5)
    for name, p in model.named_parameters():  # no gradient left over from the failed tries
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    accumulation.backward(model, padded_batch("generation"))
    assert calls == [1] * 5  # the next steps start at the size that fit


@pytest.mark.parametrize(
    "error",
    [
        # what cuBLAS says when it cannot allocate its workspace: a plain RuntimeError
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("CUDA error: out of memory"),
    ],
)
def test_a_cuda_librarys_allocation_failure_halves_too(error):
    model = tiny_model("generation")
    train = OmegaConf.create({"batch_size": 5, "micro_batch_size": 0})
    accumulation = GradientAccumulation(train, "generation", Precision(torch.device("cpu")))
    calls: list[int] = []
    raise_oom_above(model, 2, calls, error)
    accumulation.backward(model, padded_batch("generation"))
    assert accumulation.size == 2 and calls[:2] == [5, 2]


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    model = tiny_model("generation")
    train = OmegaConf.create({"batch_size": 5, "micro_batch_size": 0})
    accumulation = GradientAccumulation(train, "generation", Precision(torch.device("cpu")))
    calls: list[int] = []
    raise_oom_above(model, 2, calls, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        accumulation.backward(model, padded_batch("generation"))
    assert calls == [5] and accumulation.size == 5


@pytest.mark.parametrize("micro_batch_size", [0, 2])
def test_out_of_memory_is_raised_when_the_micro_batch_cannot_shrink(micro_batch_size):
    """Automatic: past micro-batch 1; set by the user: at once (their setting is kept)."""
    model = tiny_model("classification")
    train = OmegaConf.create({"batch_size": 5, "micro_batch_size": micro_batch_size})
    accumulation = GradientAccumulation(train, "classification", Precision(torch.device("cpu")))
    calls: list[int] = []
    raise_oom_above(model, 0, calls)
    with pytest.raises(torch.OutOfMemoryError):
        accumulation.backward(model, padded_batch("classification"))
    assert calls == ([5, 2, 1] if micro_batch_size == 0 else [2])
