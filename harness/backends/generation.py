"""Completions of prompts by a causal LM, for the generated-text metrics (harness.metrics).

Greedy by default; with a temperature above 0, sampled with that temperature and nucleus top-p,
from a seed, so a trial's outputs are the same every time it runs. Prompts go through the model
in batches of similar length, padded on the left with an attention mask: each prompt gets the
completion it gets alone (tests check batched == one at a time, greedy, float32), and a split
costs a few generate calls instead of one per example.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.backends.base import TrialSpec, optimized_metrics
from harness.metrics import GENERATED_TEXT_METRICS


def text_metrics_at_evaluations(spec: TrialSpec) -> bool:
    """Whether the evaluations of this trial generate text for the validation split: only when
    the study optimizes a generated-text metric, since it costs a completion per example at
    each evaluation (the test split always gets them: once per trial)."""
    return bool(optimized_metrics(spec) & set(GENERATED_TEXT_METRICS["generation"]))


@dataclass(frozen=True)
class Decoding:
    """How completions are chosen (the train.* keys of the same names; seed: the config's)."""

    max_new_tokens: int  # stop after this many tokens, or at EOS
    temperature: float  # 0: greedy; above 0: sample
    top_p: float  # when sampling: the smallest set of tokens holding this much probability
    seed: int  # when sampling: the generator's seed, so a trial is deterministic

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.sampled:
            return {"do_sample": False}
        # top_k=0: no top-k cut, whatever the checkpoint's generation_config says, so the
        # distribution sampled is exactly the one temperature and top_p describe
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


def complete(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    *,
    max_prompt_tokens: int,
    batch_size: int,
) -> list[str]:
    """The completion of each prompt (token ids; only its last ``max_prompt_tokens`` are read),
    as text without special tokens, in prompt order. The model should be in eval mode."""
    import torch

    cut = [list(p[-max_prompt_tokens:]) for p in prompts]
    # similar lengths together: little padding. A greedy completion does not depend on its
    # batch; a sampled one does (a batch shares the random draws), still deterministically.
    order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
    completions: list[str] = [""] * len(cut)
    with torch.no_grad(), _seeded(decoding, model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = _complete_batch(model, tokenizer, [cut[i] for i in chunk], decoding)
            for index, text in zip(chunk, texts, strict=True):
                completions[index] = text
    return completions


def _complete_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding
) -> list[str]:
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generated = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=decoding.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        **decoding.generate_kwargs(),
    )
    texts = []
    for row in generated[:, width:].tolist():
        # a sequence that ended early is padded to the batch's length: cut it at its EOS
        if eos_id in row:
            row = row[: row.index(eos_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@contextlib.contextmanager
def _seeded(decoding: Decoding, model: Any) -> Iterator[None]:
    """Greedy: nothing. Sampling: the global RNG (what generate draws from) seeded from the
    config's seed, and restored after, so nothing outside generation sees a change."""
    import torch

    if not decoding.sampled:
        yield
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(decoding.seed)
        yield
