"""PEFT adapters on the local backend's model: LoRA (adapter=lora) and QLoRA (adapter=qlora: LoRA
on a base loaded in 4 bits through bitsandbytes, CUDA only), set by the ``lora`` section.

The adapter goes on after the model is built and before the optimizer is made, so only its
weights (and a classification head) reach AdamW. What a trial saves is the adapter (with its
base named in adapter_config.json), or base and adapter merged into one model on request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.backends.families import FAMILIES, model_type_of
from harness.config import ConfigError

ADAPTERS = ("none", "lora", "qlora")
TARGET_SETS = ("all_linear", "attention")

# lora.target_modules=attention: the family table's attention projections (families.py);
# all_linear needs no table: PEFT's "all-linear" finds every linear layer but the output head.
# The trainable head a classification model adds (every family above names it `score`): new
# weights, trained in full beside the adapter and saved with it.
CLASSIFICATION_HEAD = ["score"]

# The folder, inside a saved adapter, of the model config the trial trained (the base's, with the
# task's labels and pad id, which the base checkpoint lacks): the base is loaded with it before
# the adapter goes on (load_adapted). Not a config.json beside the adapter: transformers would
# take the folder for a whole model and look for its weights there.
TASK_CONFIG_DIR = "task_config"


def uses_adapter(cfg: DictConfig) -> bool:
    return str(cfg.adapter.name) != "none"


def tunable_adapter_keys(cfg: DictConfig) -> frozenset[str]:
    """The lora.* keys, tunable only when an adapter reads them."""
    return frozenset({"lora.*"}) if uses_adapter(cfg) else frozenset()


def check_adapter_config(cfg: DictConfig, searched: frozenset[str]) -> None:
    """Before any trial: the adapter's settings, and whether this machine can run it."""
    name = str(cfg.adapter.name)
    if name not in ADAPTERS:
        raise ConfigError(
            f"adapter.name={name} is not an adapter: use one of {', '.join(ADAPTERS)}"
        )
    if name == "none":
        return
    if "train.trainable_blocks" in searched or cfg.train.trainable_blocks != -1:
        raise ConfigError(
            f"train.trainable_blocks does not apply with adapter={name}: the adapter trains its "
            "own weights on a frozen base. Remove train.trainable_blocks from the search space "
            "(search=lora_classification or lora_generation: LoRA's spaces) and leave it at -1, "
            "or use adapter=none (full fine-tuning)"
        )
    _check_target_modules(cfg, searched)
    if name == "qlora":
        check_qlora_possible(cfg)


def _check_target_modules(cfg: DictConfig, searched: frozenset[str]) -> None:
    from harness.search import searched_choices

    key = "lora.target_modules"
    values = [str(v) for v in searched_choices(cfg, key, searched)]  # the sets trials can pick
    for value in values:
        if value not in TARGET_SETS:
            raise ConfigError(
                f"{key}={value} is not a target set: use one of {', '.join(TARGET_SETS)}"
            )
    if "attention" in values:  # raises for a family without a named attention set
        attention_targets(model_type_of(cfg))


def attention_targets(model_type: str) -> list[str]:
    try:
        return list(FAMILIES[model_type].attention)
    except KeyError:
        raise ConfigError(
            f"lora.target_modules=attention has no named set for model_type {model_type!r} "
            f"(known: {', '.join(sorted(FAMILIES))}); use lora.target_modules="
            "all_linear, which works for any model"
        ) from None


