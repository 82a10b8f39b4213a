"""The models the local backend trains: built from scratch or loaded with from_pretrained, and
the per-architecture knowledge the loop needs (where the blocks are, how dropout is set)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from harness.backends.adapters import quantization_options
from harness.tokenization import TokenizedData

# The keys that shape a GPT-2 built from scratch (model.name_or_path unset)
ARCHITECTURE_KEYS = frozenset({"model.n_layer", "model.n_head", "model.n_embd"})


def build_model(cfg: DictConfig, data: TokenizedData) -> Any:
    """A GPT-2 for the task: pretrained with from_pretrained, or tiny and random from scratch."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
    )

    dropout = float(cfg.train.dropout)  # GPT2Config type-checks: a string would raise
    options: dict[str, Any] = {
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "pad_token_id": data.pad_id,
    }
    if data.task == "classification":
        options |= {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {label: i for i, label in enumerate(data.labels)},
        }
    source = cfg.model.name_or_path
    if source:
        auto = (
            AutoModelForSequenceClassification
            if data.task == "classification"
            else AutoModelForCausalLM
        )
        return auto.from_pretrained(source, **options, **quantization_options(cfg))
    m = cfg.model
    config = GPT2Config(
        vocab_size=len(data.tokenizer),
        n_positions=m.n_positions,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        bos_token_id=data.tokenizer.bos_token_id,
        eos_token_id=data.tokenizer.eos_token_id,
        **options,
    )
    cls = GPT2ForSequenceClassification if data.task == "classification" else GPT2LMHeadModel
    return cls(config)


def freeze(model: Any, trainable_blocks: int) -> None:
    """-1 trains everything; k >= 0 trains the last k transformer blocks, the final layer norm
    and the task head (the LM head is tied to the embeddings and stays trainable)."""
    if trainable_blocks < 0:
        return
    blocks = model.transformer.h
    for param in model.transformer.parameters():
        param.requires_grad = False
    keep = list(blocks[len(blocks) - trainable_blocks :]) if trainable_blocks else []
    for module in [*keep, model.transformer.ln_f]:
        for param in module.parameters():
            param.requires_grad = True
    if hasattr(model, "lm_head"):
        model.lm_head.weight.requires_grad = True
