"""Load, validate and split datasets.

Formats: JSONL or CSV (UTF-8, with or without BOM), field names from the config.
- classification rows: ``{text, label}``, or chat rows whose last user turn is the text and whose
  final assistant turn is the label
- generation rows: ``{prompt, completion}`` or chat rows ``{"messages": [...]}`` (OpenAI format);
  a chat row becomes a prompt (every turn before the last assistant turn) and a completion.
A dataset is one file split with a seed (stratified by label for classification), or explicit
train/validation/test files. Every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.config import PROJECT_ROOT

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


class DataError(ValueError):
    """A dataset problem the user must fix; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Example:
    """One row: ``text`` + ``label`` for classification, ``text`` (prompt) + ``target`` for
    generation. A chat row keeps its ``messages`` too, for backends that take chats as they are."""

    text: str
    target: str
    source: str = ""  # file:line of the record, for error messages
    messages: tuple[dict[str, str], ...] = ()


@dataclass
class Dataset:
    task: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)  # sorted; classification only
    file_hashes: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its bytes

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.file_hashes.values())).encode()).hexdigest()


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the current directory, then in the project root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    in_project = PROJECT_ROOT / candidate
    return in_project if in_project.exists() else candidate.resolve()


def _records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; the line number is where the record starts in the file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{bad_line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from exc
    fmt = fmt if fmt != "auto" else ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if fmt == "csv":
            reader = csv.DictReader(handle)
            while True:
                # a quoted field may span lines: the record starts after the previous one ended
                start = max(reader.line_num, 1) + 1
                row = next(reader, None)
                if row is None:
                    return
                yield start, dict(row)
        if fmt != "jsonl":
            raise DataError(f"{path}: unknown format {fmt!r} (use jsonl or csv)")
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {record!r:.60}")
            yield number, record


def _field(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field {name!r} is empty")
    return text


def check_chat(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """The messages of a chat row, checked: known roles, text content, an assistant answer last."""
    if not isinstance(messages, list | tuple) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: message {index} needs a role in {sorted(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {index} needs text 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def chat_to_prompt_completion(messages: Any, where: str) -> tuple[str, str]:
    """Renders a chat as plain text: the turns before the last assistant turn are the prompt."""
    messages = check_chat(messages, where)
    prompt = "\n".join(f"{m['role']}: {m['content'].strip()}" for m in messages[:-1])
    return f"{prompt}\nassistant:", " " + messages[-1]["content"].strip()


def load_examples(path: Path, data: DictConfig) -> list[Example]:
    if data.task not in ("classification", "generation"):
        raise DataError(f"unknown task {data.task!r} (use classification or generation)")
    examples: list[Example] = []
    for number, record in _records(path, data.format):
        where = f"{path}:{number}"
        if data.messages_field in record:
            messages = _messages(record[data.messages_field], data.messages_field, where)
            if data.task == "classification":
                examples.append(_chat_classification(messages, where))
            else:
                text, target = chat_to_prompt_completion(messages, where)
                examples.append(Example(text, target, where, messages))
        elif data.task == "classification":
            text = _field(record, data.text_field, where)
            examples.append(Example(text, _field(record, data.label_field, where), where))
        else:
            prompt = _field(record, data.prompt_field, where)
            completion = _field(record, data.completion_field, where)
            examples.append(Example(prompt, " " + completion, where))
    if not examples:
        raise DataError(f"{path}: empty file (no records)")
    return examples


def _messages(value: Any, name: str, where: str) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):  # CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: {name!r}: bad JSON: {exc.msg}") from exc
    return check_chat(value, where)


def _chat_classification(messages: tuple[dict[str, str], ...], where: str) -> Example:
    """A chat row as a labelled text: the last user turn is the text, the answer the label."""
    users = [m["content"].strip() for m in messages[:-1] if m["role"] == "user"]
    label = messages[-1]["content"].strip()
    if not users or not users[-1]:
        raise DataError(f"{where}: a classification chat row needs a user message (the text)")
    if not label:
        raise DataError(f"{where}: the assistant message (the label) is empty")
    return Example(users[-1], label, where, messages)


def _stratified_split(
    examples: list[Example], fractions: tuple[float, float], seed: int, by_label: bool
) -> tuple[list[Example], list[Example], list[Example]]:
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.target if by_label else ""].append(example)
    train: list[Example] = []
    validation: list[Example] = []
    test: list[Example] = []
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        n_val = round(len(group) * fractions[0])
        n_test = round(len(group) * fractions[1])
        validation += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    for part in (train, validation, test):
        rng.shuffle(part)
    return train, validation, test


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_dataset(data: DictConfig) -> Dataset:
    """Loads and validates the dataset a config names; raises DataError with file and line."""
    if data.path and any(data.get(s) for s in ("train", "validation", "test")):
        raise DataError("data: give either data.path or data.train/validation/test, not both")
    by_label = data.task == "classification"
    hashes: dict[str, str] = {}
    if data.path:
        path = resolve_path(data.path)
        examples = load_examples(path, data)
        hashes[str(path)] = file_sha256(path)
        fractions = (data.validation_fraction, data.test_fraction)
        if min(fractions) <= 0 or sum(fractions) >= 1:
            raise DataError("data: validation_fraction and test_fraction must be > 0, sum < 1")
        _check_size(examples, data.min_rows, str(path))
        train, validation, test = _stratified_split(examples, fractions, data.split_seed, by_label)
    elif data.train and data.validation:
        parts = {}
        for split in ("train", "validation", "test"):
            if data.get(split):
                path = resolve_path(data[split])
                parts[split] = load_examples(path, data)
                hashes[str(path)] = file_sha256(path)
        train, validation = parts["train"], parts["validation"]
        test = parts.get("test", validation)  # no test file: report test metrics on validation
        _check_size(train, data.min_rows, str(resolve_path(data.train)))
    else:
        raise DataError("data: set data.path, or data.train and data.validation")
    labels: list[str] = []
    if by_label:
        labels = sorted({e.target for e in train})
        if len(labels) < 2:
            raise DataError(f"data {data.name!r}: only one class in training data: {labels}")
        unseen = {e.target for e in validation + test} - set(labels)
        if unseen:
            raise DataError(f"data {data.name!r}: labels {sorted(unseen)} not in training split")
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if not part:
            raise DataError(f"data {data.name!r}: the {name} split is empty; add rows")
    return Dataset(data.task, train, validation, test, labels, hashes)


def _check_size(examples: list[Example], min_rows: int, where: str) -> None:
    if len(examples) < min_rows:
        raise DataError(f"{where}: too few rows: {len(examples)} (need at least {min_rows})")


def label_balance(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.target for e in examples).items()))