def check_qlora_possible(cfg: DictConfig) -> None:
    """QLoRA needs a pretrained checkpoint (there is nothing to quantize in a model built from
    scratch), CUDA and bitsandbytes: anything else is refused before any trial."""
    import importlib.util

    fix = "use adapter=lora, or run on a CUDA machine with `pip install 'harness[qlora]'`"
    reason = None
    if str(cfg.train.device) not in ("auto", "cuda"):
        reason = f"it runs on CUDA only, and train.device={cfg.train.device}"
    elif not _cuda_available():
        reason = "it needs a CUDA GPU, and this machine has none"
    elif importlib.util.find_spec("bitsandbytes") is None:
        reason = "it needs bitsandbytes, which is not installed"
    elif not cfg.model.name_or_path:
        reason = "it quantizes a pretrained model, and model.name_or_path is null"
        fix = "set model.name_or_path to a checkpoint, or use adapter=lora"
    if reason:
        raise ConfigError(f"adapter=qlora (a 4-bit base through bitsandbytes): {reason}; {fix}")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def quantization_options(cfg: DictConfig) -> dict[str, Any]:
    """What from_pretrained takes to load the base of a QLoRA trial in 4 bits (NF4, double
    quantization, bf16 compute as in the QLoRA paper, fp16 where the card lacks bf16); nothing
    for other adapters."""
    if str(cfg.adapter.name) != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    # Left to transformers: the output layer (lm_head, or a classifier's `score`) stays
    # unquantized, and the model goes to the current CUDA device (device_map {"": device}).
    # computes in the trial's precision: bf16, or fp16 on cards without it (devices.py)
    bf16 = cfg.train.precision != "fp16" and torch.cuda.is_bf16_supported(including_emulation=False)
    compute = torch.bfloat16 if bf16 else torch.float16
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        ),
        "dtype": compute,  # the layers left unquantized (norms; prepare_model_for_kbit_training
        # then casts them to fp32)
    }


def lora_config(cfg: DictConfig, model_type: str, task: str) -> Any:
    """PEFT's LoraConfig for the ``lora`` section on a ``model_type`` model doing ``task``."""
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    if lora.target_modules not in TARGET_SETS:  # checked before the trial; a hand-made config
        raise ConfigError(f"lora.target_modules={lora.target_modules} is not a target set")
    targets: str | list[str] = (
        "all-linear" if lora.target_modules == "all_linear" else attention_targets(model_type)
    )
    classification = task == "classification"
    return LoraConfig(
        r=int(lora.r),
        # PEFT annotates an int, but only ever divides it (alpha / r): a float alpha is fine
        lora_alpha=float(lora.alpha),  # type: ignore[arg-type]
        use_rslora=bool(lora.rslora),
        lora_dropout=float(lora.dropout),
        use_dora=bool(lora.dora),
        target_modules=targets,
        fan_in_fan_out=model_type in FAMILIES and FAMILIES[model_type].conv1d,
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
        modules_to_save=CLASSIFICATION_HEAD if classification else None,
    )


def apply_adapter(model: Any, cfg: DictConfig, task: str) -> Any:
    """The model with the configured adapter on it (a PeftModel: only the adapter and a
    classification head trainable), or the model itself with adapter=none."""
    if not uses_adapter(cfg):
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.adapter.name == "qlora":
        # freezes the 4-bit base and casts its norms to fp32 for stable training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(cfg.train.gradient_checkpointing)
        )
    return get_peft_model(model, lora_config(cfg, model.config.model_type, task))


def save_adapted(model: Any, tokenizer: Any, directory: Path, cfg: DictConfig) -> None:
    """Saves what a trial trained, with the tokenizer: the adapter alone (adapter_config.json,
    which names the base, the adapter's weights, and the model config with the task's labels in
    task_config/), or base and adapter merged into one transformers model (adapter.merge=true).

    A model built from scratch (model.name_or_path null) is always saved merged: its random
    base exists nowhere on disk, so an adapter alone could never be loaded again."""
    if uses_adapter(cfg) and (cfg.adapter.merge or not cfg.model.name_or_path):
        model = model.merge_and_unload()  # the trial is over: merging in place is fine
    model.save_pretrained(directory)
    if uses_adapter(cfg) and is_adapter_dir(directory):
        model.config.save_pretrained(directory / TASK_CONFIG_DIR)
    tokenizer.save_pretrained(directory)


def is_adapter_dir(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def adapter_base(directory: Path) -> str:
    """The base model an adapter saved in ``directory`` was trained on (a Hub id or a path)."""
    config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config["base_model_name_or_path"])


def load_adapted(directory: Path, task: str) -> Any:
    """A PeftModel from an adapter ``directory`` saved by a trial: its base loaded from where
    adapter_config.json says, with the trial's model config (the head's labels), then the
    adapter (and head) weights on it."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    config = AutoConfig.from_pretrained(directory / TASK_CONFIG_DIR)
    base = auto.from_pretrained(adapter_base(directory), config=config)
    return PeftModel.from_pretrained(base, directory)
