"""Tokenizers and tokenized splits for the local backend, prepared once per study.

A pretrained model brings its tokenizer (``from_pretrained``). A tiny model trained from scratch
gets a byte-level BPE tokenizer trained with the ``tokenizers`` library on the training texts,
saved under ``<runs_dir>/cache/tokenizers/<content hash>`` and loaded back from there, so every
trial and every later study on the same data uses the very same vocabulary.

Chat rows of a generation task go through the tokenizer's chat template when it has one (an
instruct checkpoint's): the model is tuned on the format it is prompted with. Without one (GPT-2,
the tokenizers trained here) they are the plain "role: content" lines of harness.data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.data import Dataset, Example

EOS = "<|endoftext|>"


def model_text(example: Example, task: str) -> str:
    """What the model reads of an example: the text, or prompt + completion for generation."""
    return example.text + example.target if task == "generation" else example.text


def _train_bpe(texts: list[str], vocab_size: int, directory: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    tokenizer.save_pretrained(directory)


def load_tokenizer(cfg: DictConfig, dataset: Dataset, cache_dir: Path) -> tuple[Any, str]:
    """The tokenizer (pad token set) and where it was loaded from."""
    from transformers import AutoTokenizer

    source = cfg.model.name_or_path
    if not source:
        texts = [model_text(e, dataset.task) for e in dataset.train]
        key = hashlib.sha256(
            json.dumps({"texts": texts, "vocab": cfg.model.vocab_size, "v": 1}).encode()
        ).hexdigest()[:20]
        directory = cache_dir / "tokenizers" / key
        if not (directory / "tokenizer.json").exists():
            _train_bpe(texts, cfg.model.vocab_size, directory)
        source = str(directory)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


@dataclass
class EncodedSplit:
    """Token ids per example. Classification: ``targets`` are class indices. Generation:
    ``inputs`` are prompt ids and ``targets`` completion ids (ending with EOS)."""

    inputs: list[list[int]]
    targets: list[Any]
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class TokenizedData:
    task: str
    tokenizer: Any
    tokenizer_source: str
    labels: list[str]
    train: EncodedSplit
    validation: EncodedSplit
    test: EncodedSplit

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def encode(cfg: DictConfig, dataset: Dataset, cache_dir: Path) -> TokenizedData:
    tokenizer, source = load_tokenizer(cfg, dataset, cache_dir)
    label_index = {label: i for i, label in enumerate(dataset.labels)}

    def split(examples: list[Example]) -> EncodedSplit:
        inputs = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
        if dataset.task == "classification":
            targets: list[Any] = [label_index[e.target] for e in examples]
        else:
            completions = tokenizer([e.target for e in examples], add_special_tokens=False)
            targets = [[*ids, tokenizer.eos_token_id] for ids in completions["input_ids"]]
            if tokenizer.chat_template:
                for index, example in enumerate(examples):
                    if example.messages:
                        inputs[index], targets[index] = encode_chat(tokenizer, example.messages)
        return EncodedSplit(inputs, targets, examples)

    return TokenizedData(
        task=dataset.task,
        tokenizer=tokenizer,
        tokenizer_source=source,
        labels=list(dataset.labels),
        train=split(dataset.train),
        validation=split(dataset.validation),
        test=split(dataset.test),
    )


def encode_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """A chat row as the model's chat template writes it: the prompt is every message but the
    answer, then the template's assistant header (``add_generation_prompt``); the completion is
    the answer as the template writes it after that header (with its end-of-turn marker), ending
    with EOS. A template that writes the prompt otherwise in the full chat (rare) gets the bare
    answer + EOS as its completion."""
    history = [dict(m) for m in messages[:-1]]
    prompt_ids = tokenizer.apply_chat_template(
        history, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    # the template's text after the end-of-turn marker (a newline) is no part of the answer
    answer = full[len(prompt) :].rstrip() if full.startswith(prompt) else messages[-1]["content"]
    completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not completion or completion[-1] != tokenizer.eos_token_id:
        completion.append(tokenizer.eos_token_id)
    return list(prompt_ids), completion


def fit_generation(prompt: list[int], completion: list[int], max_length: int) -> list[int]:
    """prompt + completion in ``max_length`` tokens: the prompt loses its start first (the answer
    is what is learned), then the completion its end."""
    completion = completion[:max_length]
    room = max_length - len(completion)
    return (prompt[-room:] if room > 0 else []) + completion
