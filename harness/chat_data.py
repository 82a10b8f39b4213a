"""Datasets as the chat rows a hosted fine-tuning API takes, checked as the API would check them.

A classification row becomes (system prompt naming the labels, the text as the user message, the
label as the assistant message); chat rows pass through as they are; prompt/completion rows become
a user and an assistant message; a preference pair becomes its input turns and the preferred
answer, the non-preferred one beside them (``Chat.rejected``), written out in the DPO rows
OpenAI, Azure and Together take (``to_preference_jsonl``). Each chat keeps the file:line of its
record, so a rule broken here (too few examples, no assistant answer, an empty message, too many
tokens for the model) is reported where the user can fix it, before anything is uploaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.cost import TOKENS_PER_EXAMPLE, Encoding
from harness.data import CHAT_ROLES, DataError, Dataset, Example

MIN_TRAINING_EXAMPLES = 10  # the API refuses smaller training files


@dataclass(frozen=True)
class Chat:
    messages: tuple[dict[str, str], ...]  # the answer is the last (assistant) message
    source: str  # file:line of the record it came from
    rejected: str = ""  # a preference pair's non-preferred answer (the preferred one: answer)

    @property
    def prompt(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages[:-1]]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"].strip()


def to_chat(example: Example, task: str, system_prompt: str) -> Chat:
    if task == "preference":  # as generation rows: the input turns as written, no system prompt
        answer = {"role": "assistant", "content": example.target.strip()}
        return Chat((*example.messages, answer), example.source, example.rejected)
    if task == "classification":
        messages: tuple[dict[str, str], ...] = (
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": example.text},
            {"role": "assistant", "content": example.target},
        )
    elif example.messages:
        messages = example.messages
    else:
        messages = (
            {"role": "user", "content": example.text},
            {"role": "assistant", "content": example.target.strip()},
        )
    return Chat(messages, example.source)


def system_prompt_for(template: str, labels: Sequence[str]) -> str:
    return template.format(labels=", ".join(labels))


def to_chats(dataset: Dataset, template: str) -> dict[str, list[Chat]]:
    """The dataset's three splits as chats."""
    prompt = system_prompt_for(template, dataset.labels)
    return {
        split: [to_chat(e, dataset.task, prompt) for e in getattr(dataset, split)]
        for split in ("train", "validation", "test")
    }


# Token counts of chats already checked, by their messages: a chat is counted once though it is
# checked when its file is loaded and again when the study's splits are described.
TokenCounts = dict[tuple[tuple[str, str], ...], int]


def check_chat(
    chat: Chat,
    encoding: Encoding,
    token_limit: int,
    counted: TokenCounts | None = None,
    where: str = "example",
) -> int:
    """The chat's token count; raises DataError (at its file:line) where the API would refuse
    it: no assistant answer, an unknown role, an empty message, more tokens than the limit."""
    where = chat.source or where
    roles = [m.get("role") for m in chat.messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant message; every example needs one")
    for index, message in enumerate(chat.messages):
        if message.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: message {index} has role {message.get('role')!r}")
        if not str(message.get("content") or "").strip():
            raise DataError(f"{where}: message {index} ({message['role']}) is empty")
    key = tuple((str(m.get("role")), str(m.get("content"))) for m in chat.messages)
    key += (("rejected", chat.rejected),) if chat.rejected else ()
    tokens = counted.get(key) if counted is not None else None
    if tokens is None:
        tokens = count_tokens(chat, encoding)
        if counted is not None:
            counted[key] = tokens
    if tokens > token_limit:
        pair = " (the input and both answers)" if chat.rejected else ""
        raise DataError(
            f"{where}: {tokens} tokens{pair} ({encoding.note}); the model's limit per example "
            f"is {token_limit}. Shorten it or drop it."
        )
    return tokens


def count_tokens(chat: Chat, encoding: Encoding) -> int:
    """A chat's tokens; a preference pair's are its input and both answers, which the hosted
    APIs bill and hold to the per-example limit."""
    tokens = encoding.count_chat(chat.messages)
    if chat.rejected:  # one more assistant message, not a second example
        tokens += encoding.count_chat([{"role": "assistant", "content": chat.rejected}])
        tokens -= TOKENS_PER_EXAMPLE
    return tokens


def check_chats(
    chats: Sequence[Chat],
    split: str,
    encoding: Encoding,
    token_limit: int,
    counted: TokenCounts | None = None,
) -> list[int]:
    """Token counts of each chat; raises DataError at the first chat the API would refuse."""
    if split == "train" and len(chats) < MIN_TRAINING_EXAMPLES:
        where = chats[0].source.rsplit(":", 1)[0] if chats else "training split"
        raise DataError(
            f"{where}: the training split has {len(chats)} examples; hosted fine-tuning needs at "
            f"least {MIN_TRAINING_EXAMPLES}"
        )
    return [check_chat(c, encoding, token_limit, counted, f"{split} example") for c in chats]


def check_examples(
    examples: Sequence[Example],
    task: str,
    labels: Sequence[str],
    template: str,
    encoding: Encoding,
    token_limit: int,
    counted: TokenCounts | None = None,
) -> None:
    """One file's examples, as the chats they become, checked one by one (``check_chat``): a
    hosted backend's data check, run as each file is loaded, before any split."""
    prompt = system_prompt_for(template, labels)
    for example in examples:
        check_chat(to_chat(example, task, prompt), encoding, token_limit, counted)


def token_limit(limits: Mapping[str, int], model: str) -> int:
    """The per-example limit of ``model``: its longest matching prefix in ``limits``, else the
    ``default`` entry."""
    base = model.split(":")[1] if model.startswith("ft:") else model
    matches = [key for key in limits if key != "default" and base.startswith(key)]
    return int(limits[max(matches, key=len)] if matches else limits["default"])


def to_jsonl(chats: Sequence[Chat]) -> bytes:
    lines = (json.dumps({"messages": list(c.messages)}, ensure_ascii=False) for c in chats)
    return ("\n".join(lines) + "\n").encode("utf-8")


def preference_row(chat: Chat) -> dict[str, Any]:
    """A preference pair as OpenAI's, Azure's and Together's DPO rows have it."""
    return {
        "input": {"messages": chat.prompt},
        "preferred_output": [{"role": "assistant", "content": chat.answer}],
        "non_preferred_output": [{"role": "assistant", "content": chat.rejected.strip()}],
    }


def to_preference_jsonl(chats: Sequence[Chat]) -> bytes:
    """Preference pairs as the JSONL file a DPO job trains on (``preference_row`` per line)."""
    lines = (json.dumps(preference_row(c), ensure_ascii=False) for c in chats)
    return ("\n".join(lines) + "\n").encode("utf-8")
