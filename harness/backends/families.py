"""The models the local backend trains: built from scratch or loaded with from_pretrained, and
the per-family knowledge the loop needs, in one table (``FAMILIES``, keyed by the ``model_type``
of the checkpoint's config): where the transformer blocks and the final norm live, which config
settings are dropout, and which holds the number of positions.

A checkpoint of a family outside the table still trains (full fine-tuning, its own dropout): only
the knobs that need the table (train.dropout, train.trainable_blocks) are refused for it, before
any trial (``check_family_knobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, ConfigError
from harness.tokenization import TokenizedData

# The keys that shape a model built from scratch (model.name_or_path unset)
ARCHITECTURE_KEYS = frozenset({"model.n_layer", "model.n_head", "model.n_embd"})

# The architectures model.architecture can build from scratch (model.name_or_path null)
SCRATCH_ARCHITECTURES = ("gpt2", "llama")

# A Llama built from scratch: its MLP's hidden size is this multiple of n_embd (GPT-2's is 4x;
# Llama's gated MLP has three matrices, so 4x gives it ~1.5x GPT-2's MLP weights: tiny either way)
LLAMA_MLP_MULTIPLE = 4

# The knobs that need the table: searched or set to other than conf/config.yaml's value, they
# are refused for a family outside it
FAMILY_KNOBS = ("train.dropout", "train.trainable_blocks")


@dataclass(frozen=True)
class Family:
    """How one model family names its parts (dotted paths from the model with a head)."""

    base: str  # the body below the head: embeddings, blocks, final norm
    blocks: str  # the list of transformer blocks
    final_norm: str
    dropout: tuple[str, ...]  # the config settings train.dropout sets, all to the same value
    positions: str  # the config setting holding the maximum sequence length
    # lora.target_modules=attention: the attention's projections (PEFT matches name suffixes)
    attention: tuple[str, ...]
    conv1d: bool = False  # linear layers are transformers' Conv1D (weight in x out): LoRA's
    # fan_in_fan_out must say so


_LLAMA_STYLE = Family(
    base="model",
    blocks="model.layers",
    final_norm="model.norm",
    dropout=("attention_dropout",),
    positions="max_position_embeddings",
    attention=("q_proj", "k_proj", "v_proj", "o_proj"),
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        base="transformer",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        dropout=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
        positions="n_positions",
        # "attn.c_proj": the attention's output projection, not the MLP's mlp.c_proj
        attention=("c_attn", "attn.c_proj"),
        conv1d=True,
    ),
    "llama": _LLAMA_STYLE,  # SmolLM, TinyLlama, Llama 2/3
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "phi3": Family(
        base="model",
        blocks="model.layers",
        final_norm="model.norm",
        dropout=("resid_pdrop", "embd_pdrop", "attention_dropout"),
        positions="max_position_embeddings",
        attention=("qkv_proj", "o_proj"),
    ),
}


def family_of(config: Any) -> Family | None:
    """The table's entry for a transformers config (None: a family outside the table)."""
    return FAMILIES.get(str(getattr(config, "model_type", "")))


def max_positions(model: Any) -> int:
    """The longest sequence the model takes: its family's positions setting, else the usual
    names (a family outside the table)."""
    config = model.config
    family = family_of(config)
    names = (family.positions,) if family else ("max_position_embeddings", "n_positions")
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{config.model_type}: no {' or '.join(names)} in its config")


