"""Training throughput: harness's local loop against transformers.Trainer on the same work, and
LoRA / QLoRA against full fine-tuning.

Every side trains the same model (same config, same seeded init) on the default study's data
(sentiment classification) with the same hyperparameters (learning rate, weight decay, linear
warmup then decay, gradient clipping, batch size, max_length, dynamic padding) for the same number
of optimizer steps, then evaluates once on the validation split.

Sides, by --adapter:
- none (default): harness with train.group_by_length=true against the Trainer with length
  grouping (its LengthGroupedSampler) is THE like-for-like ratio; harness with
  group_by_length=false against the Trainer without grouping is the second pair.
- lora: harness full fine-tuning, harness adapter=lora (the lora.* defaults of
  conf/config.yaml), and the Trainer on the same model wrapped by peft.get_peft_model with the
  same LoraConfig (length grouping on both). Ratios: LoRA/full (tokens/s, peak memory) and
  harness LoRA/Trainer LoRA.
- qlora (CUDA, bitsandbytes): harness full fine-tuning and harness adapter=qlora.

The Trainer runs with its own best settings for this work, not its defaults: fused AdamW
(optim="adamw_torch_fused"), length grouping as above, the same precision (bf16 autocast with
--bf16, fp32 otherwise), pinned memory on CUDA, no per-step NaN/Inf check of the loss
(logging_nan_inf_filter=False: that check makes the host wait for the GPU at every step), no
logging, saving or evaluation during training, no progress bar, no reporting integrations.
Data loading runs in the main process (--trainer-workers 0: collating 16 short rows takes
microseconds, and worker processes add inter-process copies per batch); try other values.

Reported per side:
- tokens/s: non-padding training tokens of optimizer steps 2..N over the wall time from the end
  of step 1 to the end of step N (model building, the first step, evaluation and harness's test
  pass are outside the timing). Each side's tokens are counted from the batches it actually drew
  (harness: the chunks its epoch_batches returned; Trainer: the indices its sampler yielded,
  cut into batches as its DataLoader does), so grouping cannot skew the count. Both draw whole
  epochs: every training example once per epoch, in ceil(n / batch) steps with one short batch
  (checked on every complete epoch seen, printed as "same examples per epoch"); over steps 2..N
  the counts differ only by which batches fall in step 1 and in the last, partial epoch.
- padding: the share of padding in the padded batches of steps 2..N (each batch padded to its
  longest example): how much length grouping saves, on each side.
- peak memory of training, read at the end of step N (evaluation and the test pass left out):
  CUDA: torch.cuda.max_memory_allocated minus what was allocated when the run began (weights,
  gradients, optimizer state, activations). CPU: each side once more in a fresh child process
  (this script, --memory-child; a process that trained before keeps freed memory, which would
  hide the next run's growth), which takes its resident set size after loading the data (and
  importing peft), resets the kernel's high-water mark (VmHWM, via /proc/self/clear_refs),
  trains, and reports the high-water mark minus that size (--no-memory skips these runs).
- MFU (CUDA): tokens/s * training FLOPs per token / the card's dense bf16 peak (measure.py:
  6N for full fine-tuning, 4N for LoRA and QLoRA, N = the parameters in matrix products, i.e. all
  but the embedding tables; tokens are the non-padding ones).
- eval loss: mean cross-entropy over validation examples (comparable, not identical: data order
  and dropout draws differ).

Each side runs --repeats times, alternately, after one short untimed warm-up each; the median
tokens/s is reported. --model gpt2-arch is GPT-2 small's shape with random weights; llama-arch
is a Llama-style model (RMSNorm, rotary positions, gated MLP 4x wide) of the same size (12
layers, 768 wide, 12 heads) with Llama 2's 32000-token vocabulary, random weights (needs
model.architecture=llama in the local backend). The tiny BPE tokenizer gets unused tokens up to
the vocabulary size so that the embedding (and its optimizer work) is full size.
transformers.Trainer needs the `accelerate` package; --adapter needs `peft`.

    python benchmarks/train_throughput.py                      # tiny GPT-2, CPU or CUDA
    python benchmarks/train_throughput.py --adapter lora       # LoRA vs full, and vs Trainer
    python benchmarks/train_throughput.py --model gpt2-arch --bf16 --steps 300 --json  # on CUDA
    python benchmarks/train_throughput.py --adapter lora --only harness_full,trainer_lora
    python benchmarks/train_throughput.py --steps 3 --repeats 1 --no-memory  # smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import transformers
from measure import HighWater, matmul_params, mfu, peak_tflops, train_flops_per_token
from throughput_loops import Run, Side, run_harness, run_trainer, whole_epochs, with_cuda_peak

from harness import config, data
from harness.backends.families import build_model
from harness.backends.local import LocalBackend

SHAPES = {  # --model: overrides of the model section, and the vocabulary to pad up to
    "tiny": ([], 0),
    "gpt2-arch": (
        ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.n_positions=1024"],
        50257,
    ),
    "llama-arch": (
        [
            "model.architecture=llama",
            "model.n_layer=12",
            "model.n_head=12",
            "model.n_embd=768",
            "model.n_positions=1024",
        ],
        32000,
    ),
}
WARMUP_STEPS = 5  # untimed first run of each side: one-time costs (allocator, kernels, imports)


SIDES = {
    "none": {
        "harness": Side("harness, grouped", "harness", "none"),
        "trainer": Side("Trainer, grouped", "trainer", "none"),
        "harness_ungrouped": Side("harness, not grouped", "harness", "none", grouped=False),
        "trainer_ungrouped": Side("Trainer, not grouped", "trainer", "none", grouped=False),
    },
    "lora": {
        "harness_full": Side("harness, full", "harness", "none"),
        "harness_lora": Side("harness, LoRA", "harness", "lora"),
        "trainer_lora": Side("Trainer, LoRA", "trainer", "lora"),
    },
    "qlora": {
        "harness_full": Side("harness, full", "harness", "none"),
        "harness_qlora": Side("harness, QLoRA", "harness", "qlora"),
    },
}
# (label, numerator, denominator, what): ratios of tokens/s ("speed") or peak memory ("memory")
RATIOS = {
    "none": [
        ("harness/Trainer, both grouped by length (headline)", "harness", "trainer", "speed"),
        ("harness/Trainer, neither grouped", "harness_ungrouped", "trainer_ungrouped", "speed"),
    ],
    "lora": [
        ("LoRA/full tokens/s (harness)", "harness_lora", "harness_full", "speed"),
        ("LoRA/full peak memory (harness)", "harness_lora", "harness_full", "memory"),
        ("harness/Trainer, LoRA, both grouped", "harness_lora", "trainer_lora", "speed"),
    ],
    "qlora": [
        ("QLoRA/full tokens/s (harness)", "harness_qlora", "harness_full", "speed"),
        ("QLoRA/full peak memory (harness)", "harness_qlora", "harness_full", "memory"),
    ],
}


@dataclasses.dataclass
class Setup:
    """What every side shares: the configs (one per adapter) and the prepared data."""

    configs: dict[str, Any]
    prepared: Any
    cuda: bool
    workers: int
    peak: Callable[[], int] | None = None  # reads peak memory at the end of the last step

    def train(self, side: Side, steps: int) -> Run:
        cfg = self.configs[side.adapter]
        if side.loop == "harness":
            cfg = config.with_params(cfg, {"train.group_by_length": side.grouped})
            return run_harness(cfg, self.prepared, steps, self.cuda, self.peak)
        return run_trainer(cfg, self.prepared, steps, self.cuda, self.peak, side, self.workers)


def make_setup(args: argparse.Namespace, cuda: bool) -> Setup:
    shape, vocab = SHAPES[args.model]
    adapters = {side.adapter for side in SIDES[args.adapter].values()}
    with tempfile.TemporaryDirectory() as runs_dir:
        base = [
            f"train.batch_size={args.batch_size}",
            f"train.max_length={args.max_length}",
            f"train.epochs={args.steps}",
            "train.patience=0",
            f"paths.runs_dir={runs_dir}",
            f"train.device={'cuda' if cuda else 'cpu'}",
            f"train.precision={'bf16' if args.bf16 else 'fp32'}",
            *shape,
        ]
        configs = {name: config.load_config([*base, f"adapter={name}"]) for name in adapters}
        cfg = configs["none"]
        prepared = LocalBackend().prepare(cfg, data.load_dataset(cfg.data))
    missing = vocab - len(prepared.tokenizer)  # build_model sizes the vocabulary by the tokenizer
    prepared.tokenizer.add_tokens([f"<|unused{i}|>" for i in range(max(0, missing))])
    peak = torch.cuda.max_memory_allocated if cuda else None
    return Setup(configs, prepared, cuda, args.trainer_workers, peak)


def check_model(setup: Setup, model_name: str) -> Any:
    """The full-precision model every side starts from; refuses a shape the backend ignored."""
    torch.manual_seed(0)
    model = build_model(setup.configs["none"], setup.prepared)
    wanted = "llama" if model_name == "llama-arch" else "gpt2"
    if model.config.model_type != wanted:
        sys.exit(
            f"--model {model_name}: the local backend built a {model.config.model_type} model, "
            f"not {wanted} (model.architecture={wanted} is not supported by this harness yet)"
        )
    return model


def memory_child(args: argparse.Namespace) -> None:
    """One side in this fresh process: prints its peak resident memory over the data's."""
    setup = make_setup(args, cuda=False)
    side = SIDES[args.adapter][args.memory_child]
    if side.adapter != "none":
        import peft  # noqa: F401  (imported before the baseline: its import is no run's memory)
    gc.collect()
    meter = HighWater()
    setup.peak = meter.peak
    before = meter.current()
    meter.reset()
    run = setup.train(side, args.steps)
    print(json.dumps({"peak_bytes": (run.peak_bytes or 0) - before, "exact": meter.exact}))


