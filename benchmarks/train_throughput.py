"""Training throughput: harness's local loop against transformers.Trainer on the same work.

Both sides train the same GPT-2 (same config, same seeded init) on the default study's data
(sentiment classification) with the same hyperparameters (learning rate, weight decay, linear
warmup then decay, gradient clipping, batch size, max_length, dynamic padding) for the same number
of optimizer steps, then evaluate once on the validation split. Reported per side:

- tokens/s: non-padding training tokens of optimizer steps 2..N over the wall time from the end of
  step 1 to the end of step N (model building, the first step, evaluation and harness's test pass
  are outside the timing). Both sides run the same steps with the same batch size, so they get the
  same token count: the examples those steps draw (whole shuffled epochs, a short last batch each)
  times the mean truncated length of a training example.
- eval loss: mean cross-entropy over validation examples (same work: comparable, not identical,
  since data order and dropout draws differ).

Each side runs --repeats times, alternately, after one short untimed warm-up each; the median
tokens/s is reported. Trainer keeps its own defaults otherwise (e.g. its AdamW implementation).
harness runs twice per repeat: with its default train.group_by_length=true (batches of similar
length, less padding; the Trainer's group_by_length is off by default) and without it, so the
gain of the loop itself and that of length grouping are seen apart.
--model gpt2-arch is GPT-2 small's shape with random weights; the tiny BPE tokenizer gets unused
tokens up to GPT-2's 50257 so that the embedding (and its optimizer work) is full size.
transformers.Trainer needs the `accelerate` package.

    python benchmarks/train_throughput.py                      # tiny GPT-2, CPU or CUDA
    python benchmarks/train_throughput.py --model gpt2-arch --bf16 --steps 300 --json  # on CUDA
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import transformers
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from harness import config, data
from harness.backends import local
from harness.backends.base import TrialSpec
from harness.backends.families import build_model
from harness.backends.local import LocalBackend, make_optimizer

GPT2_SMALL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.n_positions=1024"]
GPT2_VOCAB = 50257
WARMUP_STEPS = 5  # untimed first run of each side: one-time costs (allocator, kernels, imports)


class StepClock:
    """Wall time from the end of optimizer step 1 to the end of step `last`."""

    def __init__(self, last: int, cuda: bool) -> None:
        self.last, self.cuda, self.times = last, cuda, {}

    def mark(self, step: int) -> None:
        if step in (1, self.last):
            if self.cuda:
                torch.cuda.synchronize()
            self.times[step] = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.times[self.last] - self.times[1]


class SilentReporter:
    def set_total_steps(self, total: int) -> None:
        pass

    def report(self, step: int, metrics: Any) -> None:
        pass


class ClockCallback(TrainerCallback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.mark(state.global_step)


def run_harness(cfg: Any, prepared: Any, steps: int, cuda: bool) -> tuple[float, float]:
    """harness's loop, timed by a post-step hook on its optimizer (its loss reports come in
    bursts, so they cannot mark the end of a step)."""
    cfg = config.with_params(cfg, {"train.max_steps": steps, "train.eval_every_steps": steps})
    clock = StepClock(steps, cuda)
    counter = itertools.count(1)

    def optimizer_with_clock(model: Any, train: Any) -> Any:
        optimizer = make_optimizer(model, train)
        optimizer.register_step_post_hook(lambda *_: clock.mark(next(counter)))
        return optimizer

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
        with mock.patch.object(local, "make_optimizer", optimizer_with_clock):
            result = LocalBackend().run(spec, SilentReporter())
    return clock.seconds, result.metrics["eval/loss"]


def examples(split: Any, max_length: int, pad_id: int) -> list[dict[str, Any]]:
    """Rows as harness's batches() builds them: truncated, an empty text becomes one pad token."""
    return [
        {"input_ids": ids[:max_length] or [pad_id], "labels": target}
        for ids, target in zip(split.inputs, split.targets, strict=True)
    ]


def run_trainer(cfg: Any, prepared: Any, steps: int, cuda: bool, bf16: bool) -> tuple[float, float]:
    t = cfg.train
    torch.manual_seed(cfg.seed)  # as harness does before build_model: the same initial weights
    model = build_model(cfg, prepared)
    clock = StepClock(steps, cuda)
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
            logging_steps=50,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            bf16=bf16,
            seed=cfg.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=DataCollatorWithPadding(prepared.tokenizer),
            train_dataset=examples(prepared.train, t.max_length, prepared.pad_id),
            eval_dataset=examples(prepared.validation, t.max_length, prepared.pad_id),
            processing_class=prepared.tokenizer,
            callbacks=[ClockCallback(clock)],
        )
        trainer.remove_callback(PrinterCallback)  # keeps the output to the table below
        trainer.train()
        loss = trainer.evaluate()["eval_loss"]
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return clock.seconds, loss


