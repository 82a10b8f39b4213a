"""Local fine-tuning of a causal LM: transformers models, one readable torch training loop.

The model (any family from_pretrained loads, or a tiny one from scratch) comes from families.py,
with a classification head or prompt tokens masked out of a generation loss; adapters.py puts
LoRA/QLoRA on it. The loop: AdamW (no decay on biases and norms), linear warmup then linear
decay, gradient clipping, dynamic padding, micro-batches accumulated to the batch
(accumulation.py), evaluation every epoch (or every N steps) with the trial's state saved for a
retry (trial_state.py), early stopping with patience, the best evaluation's weights kept for the
test split. CPU, CUDA (bf16 autocast, or fp16 with loss scaling: devices.py) or MPS.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness import metrics as task_metrics
from harness.backends import trial_state
from harness.backends.accumulation import GradientAccumulation
from harness.backends.adapters import (
    apply_adapter,
    check_adapter_config,
    save_adapted,
    tunable_adapter_keys,
)
from harness.backends.base import (
    Backend,
    Limit,
    Reporter,
    TrialResult,
    TrialSpec,
    check_training_method,
)
from harness.backends.batching import batches, epoch_batches, example_lengths
from harness.backends.devices import (
    apply_memory_options,
    check_precision,
    pick_device,
    precision_for,
    run_releasing_memory,
)
from harness.backends.families import (
    ARCHITECTURE_KEYS,
    build_model,
    check_family_knobs,
    freeze,
    max_positions,
)
from harness.backends.generation import Decoding, complete, text_metrics_at_evaluations
from harness.config import runs_dir
from harness.data import Dataset, ExampleCheck
from harness.tokenization import EncodedSplit, TokenizedData, encode
from harness.tracking.protocol import ModelDestination


def make_optimizer(model: Any, train: DictConfig) -> Any:
    import torch

    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "ln_" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(train.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is several times faster than the per-parameter loop.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=float(train.learning_rate), fused=fused)


def warmup_then_linear_decay(optimizer: Any, total_steps: int, warmup_ratio: float) -> Any:
    import torch

    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LocalBackend:
    name = "LocalBackend"

    def tunable_keys(self, cfg: DictConfig) -> frozenset[str]:
        """Every training knob, and the architecture of a model built from scratch. A pretrained
        checkpoint brings its own shape, and the tokenizer and checkpoint are prepared once per
        study, so model.name_or_path and model.vocab_size never vary per trial."""
        keys = {"train.*"}
        if not cfg.model.name_or_path:
            keys |= ARCHITECTURE_KEYS
        keys |= tunable_adapter_keys(cfg)  # lora.* with adapter=lora or qlora
        return frozenset(keys)

    def hard_limits(self) -> dict[str, Limit]:
        return {}  # harness's own valid ranges are this backend's

    def eval_metrics(self, task: str) -> tuple[str, ...]:
        return task_metrics.EVAL_METRICS.get(task, ())

    def eval_metrics_on_demand(self, task: str) -> tuple[str, ...]:
        return task_metrics.GENERATED_TEXT_METRICS.get(task, ())

    def check_config(self, cfg: DictConfig, searched: frozenset[str]) -> None:
        check_training_method(cfg, self.name, ("sft",))
        check_family_knobs(cfg, searched)
        check_adapter_config(cfg, searched)
        check_precision(cfg, searched)

    def example_check(self, cfg: DictConfig) -> ExampleCheck | None:
        return None  # any example fits: train.max_length truncates the long ones

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> TokenizedData:
        return encode(cfg, dataset, runs_dir(cfg) / "cache")

    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        # memory released whatever happens; out of memory: this trial fails with a hint; the
        # saved state deleted when the trial ends (only a dead process leaves it)
        with trial_state.deleted_at_the_end(spec.workdir):
            return run_releasing_memory(spec.config.train, lambda: _Training(spec, reporter))

    def log_model(
        self,
        destination: ModelDestination,
        model_dir: Path,
        task: str,
        registered_name: str | None,
    ) -> str:
        """A model this backend saved, logged as an MLflow transformers model (a ModelLogger)."""
        from harness.backends.transformers_model import log_transformers_model

        return log_transformers_model(destination, model_dir, task, registered_name)


class _Training:
    """One trial's state; released at the end so a long sweep does not grow."""

    def __init__(self, spec: TrialSpec, reporter: Reporter) -> None:
        import torch

        self.spec, self.reporter = spec, reporter
        self.cfg, self.train_cfg = spec.config, spec.config.train
        self.data: TokenizedData = spec.prepared
        self.device = pick_device(self.train_cfg.device)
        self.precision = precision_for(self.train_cfg.precision, self.device)
        torch.manual_seed(self.cfg.seed)
        self.model: Any = build_model(self.cfg, self.data).to(self.device)
        positions = max_positions(self.model)
        if self.train_cfg.max_length > positions:
            raise ValueError(
                f"train.max_length={self.train_cfg.max_length} exceeds the model's "
                f"{positions} positions"
            )
        if self.data.task == "generation" and self.train_cfg.max_new_tokens >= positions:
            raise ValueError(
                f"train.max_new_tokens={self.train_cfg.max_new_tokens} leaves no room for a "
                f"prompt in the model's {positions} positions"
            )
        freeze(self.model, self.train_cfg.trainable_blocks)
        self.model = apply_adapter(self.model, self.cfg, self.data.task)  # before the optimizer
        apply_memory_options(self.model, self.train_cfg)  # checkpointing, compile
        self.optimizer: Any = make_optimizer(self.model, self.train_cfg)
        self.accumulation = GradientAccumulation(self.train_cfg, self.data.task, self.precision)
        self.order = torch.Generator().manual_seed(self.cfg.seed)

    def release(self) -> None:
        self.model = self.optimizer = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def autocast(self) -> Any:
        return self.precision.autocast()

    def micro_batch_size(self) -> int:
        return self.accumulation.size

    def eval_batch_size(self) -> int:
        """Examples per forward pass without gradients (evaluation, generation): at least 32,
        but no more than the micro-batch when it is smaller than the batch (set small, or
        halved, for memory: the logits of a wide batch would not fit either)."""
        micro, batch = self.accumulation.size, int(self.train_cfg.batch_size)
        return micro if micro < batch else max(batch, 32)

    def run(self) -> TrialResult:
        t = self.train_cfg
        steps_per_epoch = math.ceil(len(self.data.train) / t.batch_size)
        total = steps_per_epoch * t.epochs
        if t.max_steps > 0:
            total = min(total, t.max_steps)
        scheduler = warmup_then_linear_decay(self.optimizer, total, t.warmup_ratio)
        self.reporter.set_total_steps(total)
        eval_every = t.eval_every_steps or steps_per_epoch
        best = _Best(1.0 if self.spec.direction == "maximize" else -1.0)
        losses: list[Any] = []
        parts = {"optimizer": self.optimizer, "scheduler": scheduler}
        if self.precision.scaler is not None:  # fp16: the loss scale it has learned
            parts["scaler"] = self.precision.scaler
        saved = trial_state.TrialState(self.spec, self.model, parts, self.order, self.device)
        step = saved.resume(best, losses, self.reporter)
        lengths = example_lengths(self.data.train, t.max_length)
        self.model.train()
        while step < total and best.stale < (t.patience or math.inf):
            done = saved.start_epoch(step)  # batches of this epoch trained before a resume
            chunks = epoch_batches(lengths, t.batch_size, self.order, t.group_by_length)[done:]
            for batch in batches(
                self.data.train, chunks, t.max_length, self.data.pad_id, self.data.task, self.device
            ):
                # Kept on the device and read in bulk: a .item() per step would make the host
                # wait for the accelerator at every step.
                losses.append(self.train_step(batch, scheduler))
                step += 1
                if len(losses) == 32:
                    self.report_losses(step, losses)
                if step % eval_every == 0 or step == total:
                    self.report_losses(step, losses)
                    self.evaluate_and_keep(step, best)
                    saved.save(step, best, losses)
                if step >= total or (t.patience and best.stale >= t.patience):
                    break
        if best.state is not None:
            trial_state.load_trainable(self.model, best.state)
        test, artifacts = self.test()
        model_dir = self.save() if self.spec.save_model else None
        return TrialResult({**best.metrics, **test}, artifacts, model_dir, step)

    def train_step(self, batch: dict[str, Any], scheduler: Any) -> Any:
        """One optimizer step on a batch (accumulated over micro-batches); returns its loss,
        still on the device."""
        loss = self.accumulation.backward(self.model, batch)
        self.precision.step(self.optimizer, self.model.parameters(), self.train_cfg.grad_clip)
        scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def evaluate_and_keep(self, step: int, best: _Best) -> None:
        """Evaluates on the validation split, keeps the weights if they are the best yet, and
        reports the evaluation (which may raise TrialPruned: the trial stops there)."""
        evaluated, _ = self.evaluate(self.data.validation, "eval")
        best.offer(evaluated, self.spec.metric, self.model)
        self.reporter.report(step, evaluated)
        self.model.train()

    def report_losses(self, step: int, losses: list[Any]) -> None:
        """Reports the buffered per-step training losses (the last one at ``step``); empties
        the buffer."""
        import torch

        if not losses:
            return
        values = torch.stack(losses).float().tolist()
        first = step - len(values) + 1
        for offset, value in enumerate(values):
            self.reporter.report(first + offset, {"train/loss": value})
        losses.clear()

    def evaluate(self, split: EncodedSplit, prefix: str) -> tuple[dict[str, float], list[str]]:
        """Loss and task metrics on a split; the loss is the mean over examples (classification)
        or over completion tokens (generation). Generation: also the generated-text metrics,
        on the test split always, at evaluations when the study optimizes one of them. Also
        returns the predicted labels of a classification split, in split order (empty for
        generation)."""
        t = self.train_cfg
        self.model.eval()
        # sorted by length: batches of similar length pad little; results do not depend on order
        lengths = example_lengths(split, t.max_length)
        order = sorted(range(len(split)), key=lambda i: lengths[i])
        size = self.eval_batch_size()
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        total_loss, weight, correct, predictions = self.forward_split(split, chunks)
        loss = total_loss / max(weight, 1)
        result = {f"{prefix}/loss": loss}
        guessed: list[str] = []
        if self.data.task == "classification":
            names = self.data.labels
            guessed = [names[i] for i in predictions]
            truth = [names[i] for i in split.targets]
            scores = task_metrics.classification_metrics(truth, guessed, names)
        else:
            scores = {
                "perplexity": task_metrics.perplexity(loss),
                "token_accuracy": correct / max(weight, 1),
            }
            if prefix == "test" or text_metrics_at_evaluations(self.spec):
                completions = self.generate(split, sampled=prefix == "test")
                references = [e.target for e in split.examples]
                scores |= task_metrics.generation_metrics(completions, references)
        return result | {f"{prefix}/{k}": v for k, v in scores.items()}, guessed

    def forward_split(
        self, split: EncodedSplit, chunks: list[list[int]]
    ) -> tuple[float, int, int, list[int]]:
        """The split through the model without gradients, one batch per chunk: the summed loss,
        its weight (examples, or completion tokens), correct completion tokens (generation) and
        the predicted label index of each example (classification)."""
        import torch

        t = self.train_cfg
        total_loss, weight, correct, predictions = 0.0, 0, 0, [0] * len(split)
        padded = batches(split, chunks, t.max_length, self.data.pad_id, self.data.task, self.device)
        with torch.no_grad(), self.autocast():
            for chunk, batch in zip(chunks, padded, strict=True):
                output = self.model(**batch)
                if self.data.task == "classification":
                    n = len(batch["labels"])
                    total_loss += output.loss.item() * n
                    weight += n
                    for index, guess in zip(chunk, output.logits.argmax(-1).tolist(), strict=True):
                        predictions[index] = guess
                else:
                    labels = batch["labels"][:, 1:]
                    mask = labels != -100
                    guesses = output.logits[:, :-1].argmax(-1)
                    n = int(mask.sum())
                    total_loss += output.loss.item() * n
                    weight += n
                    correct += int((guesses[mask] == labels[mask]).sum())
        return total_loss, weight, correct, predictions

    def generate(self, split: EncodedSplit, sampled: bool) -> list[str]:
        """The completion of each prompt, up to max_new_tokens or EOS: greedy, or, where
        ``sampled`` (the test split's outputs), as train.temperature and train.top_p say."""
        t = self.train_cfg
        temperature = t.temperature if sampled else 0.0  # evaluations: a steady objective
        decoding = Decoding(t.max_new_tokens, temperature, t.top_p, self.cfg.seed)
        limit = max_positions(self.model) - t.max_new_tokens
        with self.autocast():
            return complete(
                self.model,
                self.data.tokenizer,
                split.inputs,
                decoding,
                max_prompt_tokens=min(limit, t.max_length),
                batch_size=self.eval_batch_size(),
            )

    def test(self) -> tuple[dict[str, float], list[Path]]:
        result, guessed = self.evaluate(self.data.test, "test")
        artifacts: list[Path] = []
        if self.data.task == "classification":
            truth = [self.data.labels[i] for i in self.data.test.targets]
            path = self.spec.workdir / "confusion_matrix_test.png"
            artifacts.append(
                task_metrics.save_confusion_matrix(
                    truth, guessed, self.data.labels, path, "test split"
                )
            )
        return result, artifacts

    def save(self) -> Path:
        directory = self.spec.workdir / "model"
        save_adapted(self.model, self.data.tokenizer, directory, self.cfg)  # or the adapter
        return directory


@dataclass
class _Best:
    """The best evaluation of a trial so far by its metric (``sign`` 1: higher is better, -1:
    lower), the weights that made it, and the evaluations since without improvement."""

    sign: float
    score: float = -math.inf
    metrics: dict[str, float] = field(default_factory=dict)
    state: Any = None  # trainable parameters and buffers only, on the CPU
    stale: int = 0
    latest: dict[str, float] = field(default_factory=dict)  # the last evaluation offered

    def offer(self, evaluated: dict[str, float], metric: str, model: Any) -> None:
        self.latest = evaluated
        score = self.sign * evaluated[metric]
        if score > self.score:
            self.score, self.metrics, self.stale = score, evaluated, 0
            self.state = trial_state.cpu_copy(trial_state.trainable_state(model))
        else:
            self.stale += 1


_: Backend = LocalBackend()