def cpu_peaks(names: list[str]) -> dict[str, int]:
    """Each side's peak resident memory, measured in its own fresh process (memory_child)."""
    peaks = {}
    for name in names:
        done = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--memory-child", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"memory run of {name} failed:\n{done.stderr[-3000:]}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        if not answer["exact"]:
            print(f"  note: {name}'s peak memory is its process's whole-life peak (no VmHWM reset)")
        peaks[name] = int(answer["peak_bytes"])
    return peaks


def check_adapters(sides: dict[str, Side], trainable: dict[str, int], params: int) -> None:
    """An adapter must train fewer weights than the model has (else the backend ignored it), and
    the Trainer's LoRA the same weights as harness's (else it is not the same work)."""
    for name, side in sides.items():
        if side.adapter != "none" and trainable[name] >= params:
            sys.exit(
                f"{name}: {trainable[name]} weights trained with adapter={side.adapter}, the "
                f"whole model's {params}: this local backend does not support "
                f"adapter={side.adapter} yet"
            )
    if "trainer_lora" in trainable and "harness_lora" in trainable:
        ours, theirs = trainable["harness_lora"], trainable["trainer_lora"]
        if ours != theirs:
            print(f"  WARNING: trainable weights differ (harness {ours}, Trainer {theirs})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=list(SHAPES),
        default="tiny",
        help="tiny: the default study's 2-layer GPT-2; gpt2-arch: GPT-2 small shape (12 "
        "layers, 768 wide, 50257 vocab); llama-arch: Llama-style, 12 layers, 768 wide, 32000 "
        "vocab; random weights",
    )
    parser.add_argument("--adapter", choices=list(SIDES), default="none")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on all (CUDA only)")
    parser.add_argument("--trainer-workers", type=int, default=0, help="Trainer data workers")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the memory runs")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--json", action="store_true", help="also print one JSON result line")
    parser.add_argument(
        "--only", type=lambda v: v.split(","), help="comma-separated sides to run (default: all)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.bf16 and not cuda:
        parser.error("--bf16 needs CUDA")
    if args.adapter == "qlora" and not cuda:
        parser.error("--adapter qlora needs CUDA (4-bit weights through bitsandbytes)")
    unknown = set(args.only or ()) - set(SIDES[args.adapter])
    if unknown:
        parser.error(f"--only: no side {sorted(unknown)} with --adapter {args.adapter}")
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    return args


def measure(
    args: argparse.Namespace, setup: Setup, sides: dict[str, Side], params: int
) -> dict[str, list[Run]]:
    """Each side once untimed (WARMUP_STEPS), then --repeats timed runs of all sides in turn."""

    def train(side: Side, steps: int) -> Run:
        if setup.cuda:
            return with_cuda_peak(lambda: setup.train(side, steps))
        return setup.train(side, steps)

    warm = {name: train(side, WARMUP_STEPS) for name, side in sides.items()}
    check_adapters(sides, {name: run.trainable for name, run in warm.items()}, params)
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side in sides.items():
            runs[name].append(train(side, args.steps))
    return runs


def summarize(
    runs: dict[str, list[Run]],
    sides: dict[str, Side],
    peaks: dict[str, int | None],
    n: int,
    flop_params: int,
    peak: float | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, side in sides.items():
        done = runs[name]
        tokens_per_s = statistics.median(r.tokens / r.seconds for r in done)
        complete, every_example = whole_epochs([e for r in done for e in r.epochs], n)
        flops = train_flops_per_token(flop_params, side.adapter)
        result[name] = {
            "label": side.label,
            "tokens_per_s": tokens_per_s,
            "seconds": [r.seconds for r in done],
            "timed_tokens": [r.tokens for r in done],
            "padding_fraction": statistics.median(1 - r.tokens / r.padded for r in done),
            "eval_loss": done[-1].eval_loss,
            "trainable_params": done[-1].trainable,
            "peak_memory_bytes": peaks[name],
            "mfu": mfu(tokens_per_s, flops, peak),
            "complete_epochs": complete,
            "each_epoch_every_example_once": every_example,
        }
    return result


def ratios_of(result: dict[str, Any], adapter: str) -> dict[str, float]:
    ratios = {}
    for label, top, bottom, what in RATIOS[adapter]:
        if top not in result or bottom not in result:
            continue  # a side left out with --only
        if what == "speed":
            ratios[label] = result[top]["tokens_per_s"] / result[bottom]["tokens_per_s"]
        elif (high := result[top]["peak_memory_bytes"]) and (
            low := result[bottom]["peak_memory_bytes"]
        ):
            ratios[label] = high / low
    return ratios


def print_table(sides: dict[str, Side], result: dict[str, Any], n: int) -> None:
    print(
        f"  {'side':<22} {'tokens/s':>9} {'timed tokens':>12} {'padding':>7} {'peak MiB':>9} "
        f"{'MFU':>6}  {'trainable':>10}  eval loss"
    )
    for name, side in sides.items():
        r = result[name]
        tokens = statistics.median(r["timed_tokens"])
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        util = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"  {side.label:<22} {r['tokens_per_s']:9.0f} {tokens:12.0f} "
            f"{r['padding_fraction']:7.1%} {mem:>9} {util:>6}  "
            f"{r['trainable_params']:>10}  {r['eval_loss']:.4f}"
        )
    same = all(result[name]["each_epoch_every_example_once"] for name in sides)
    epochs_seen = min(result[name]["complete_epochs"] for name in sides)
    print(
        f"  same examples per epoch: {'yes' if same else 'NO'} (each side's complete epochs, "
        f"at least {epochs_seen} each, hold each of the {n} training examples once)"
    )


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()
    if args.memory_child:
        memory_child(args)
        return
    if args.adapter == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        print(f"{args.model} qlora: skipped: bitsandbytes not installed")
        if args.json:
            print(
                json.dumps(
                    {
                        "model": args.model,
                        "adapter": "qlora",
                        "skipped": "bitsandbytes not installed",
                    }
                )
            )
        return
    cuda = torch.cuda.is_available()
    setup = make_setup(args, cuda)
    model = check_model(setup, args.model)
    params, flop_params = sum(p.numel() for p in model.parameters()), matmul_params(model)
    del model
    sides = {k: v for k, v in SIDES[args.adapter].items() if not args.only or k in args.only}
    runs = measure(args, setup, sides, params)
    peaks: dict[str, int | None]
    if cuda:
        peaks = {name: max(r.peak_bytes or 0 for r in done) for name, done in runs.items()}
    elif args.no_memory:
        peaks = dict.fromkeys(sides)
    else:
        peaks = dict(cpu_peaks(list(sides)))
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (peak_tflops(device) if cuda else None)
    n = len(setup.prepared.train)
    result = summarize(runs, sides, peaks, n, flop_params, peak)
    ratios = ratios_of(result, args.adapter)

    m = setup.configs["none"].model
    precision = "bf16 autocast" if args.bf16 else "fp32"
    memory_how = "CUDA max allocated" if cuda else "peak RSS over the data's, fresh process"
    print(
        f"device {device}, {precision}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"model {args.model} ({m.architecture}): n_layer {m.n_layer}, n_embd {m.n_embd}, "
        f"n_head {m.n_head}, vocab {len(setup.prepared.tokenizer)}, {params / 1e6:.2f}M params "
        f"({flop_params / 1e6:.2f}M in matrix products)"
    )
    print(
        f"{args.steps} steps (timed: 2..{args.steps}), batch {args.batch_size}, max_length "
        f"{args.max_length}, {n} train examples, median of {args.repeats}; peak memory: "
        f"{memory_how}, until the last step"
    )
    print_table(sides, result, n)
    if cuda and peak is None:
        print("  MFU: unknown card, pass --peak-tflops (its dense bf16 peak)")
    for label, value in ratios.items():
        goal = "  (goal >= 1.1x)" if "headline" in label else ""
        print(f"  {label}: {value:.2f}x{goal}")
    if args.json:
        summary = {"device": device, "bf16": args.bf16, "model": args.model, "params": params}
        summary |= {"adapter": args.adapter, "matmul_params": flop_params, "peak_tflops": peak}
        summary |= {"architecture": m.architecture, "n_layer": m.n_layer, "n_embd": m.n_embd}
        summary |= {"vocab": len(setup.prepared.tokenizer), "steps": args.steps}
        summary |= {"batch_size": args.batch_size, "max_length": args.max_length}
        summary |= {"repeats": args.repeats, "trainer_workers": args.trainer_workers}
        summary |= {"memory": memory_how, "ratios": ratios, "sides": result}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
