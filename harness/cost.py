"""Tokens and money of a hosted fine-tuning job, counted before anything is spent.

Tokens are counted with tiktoken in the model's encoding. tiktoken downloads its BPE files on
first use, which fails offline; the ``bpe-openai`` package ships byte-identical copies, so they
are written into tiktoken's cache under the names tiktoken looks for (checked against tiktoken's
own sha256) and the real tiktoken then works without a network. Where no encoding can be loaded
the count falls back to characters / 4 and says it is a rough estimate.

Billed training tokens ~ n_epochs x tokens in the training file. A chat example costs its
messages' tokens plus the chat format's overhead per message, counted here as OpenAI's cookbook
does (3 per message + 3 per example): close to, but not exactly, what the API bills.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TOKENS_PER_MESSAGE = 3
TOKENS_PER_EXAMPLE = 3
_BLOBS = "https://openaipublic.blob.core.windows.net/encodings/"


@dataclass(frozen=True)
class Encoding:
    name: str
    exact: bool  # False: characters / 4, or an encoding guessed for an unknown model
    note: str  # how the count was made, for the user
    encoder: Any = None  # a tiktoken Encoding, or None for the character estimate

    def count(self, text: str) -> int:
        if self.encoder is None:
            return max(1, len(text) // 4)
        return len(self.encoder.encode(text, disallowed_special=()))

    def count_chat(self, messages: Iterable[Mapping[str, Any]]) -> int:
        total = TOKENS_PER_EXAMPLE
        for message in messages:
            total += TOKENS_PER_MESSAGE + self.count(str(message.get("content") or ""))
        return total


def install_offline_encodings(cache_dir: Path) -> bool:
    """Writes bpe-openai's cl100k/o200k files where tiktoken looks, if not there yet. Returns
    False when bpe-openai is missing or its data does not match tiktoken's expected hash."""
    import importlib.util

    expected = {  # the sha256 tiktoken_ext.openai_public checks each file against
        "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    }
    targets = {
        name: cache_dir / hashlib.sha1(f"{_BLOBS}{name}.tiktoken".encode()).hexdigest()
        for name in expected
    }
    if all(target.exists() for target in targets.values()):
        return True
    # located, not imported: importing bpe_openai loads its own tokenizers (~0.3 s)
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return False
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        if target.exists():
            continue
        blob = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
        if hashlib.sha256(blob).hexdigest() != expected[name]:
            return False
        partial = target.with_suffix(".partial")
        partial.write_bytes(blob)
        partial.replace(target)
    return True


@lru_cache(maxsize=8)
def encoding_for(model: str, cache_dir: str) -> Encoding:
    """The tokenizer of ``model`` (a base or ``ft:`` model id)."""
    try:
        import tiktoken
    except ModuleNotFoundError:
        return Encoding("chars/4", False, "rough estimate: tiktoken is not installed")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", cache_dir)
    install_offline_encodings(Path(os.environ["TIKTOKEN_CACHE_DIR"]))
    base = model.split(":")[1] if model.startswith("ft:") else model
    try:
        name, exact = tiktoken.encoding_name_for_model(base), True
    except KeyError:  # a provider's own model name: the newest OpenAI encoding is a guess
        name, exact = "o200k_base", False
    try:
        encoder = tiktoken.get_encoding(name)
    except Exception as exc:  # offline without the bundled files
        reason = f"{type(exc).__name__}: {str(exc)[:80]}"
        return Encoding("chars/4", False, f"rough estimate (characters / 4): {reason}")
    note = f"tiktoken {name}" if exact else f"tiktoken {name}, guessed for unknown model {base!r}"
    return Encoding(name, exact, note, encoder)


def price_per_token(prices: Mapping[str, float], model: str) -> float:
    """USD per training token, from ``prices``: model id (or its longest listed prefix) ->
    USD per 1M training tokens. Raises KeyError naming the model when it has no price."""
    matches = [key for key in prices if model == key or model.startswith(str(key))]
    if not matches:
        raise KeyError(model)
    return float(prices[max(matches, key=len)]) / 1_000_000
