"""The two training loops train_throughput.py times: harness's (LocalBackend, hooked where it
builds its optimizer and draws each epoch's batches) and transformers.Trainer's (with its best
settings for the same work), each returning a Run: seconds and non-padding tokens of optimizer
steps 2..N, counted from the batches the side actually drew."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from harness import config
from harness.backends import local
from harness.backends.base import TrialSpec
from harness.backends.families import build_model
from harness.backends.local import LocalBackend, make_optimizer


@dataclasses.dataclass(frozen=True)
class Side:
    label: str
    loop: str  # "harness" | "trainer"
    adapter: str  # "none" | "lora" | "qlora"
    grouped: bool = True


@dataclasses.dataclass
class Run:
    """One training run of a side: timed seconds and tokens of steps 2..N, and what it drew."""

    seconds: float
    tokens: int
    padded: int  # tokens of the padded batches of steps 2..N, padding included
    eval_loss: float
    trainable: int
    epochs: list[list[int]]  # the example indices of each epoch begun, in training order
    peak_bytes: int | None = None


class StepClock:
    """Wall time from the end of optimizer step 1 to the end of step `last`, and the peak
    memory read at the end of step `last` (training's, before evaluation)."""

    def __init__(self, last: int, cuda: bool, peak: Callable[[], int] | None) -> None:
        self.last, self.cuda, self.read_peak = last, cuda, peak
        self.times: dict[int, float] = {}
        self.peak: int | None = None

    def mark(self, step: int) -> None:
        if step in (1, self.last):
            if self.cuda:
                torch.cuda.synchronize()
            self.times[step] = time.perf_counter()
            if step == self.last and self.read_peak is not None:
                self.peak = self.read_peak()

    @property
    def seconds(self) -> float:
        if len(self.times) < 2:
            raise RuntimeError(
                f"saw the end of steps {sorted(self.times)} only, not 1 and {self.last}: the "
                "training loop no longer builds its optimizer where this benchmark hooks it"
            )
        return self.times[self.last] - self.times[1]


class SilentReporter:
    def set_total_steps(self, total: int) -> None:
        pass

    def report(self, step: int, metrics: Any) -> None:
        pass

    def set_tags(self, tags: Any) -> None:
        pass


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.mark(state.global_step)


class RecordingSampler(torch.utils.data.Sampler[int]):
    """The Trainer's own sampler, recording the indices of each epoch as they are drawn."""

    def __init__(self, inner: Any, epochs: list[list[int]]) -> None:
        self.inner, self.epochs = inner, epochs

    def __iter__(self) -> Iterator[int]:
        drawn: list[int] = []
        self.epochs.append(drawn)
        for index in self.inner:
            drawn.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.inner)


class RecordingTrainer(Trainer):
    drawn_epochs: list[list[int]]

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return RecordingSampler(super()._get_train_sampler(*args, **kwargs), self.drawn_epochs)


def token_lengths(split: Any, max_length: int) -> list[int]:
    """Non-padding tokens of each example as trained: truncated, an empty text one pad token."""
    return [max(1, min(len(ids), max_length)) for ids in split.inputs]


def loader_batches(epochs: list[list[int]], batch_size: int) -> list[list[int]]:
    """The batches a DataLoader cuts from its sampler's epochs: consecutive batch_size slices of
    each epoch (the last one shorter), epochs one after another."""
    return [epoch[i : i + batch_size] for epoch in epochs for i in range(0, len(epoch), batch_size)]


def timed_tokens(batches: list[list[int]], steps: int, lengths: list[int]) -> tuple[int, int]:
    """Non-padding tokens of steps 2..steps (one batch per step), and the tokens the padded
    batches hold (each padded to its longest example)."""
    timed = batches[1:steps]
    tokens = sum(lengths[i] for batch in timed for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in timed)
    return tokens, padded


def whole_epochs(epochs: list[list[int]], n: int) -> tuple[int, bool]:
    """How many recorded epochs are complete, and whether each holds every example once."""
    complete = [epoch for epoch in epochs if len(epoch) >= n]
    return len(complete), all(sorted(epoch) == list(range(n)) for epoch in complete)


def lora_config(cfg: Any, model: Any) -> Any:
    """PEFT's LoraConfig from the lora section, as harness's adapter=lora reads it: all linear
    layers but the head (or attention only), GPT-2's Conv1D layers with fan_in_fan_out, and the
    new classification head trained in full (PEFT's SEQ_CLS task saves it)."""
    from peft import LoraConfig, TaskType

    lora, gpt2 = cfg.lora, model.config.model_type == "gpt2"
    attention = ["c_attn"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(lora.r),
        lora_alpha=lora.alpha,  # a float in harness's schema; PEFT scales by alpha / r either way
        lora_dropout=float(lora.dropout),
        use_rslora=bool(lora.rslora),
        use_dora=bool(lora.dora),
        target_modules="all-linear" if lora.target_modules == "all_linear" else attention,
        fan_in_fan_out=gpt2,
    )