def timed_tokens(split: Any, steps: int, batch_size: int, max_length: int) -> float:
    """Non-padding tokens of steps 2..N: each epoch is a shuffle of the split in batches of
    batch_size (the last one shorter), on both sides."""
    n = len(split)
    per_epoch = math.ceil(n / batch_size)
    drawn = sum(min(batch_size, n - (s % per_epoch) * batch_size) for s in range(1, steps))
    mean_length = sum(max(1, min(len(ids), max_length)) for ids in split.inputs) / n
    return drawn * mean_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["tiny", "gpt2-arch"],
        default="tiny",
        help="tiny: the default study's 2-layer GPT-2; gpt2-arch: GPT-2 small "
        "shape (12 layers, 768 wide, 50257 vocab), random weights",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both (CUDA only)")
    parser.add_argument("--json", action="store_true", help="also print one JSON result line")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.bf16 and not cuda:
        parser.error("--bf16 needs CUDA")
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as runs_dir:
        cfg = config.load_config(
            [
                f"train.batch_size={args.batch_size}",
                f"train.max_length={args.max_length}",
                f"train.epochs={args.steps}",
                "train.patience=0",
                f"paths.runs_dir={runs_dir}",
                f"train.device={'cuda' if cuda else 'cpu'}",
                f"train.precision={'bf16' if args.bf16 else 'fp32'}",
                *(GPT2_SMALL if args.model == "gpt2-arch" else []),
            ]
        )
        prepared = LocalBackend().prepare(cfg, data.load_dataset(cfg.data))
    if args.model == "gpt2-arch":  # build_model sizes the vocabulary by len(tokenizer)
        missing = GPT2_VOCAB - len(prepared.tokenizer)
        prepared.tokenizer.add_tokens([f"<|unused{i}|>" for i in range(max(0, missing))])

    ungrouped = config.with_params(cfg, {"train.group_by_length": False})
    run = {
        "harness": lambda steps: run_harness(cfg, prepared, steps, cuda),
        "harness_ungrouped": lambda steps: run_harness(ungrouped, prepared, steps, cuda),
        "trainer": lambda steps: run_trainer(cfg, prepared, steps, cuda, args.bf16),
    }
    for train in run.values():
        train(WARMUP_STEPS)
    seconds: dict[str, list[float]] = {name: [] for name in run}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, train in run.items():
            elapsed, losses[name] = train(args.steps)
            seconds[name].append(elapsed)

    tokens = timed_tokens(prepared.train, args.steps, args.batch_size, args.max_length)
    sides = {
        name: {
            "tokens_per_s": statistics.median(tokens / s for s in times),
            "seconds": times,
            "eval_loss": losses[name],
        }
        for name, times in seconds.items()
    }
    ratio = sides["harness"]["tokens_per_s"] / sides["trainer"]["tokens_per_s"]
    ratio_ungrouped = sides["harness_ungrouped"]["tokens_per_s"] / sides["trainer"]["tokens_per_s"]
    m = cfg.model
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in build_model(cfg, prepared).parameters())
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(
        f"device {device}, {precision}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"model {args.model}: n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, "
        f"vocab {len(prepared.tokenizer)}, {params / 1e6:.2f}M params"
    )
    print(
        f"{args.steps} steps (timed: 2..{args.steps}), batch {args.batch_size}, max_length "
        f"{args.max_length}, {len(prepared.train)} train examples, median of {args.repeats}"
    )
    labels = [
        ("harness", "harness loop"),
        ("harness_ungrouped", "harness, no grouping"),
        ("trainer", "transformers.Trainer"),
    ]
    for name, label in labels:
        side = sides[name]
        print(
            f"  {label:<21} tokens/s {side['tokens_per_s']:9.0f}   "
            f"eval loss {side['eval_loss']:.4f}"
        )
    goal = "" if cuda else "  (goal >= 1.2x on CPU)"
    print(f"  ratio harness/Trainer: {ratio:.2f}x{goal}")
    print(f"  ratio harness without length grouping/Trainer: {ratio_ungrouped:.2f}x")
    if args.json:
        result = {"device": device, "bf16": args.bf16, "model": args.model, "params": params}
        result |= {"n_layer": m.n_layer, "n_embd": m.n_embd, "vocab": len(prepared.tokenizer)}
        result |= {"steps": args.steps, "batch_size": args.batch_size, "timed_tokens": tokens}
        result |= {"max_length": args.max_length, "repeats": args.repeats, "ratio": ratio}
        result |= {"ratio_ungrouped": ratio_ungrouped}
        print(json.dumps(result | sides))


if __name__ == "__main__":
    main()