def build_model(cfg: DictConfig, data: TokenizedData) -> Any:
    """The model for the task: a checkpoint with from_pretrained (a Hub id or a local
    directory), or tiny and random from scratch (model.architecture). Classification gets a
    sequence-classification head (``score``, pooling the last non-pad token), generation the
    causal LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification
        if data.task == "classification"
        else AutoModelForCausalLM
    )
    options: dict[str, Any] = {"pad_token_id": data.pad_id}  # classification pools by it
    if data.task == "classification":
        options |= {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {label: i for i, label in enumerate(data.labels)},
        }
    source = cfg.model.name_or_path
    if source:
        from transformers import AutoConfig

        family = family_of(AutoConfig.from_pretrained(source))
        # a family outside the table keeps its own dropout (check_family_knobs refused a change)
        options |= _dropout_settings(family, cfg) if family else {}
        import torch

        from harness.backends.adapters import quantization_options  # (adapters reads FAMILIES)

        # fp32 weights, whatever dtype the checkpoint was saved in (transformers would keep
        # bf16): AdamW on bf16 weights rounds small updates away, and autocast computes in
        # bf16 on CUDA anyway. QLoRA's base is 4-bit instead (quantization_options).
        loading = {"dtype": torch.float32} | quantization_options(cfg)
        return auto.from_pretrained(source, **options, **loading)
    return auto.from_config(_scratch_config(cfg, data, options))


def _dropout_settings(family: Family, cfg: DictConfig) -> dict[str, float]:
    dropout = float(cfg.train.dropout)  # configs type-check: a string would raise
    return dict.fromkeys(family.dropout, dropout)


def _scratch_config(cfg: DictConfig, data: TokenizedData, options: dict[str, Any]) -> Any:
    """The config of a tiny model from scratch: the model section's shape, the tokenizer's
    vocab, the family's dropout settings and ``options``."""
    m, tokenizer = cfg.model, data.tokenizer
    if m.architecture not in SCRATCH_ARCHITECTURES:
        raise ConfigError(_bad_architecture(m.architecture))
    options = options | _dropout_settings(FAMILIES[m.architecture], cfg)
    if m.architecture == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=m.n_positions,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **options,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=m.n_positions,
        hidden_size=m.n_embd,
        intermediate_size=LLAMA_MLP_MULTIPLE * m.n_embd,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )


def _bad_architecture(value: Any) -> str:
    return (
        f"model.architecture={value} cannot be built from scratch; use one of "
        f"{', '.join(SCRATCH_ARCHITECTURES)}"
    )


def freeze(model: Any, trainable_blocks: int) -> None:
    """-1 trains everything; k >= 0 trains the last k transformer blocks, the final norm and the
    head (``score``, or ``lm_head``: tied to the embeddings in GPT-2, which then train too)."""
    if trainable_blocks < 0:
        return
    family = family_of(model.config)
    if family is None:  # check_family_knobs refused this before any trial
        raise ValueError(f"train.trainable_blocks: {model.config.model_type} is not in FAMILIES")
    for param in model.get_submodule(family.base).parameters():
        param.requires_grad = False
    blocks = model.get_submodule(family.blocks)
    # more blocks than the model has: all of them (a negative start would slice from the front)
    keep = list(blocks[max(0, len(blocks) - trainable_blocks) :]) if trainable_blocks else []
    for module in [*keep, model.get_submodule(family.final_norm)]:
        for param in module.parameters():
            param.requires_grad = True
    for head in ("score", "lm_head"):
        if hasattr(model, head):
            for param in getattr(model, head).parameters():
                param.requires_grad = True


def check_family_knobs(cfg: DictConfig, searched: frozenset[str]) -> None:
    """Before any trial: model.architecture is one we build, and a pretrained checkpoint's family
    (read from its config alone) is in the table if train.dropout or train.trainable_blocks is
    searched or set. Raises ConfigError naming the key, the architecture and what to do."""
    if cfg.model.architecture not in SCRATCH_ARCHITECTURES:
        raise ConfigError(_bad_architecture(cfg.model.architecture))
    source = cfg.model.name_or_path
    if not source:
        return
    model_type = model_type_of(cfg)
    if model_type in FAMILIES:
        return
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for key in FAMILY_KNOBS:
        value, default = OmegaConf.select(cfg, key), OmegaConf.select(defaults, key)
        if key in searched or value != default:
            how = "searched" if key in searched else f"set to {value}"
            raise ConfigError(
                f"{key} is {how}, but model.name_or_path={source} is a {model_type} model, "
                f"whose blocks and dropout harness does not know (it knows "
                f"{', '.join(sorted(FAMILIES))}): remove {key} from the search space and the "
                f"overrides (it stays {default}), or use a model of a listed family"
            )


def model_type_of(cfg: DictConfig) -> str:
    """The family a trial of ``cfg`` builds: model.architecture from scratch, else the
    checkpoint's model_type, from its config alone (config.json: no weights read)."""
    from transformers import AutoConfig

    source = cfg.model.name_or_path
    if not source:
        return str(cfg.model.architecture)
    try:
        return str(AutoConfig.from_pretrained(source).model_type)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path={source}: cannot read its config ({str(exc).splitlines()[0]}); "
            "give a local directory holding a config.json, or a Hub id reachable from here"
        ) from None