def run_harness(
    cfg: Any, prepared: Any, steps: int, cuda: bool, peak: Callable[[], int] | None
) -> Run:
    """harness's loop, timed by a post-step hook on its optimizer (its loss reports come in
    bursts, so they cannot mark the end of a step); its batches recorded where each epoch's are
    drawn (epoch_batches)."""
    cfg = config.with_params(cfg, {"train.max_steps": steps, "train.eval_every_steps": steps})
    clock = StepClock(steps, cuda, peak)
    counter = itertools.count(1)
    trainable: list[int] = []
    epochs: list[list[int]] = []
    batches: list[list[int]] = []

    def optimizer_with_clock(model: Any, train: Any) -> Any:
        optimizer = make_optimizer(model, train)
        trainable.append(sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
        optimizer.register_step_post_hook(lambda *_: clock.mark(next(counter)))
        return optimizer

    def recorded_epoch(*args: Any, **kwargs: Any) -> list[list[int]]:
        chunks = epoch_batches(*args, **kwargs)
        epochs.append([i for chunk in chunks for i in chunk])
        batches.extend(chunks)  # grouped: the short batch may be anywhere in the epoch
        return chunks

    epoch_batches = local.epoch_batches
    with tempfile.TemporaryDirectory() as workdir:
        spec = TrialSpec(
            number=0,
            config=cfg,
            prepared=prepared,
            workdir=Path(workdir),
            save_model=False,
            metric=str(cfg.sweep.metric),
            direction=str(cfg.sweep.direction),
        )
        with (
            mock.patch.object(local, "make_optimizer", optimizer_with_clock),
            mock.patch.object(local, "epoch_batches", recorded_epoch),
        ):
            result = LocalBackend().run(spec, SilentReporter())
    lengths = token_lengths(prepared.train, cfg.train.max_length)
    tokens, padded = timed_tokens(batches, steps, lengths)
    loss = result.metrics["eval/loss"]
    return Run(clock.seconds, tokens, padded, loss, trainable[0], epochs, clock.peak)


def examples(split: Any, max_length: int, pad_id: int) -> list[dict[str, Any]]:
    """Rows as harness's batches() builds them: truncated, an empty text becomes one pad token."""
    return [
        {"input_ids": ids[:max_length] or [pad_id], "labels": target}
        for ids, target in zip(split.inputs, split.targets, strict=True)
    ]


def grouping_args(grouped: bool) -> dict[str, Any]:
    """The Trainer's length grouping: train_sampling_strategy in newer transformers 5 releases,
    group_by_length before it."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def run_trainer(
    cfg: Any,
    prepared: Any,
    steps: int,
    cuda: bool,
    peak: Callable[[], int] | None,
    side: Side,
    workers: int,
) -> Run:
    t = cfg.train
    torch.manual_seed(cfg.seed)  # as harness does before build_model: the same initial weights
    model = build_model(cfg, prepared)
    if side.adapter == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock = StepClock(steps, cuda, peak)
    with tempfile.TemporaryDirectory() as workdir:
        args = TrainingArguments(
            output_dir=workdir,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=max(t.batch_size, 32),
            max_steps=steps,
            learning_rate=t.learning_rate,
            weight_decay=t.weight_decay,
            warmup_steps=int(steps * t.warmup_ratio),
            lr_scheduler_type="linear",
            max_grad_norm=t.grad_clip,
            optim="adamw_torch_fused",
            **grouping_args(side.grouped),
            logging_strategy="no",
            logging_nan_inf_filter=False,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not cuda,
            bf16=t.precision == "bf16",
            seed=cfg.seed,
            dataloader_num_workers=workers,
            dataloader_persistent_workers=workers > 0,
            dataloader_pin_memory=cuda,
            label_names=["labels"],
        )
        trainer = RecordingTrainer(
            model=model,
            args=args,
            data_collator=DataCollatorWithPadding(prepared.tokenizer),
            train_dataset=examples(prepared.train, t.max_length, prepared.pad_id),
            eval_dataset=examples(prepared.validation, t.max_length, prepared.pad_id),
            processing_class=prepared.tokenizer,
            callbacks=[ClockCallback(clock)],
        )
        trainer.drawn_epochs = []
        trainer.remove_callback(PrinterCallback)  # keeps the output to the table below
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
        epochs = trainer.drawn_epochs
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    lengths = token_lengths(prepared.train, t.max_length)
    tokens, padded = timed_tokens(loader_batches(epochs, t.batch_size), steps, lengths)
    return Run(clock.seconds, tokens, padded, loss, trainable, epochs, clock.peak)


def with_cuda_peak(train: Callable[[], Run]) -> Run:
    """The run, with the CUDA allocator's peak until its last step over what was allocated at
    its start."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run = train()
    run.peak_bytes = None if run.peak_bytes is None else run.peak_bytes - start
    return run
