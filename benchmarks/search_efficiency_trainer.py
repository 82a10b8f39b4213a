"""The anchor of benchmarks/search_efficiency.py: transformers.Trainer.hyperparameter_search
(backend="optuna") on the same task, space and step budget as harness's studies.

The same: the tokenized data (harness's LocalBackend.prepare), the model (harness's
build_model and freeze, seeded as harness seeds it), the search space (the very distributions
and parameter names, sampled by harness.search.suggest inside the Trainer's hp_space, so its TPE
sees the space harness's does; model_init, which Trainer.train calls before hp_space, samples
them first and builds the model with the trial's dropout and trainable_blocks), the fixed
training settings (max_length, gradient clipping, linear warmup then decay, fused AdamW
with no decay on biases and norms, length grouping, seed), evaluation each
epoch, early stopping with harness's patience, the best evaluation's weights loaded at the end
(load_best_model_at_end) and scored on the test split, and the metric (harness.metrics' macro
F1 through compute_metrics).

The sampler is TPESampler with the benchmark seed and the config's n_startup_trials, passed in
hyperparameter_search's kwargs (they go to optuna.create_study). Budget: trials run one after
another until their optimizer steps add up to the budget (a callback stops the study at the end
of the trial that crosses it, as harness's studies stop).

What cannot be made equal, by the Trainer's design:
- its objective is its LAST evaluation (Trainer._report_to_hp_search sets it at each
  evaluation), not the trial's best: its sampler learns from that value. The curves and the
  target use each trial's best evaluation for every method (what load_best_model_at_end keeps);
  the Trainer's own objective is kept as trainer_objective, and its chosen trial is the one its
  study calls best.
- it reports the objective with the global optimizer step as Optuna's step, so a pruner's
  resource is steps, not evaluations, and trials of different batch sizes are compared at
  different steps. Its pruner is Optuna's MedianPruner (the classic pairing Trainer users pass)
  with the config's pruner.n_startup_trials, and no pruning before the step at which the
  smallest batch size of the space ends epoch pruner.n_warmup_steps - 1 (auto: the shortest
  trial's evaluations, harness/pruning.py), so no trial is pruned at an evaluation numbered
  below n_warmup_steps, as harness's median pruner does.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution
from search_efficiency_stats import Outcome
from throughput_loops import examples, grouping_args
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from harness import search
from harness.backends.batching import batches
from harness.backends.families import build_model, freeze
from harness.config import with_params
from harness.metrics import classification_metrics

# harness's keys -> TrainingArguments' (warmup_steps below 1 is a ratio of the total steps)
TRAINING_ARGUMENTS = {
    "train.learning_rate": "learning_rate",
    "train.batch_size": "per_device_train_batch_size",
    "train.epochs": "num_train_epochs",
    "train.weight_decay": "weight_decay",
    "train.warmup_ratio": "warmup_steps",
}
MODEL_KEYS = ("train.dropout", "train.trainable_blocks")  # read by model_init from the trial


class Ledger(TrainerCallback):
    """Records each trial's steps, best evaluation and test score (on the weights the Trainer
    keeps), and stops the study once the steps reach the budget."""

    def __init__(self, prepared: Any, cfg: Any, budget: int, metric: str) -> None:
        self.prepared, self.cfg, self.budget, self.metric = prepared, cfg, budget, metric
        self.trial: Any = None  # the Optuna trial hp_space saw last
        self.rows: dict[int, dict[str, Any]] = {}
        self.best: float | None = None
        self.spent = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.best = None

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        value = float(kwargs["metrics"][f"eval_{self.metric}"])
        self.best = value if self.best is None else max(self.best, value)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # called once per trial: at its end, or just before a pruned trial raises
        if self.trial is None or self.trial.number in self.rows:
            return
        test = test_score(kwargs["model"], self.prepared, self.cfg, self.metric)
        self.rows[self.trial.number] = {"steps": state.global_step, "best": self.best, "test": test}
        self.spent += state.global_step
        if self.spent >= self.budget:
            self.trial.study.stop()  # ends the study after this trial, as harness's do


def test_score(model: Any, prepared: Any, cfg: Any, metric: str) -> float:
    """The model's ``metric`` on the test split, by harness's batching and metrics."""
    split, t = prepared.test, cfg.train
    chunks = [list(range(i, min(i + 64, len(split)))) for i in range(0, len(split), 64)]
    device = next(model.parameters()).device
    guessed: list[int] = []
    model.eval()
    with torch.no_grad():
        for batch in batches(
            split, chunks, t.max_length, prepared.pad_id, "classification", device
        ):
            guessed += model(**batch).logits.argmax(-1).tolist()
    names = prepared.labels
    truth = [names[i] for i in split.targets]
    return float(classification_metrics(truth, [names[i] for i in guessed], names)[metric])


def first_evaluation_step(rows: int, distributions: dict[str, BaseDistribution], cfg: Any) -> int:
    """The most optimizer steps one epoch takes at any batch size of the space."""
    sizes = (
        search.extremes(distributions["train.batch_size"])
        if ("train.batch_size" in distributions)
        else [cfg.train.batch_size]
    )
    return max(math.ceil(rows / size) for size in sizes)


def trainer_arguments(cfg: Any, workdir: str) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=workdir,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(t.batch_size, 32),
        num_train_epochs=float(t.epochs),
        weight_decay=t.weight_decay,
        warmup_steps=float(t.warmup_ratio),  # a float: hp_space's values are cast to its type
        lr_scheduler_type="linear",
        max_grad_norm=t.grad_clip,
        optim="adamw_torch_fused",
        **grouping_args(bool(t.group_by_length)),
        eval_strategy="epoch",
        save_strategy="epoch",
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=str(cfg.sweep.metric).removeprefix("eval/"),
        greater_is_better=cfg.sweep.direction == "maximize",
        logging_strategy="no",
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=cfg.seed,
        label_names=["labels"],
    )


def run_anchor(plan: Any, prepared: Any, seed: int, budget: int) -> Outcome:
    """One seed of Trainer.hyperparameter_search at the budget; its trials as an Outcome."""
    cfg, distributions = plan.cfg, plan.distributions
    metric = str(cfg.sweep.metric).removeprefix("eval/")
    ledger = Ledger(prepared, cfg, budget, metric)

    def hp_space(trial: optuna.Trial) -> dict[str, Any]:
        ledger.trial = trial
        params = search.suggest(trial, distributions)
        return {TRAINING_ARGUMENTS[k]: v for k, v in params.items() if k in TRAINING_ARGUMENTS}

    def model_init(trial: Any) -> Any:
        # Trainer.train calls model_init BEFORE hp_space (transformers 5.24): the trial has no
        # params yet, so sample them here; hp_space's suggest calls then return the same values
        params = search.suggest(trial, distributions) if trial is not None else {}
        chosen = {k: v for k, v in params.items() if k in MODEL_KEYS}
        trial_cfg = with_params(cfg, chosen)
        torch.manual_seed(cfg.seed)  # as harness does before build_model: the same init
        model = build_model(trial_cfg, prepared)
        freeze(model, trial_cfg.train.trainable_blocks)
        return model

    def compute_metrics(prediction: Any) -> dict[str, float]:
        names = prepared.labels
        guessed = [names[i] for i in prediction.predictions.argmax(-1).tolist()]
        truth = [names[i] for i in prediction.label_ids.tolist()]
        return classification_metrics(truth, guessed, names)

    unknown = set(distributions) - set(TRAINING_ARGUMENTS) - set(MODEL_KEYS)
    if unknown:
        raise SystemExit(f"the Trainer anchor cannot search {sorted(unknown)}")
    t = cfg.train
    warmup = cfg.pruner.n_warmup_steps  # evaluations; auto: the shortest trial's (pruning.py)
    warmup = plan.evaluations.least if warmup == "auto" else int(warmup)
    epoch = first_evaluation_step(len(prepared.train), distributions, cfg)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=int(cfg.pruner.n_startup_trials),
        n_warmup_steps=(warmup - 1) * epoch + 1 if warmup > 0 else 0,
    )
    storage = optuna.storages.InMemoryStorage()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(
            model_init=model_init,
            args=trainer_arguments(cfg, workdir),
            data_collator=DataCollatorWithPadding(prepared.tokenizer),
            train_dataset=examples(prepared.train, t.max_length, prepared.pad_id),
            eval_dataset=examples(prepared.validation, t.max_length, prepared.pad_id),
            processing_class=prepared.tokenizer,
            compute_metrics=compute_metrics,
            callbacks=[ledger, *([EarlyStoppingCallback(t.patience)] if t.patience else [])],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.hyperparameter_search(
            hp_space=hp_space,
            compute_objective=lambda metrics: float(metrics[f"eval_{metric}"]),
            n_trials=1_000_000,  # the ledger stops the study at the budget
            direction=str(cfg.sweep.direction),
            backend="optuna",
            sampler=optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=int(cfg.sampler.n_startup_trials)
            ),
            pruner=pruner,
            storage=storage,
            study_name=f"trainer-seed{seed}",
        )
    return ledger_outcome(
        ledger, optuna.load_study(study_name=f"trainer-seed{seed}", storage=storage)
    )


def ledger_outcome(ledger: Ledger, study: optuna.Study) -> Outcome:
    outcome = Outcome()
    complete = optuna.trial.TrialState.COMPLETE
    for trial in study.trials:
        row = ledger.rows[trial.number]
        finished = trial.state == complete
        outcome.add(
            row["steps"],
            row["best"] if finished else None,
            row["test"] if finished else None,
            {**trial.params, "trainer_objective": trial.value},
        )
    outcome.chosen = study.best_trial.number  # what hyperparameter_search returns
    return outcome
