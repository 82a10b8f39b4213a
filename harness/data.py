"""Load, validate and split datasets.

Formats: JSONL or CSV (UTF-8, with or without BOM), field names from the config.
- classification rows: ``{text, label}``, or chat rows whose last user turn is the text and whose
  final assistant turn is the label
- generation rows: ``{prompt, completion}`` or chat rows ``{"messages": [...]}`` (OpenAI format);
  a chat row becomes a prompt (every turn before the last assistant turn) and a completion.
- preference rows (harness.preference_data): a prompt with a preferred and a non-preferred
  answer, in OpenAI's and Together's DPO shape or TRL's ``{prompt, chosen, rejected}``.
One file holds one row format (chat, prompt/completion, text/label or one preference shape): a
row in another format than the file's first is refused at its line. ``detect_task`` tells the
task from a file's rows (``harness validate FILE``).
A dataset is one file split with a seed (stratified by label for classification), or explicit
train/validation/test files. Every error names the file and, where there is one, the line.
``load_dataset`` is the one validator behind every entry point (``harness validate``, a sweep's
plan, the hosted backends' data rules through its ``check`` hook), so a file gets one verdict.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import itertools
import json
import random
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from harness.config import PROJECT_ROOT

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


class DataError(ValueError):
    """A dataset problem the user must fix; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Example:
    """One row: ``text`` + ``label`` for classification, ``text`` (prompt) + ``target`` for
    generation. A chat row keeps its ``messages`` too, for backends that take chats as they are.
    A preference pair: ``text`` the last user message, ``target`` the preferred answer,
    ``rejected`` the non-preferred one, ``messages`` the input turns (the answers not among
    them)."""

    text: str
    target: str
    source: str = ""  # file:line of the record, for error messages
    messages: tuple[dict[str, str], ...] = ()
    rejected: str = ""  # preference pairs: the non-preferred answer


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
        return _absolute(candidate)
    in_project = PROJECT_ROOT / candidate
    return in_project if in_project.exists() else _absolute(candidate)


def _absolute(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a symlink loop: the loader reports it, naming the file
        return path.absolute()


# The longest line (a JSONL record, a CSV row) read: a file without line breaks (/dev/zero, a
# binary file) would otherwise be read whole into memory. An example this long is far past any
# model's context; hosted APIs take 65,536 tokens (~256 KB) at most.
MAX_LINE_BYTES = 8 * 1024 * 1024


def check_regular_file(path: Path) -> None:
    """A data file must be a regular file: a directory, a device (/dev/zero), a FIFO or a
    symlink loop is refused naming the path, before a byte is read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:  # a symlink loop, no permission
        why = "a loop of symbolic links" if exc.errno == errno.ELOOP else exc.strerror
        raise DataError(f"{path}: cannot open: {why}") from exc
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device or pipe)"
        raise DataError(f"{path}: {kind}; a dataset file is one JSONL or CSV file")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as text (line endings kept, a UTF-8 BOM dropped), each read with a
    bound (MAX_LINE_BYTES); a line that is not UTF-8 or too long is refused with its number."""
    check_regular_file(path)
    offset = 0
    with path.open("rb") as handle:
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{path}:{number}: line longer than {MAX_LINE_BYTES:,} bytes; a record is "
                    "one line of text (is this a binary file?)"
                )
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                start = offset + exc.start
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                    f"{start}); save the file as UTF-8"
                ) from exc
            offset += len(raw)


def _records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; the line number is where the record starts in the file."""
    fmt = fmt if fmt != "auto" else ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    if fmt == "csv":
        yield from _csv_records(path)
        return
    if fmt != "jsonl":
        raise DataError(f"{path}: unknown format {fmt!r} (use jsonl or csv)")
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {record!r:.60}")
        yield number, record


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(_lines(path))
    while True:
        # a quoted field may span lines: the record starts after the previous one ended
        start = max(reader.line_num, 1) + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:  # a field past csv's size limit: an unclosed quote, mostly
            raise DataError(f"{path}:{start}: bad CSV: {exc}") from exc
        if row is None:
            return
        yield start, dict(row)


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


# A label written as a number (JSON 1 or 1.0, CSV "1.0") names the class of that number: 1 and
# 1.0 are one class, "1". Leading zeros ("007") make a code, not a number: kept as written.
NUMBER = re.compile(r"[+-]?(0|[1-9]\d*)(\.\d*)?([eE][+-]?\d+)?|[+-]?\.\d+([eE][+-]?\d+)?")
NOT_FINITE = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


# A numeric label is normalised (1.0 -> 1) up to this many digits; a longer one (an id, or
# 1e5000, which would expand to 5000 digits) is kept as written.
MAX_LABEL_DIGITS = 40


def _label(record: dict[str, Any], name: str, where: str) -> str:
    """A classification label as text; numbers normalised, NaN and infinities refused."""
    number = _as_number(record.get(name))
    if number is None:
        return _field(record, name, where)
    if not number.is_finite():
        raise DataError(
            f"{where}: label {record[name]!r} is not a finite number (a missing value?); give "
            "the row a label or remove it"
        )
    if abs(number.adjusted()) > MAX_LABEL_DIGITS:  # 1e5000: kept as written, not expanded
        return _field(record, name, where)
    if number == number.to_integral_value():
        return str(int(number))
    return str(number.normalize())


def _as_number(value: Any) -> Decimal | None:
    """The number a label is written as (exactly: big integer ids stay apart), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    text = value.strip() if isinstance(value, str) else ""
    return Decimal(text) if NUMBER.fullmatch(text) or NOT_FINITE.fullmatch(text) else None


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


TASKS = ("classification", "generation", "preference")
SPLITS = ("train", "validation", "test")

# A row's format, by the fields it has (names from the config): preference rows are told by
# their answers' fields first (a TRL pair has a prompt field too), chat rows by their messages
# field, prompt/completion rows by either of their fields, anything else is text/label.
CHAT, PROMPT_COMPLETION, TEXT_LABEL = "chat", "prompt/completion", "text/label"


def _row_format(record: dict[str, Any], data: DictConfig) -> str:
    from harness.preference_data import preference_format

    pair = preference_format(record)
    if pair is not None:
        return pair
    if data.messages_field in record:
        return CHAT
    if data.prompt_field in record or data.completion_field in record:
        return PROMPT_COMPLETION
    return TEXT_LABEL


def _format_shape(row_format: str, data: DictConfig) -> str:
    """How a format looks with this config's field names, for error messages."""
    from harness.preference_data import PREFERENCE_SHAPES

    if row_format in PREFERENCE_SHAPES:
        return PREFERENCE_SHAPES[row_format]
    if row_format == CHAT:
        return f'chat ({{"{data.messages_field}": [...]}})'
    if row_format == PROMPT_COMPLETION:
        return f'prompt/completion ({{"{data.prompt_field}", "{data.completion_field}"}})'
    return f'text/label ({{"{data.text_field}", "{data.label_field}"}})'


def _uniform_records(path: Path, data: DictConfig) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line, record, row format); refuses the first record whose format differs from the
    first record's: a file mixing formats is a mistake (two files pasted together), and
    reading each row by its own format would hide it."""
    first: tuple[int, str] | None = None
    for number, record in _records(path, data.format):
        row_format = _row_format(record, data)
        if first is None:
            first = (number, row_format)
        elif row_format != first[1]:
            raise DataError(
                f"{path}:{number}: this row is {_format_shape(row_format, data)} but line "
                f"{first[0]} is {_format_shape(first[1], data)}; one format per file"
            )
        yield number, record, row_format
    if first is None:
        raise DataError(f"{path}: empty file (no records)")


def load_examples(path: Path, data: DictConfig) -> list[Example]:
    from harness.preference_data import PREFERENCE_SHAPES, check_task_fits, preference_example

    if data.task not in TASKS:
        raise DataError(f"data.task={data.task!r}: unknown task (use {', '.join(TASKS)})")
    examples: list[Example] = []
    for number, record, row_format in _uniform_records(path, data):
        where = f"{path}:{number}"
        check_task_fits(data.task, row_format, _format_shape(row_format, data), where)
        if row_format in PREFERENCE_SHAPES:
            examples.append(preference_example(record, row_format, data.prompt_field, where))
        elif row_format == CHAT:
            messages = _messages(record[data.messages_field], data.messages_field, where)
            if data.task == "classification":
                examples.append(_chat_classification(messages, where))
            else:
                text, target = chat_to_prompt_completion(messages, where)
                examples.append(Example(text, target, where, messages))
        elif data.task == "classification":
            text = _field(record, data.text_field, where)
            examples.append(Example(text, _label(record, data.label_field, where), where))
        else:
            prompt = _field(record, data.prompt_field, where)
            completion = _field(record, data.completion_field, where)
            examples.append(Example(prompt, " " + completion, where))
    return examples


# Chat rows are a classification set when their final assistant answers read as labels: each
# one line of at most MAX_LABEL_WORDS words, and few distinct ones for the rows: at most
# MAX_LABELS, and at most half the row count (a label is used twice on average). Free-text
# answers (a FAQ, open QA) are longer or nearly all different: generation. The user overrides
# the guess with data.task=classification|generation.
MAX_LABEL_WORDS = 4
MAX_LABELS = 200


def detect_task(path: Path, data: DictConfig) -> tuple[str, str]:
    """(task, why) for a file given by path: preference pairs are preference, prompt/completion
    rows generation, text/label rows classification, chat rows by their answers (the rule
    above). Reads the file as the loader does, so a bad file fails here with the loader's
    message."""
    from harness.preference_data import PREFERENCE_SHAPES

    answers: list[str] = []
    for number, record, row_format in _uniform_records(path, data):
        if row_format in PREFERENCE_SHAPES:
            return "preference", f"{PREFERENCE_SHAPES[row_format]} rows"
        if row_format == PROMPT_COMPLETION:
            return "generation", "prompt/completion rows"
        if row_format == TEXT_LABEL:
            return "classification", "text/label rows"
        messages = _messages(record[data.messages_field], data.messages_field, f"{path}:{number}")
        answers.append(messages[-1]["content"].strip())
    distinct = set(answers)
    longest = max(len(a.split()) for a in distinct)
    short = longest <= MAX_LABEL_WORDS and not any("\n" in a for a in distinct)
    if short and len(distinct) <= min(MAX_LABELS, len(answers) / 2):
        return "classification", (
            f"the final answers of its {len(answers)} chat rows are {len(distinct)} short "
            "labels; data.task=generation says otherwise"
        )
    return "generation", (
        f"the final answers of its {len(answers)} chat rows are free text ({len(distinct)} "
        f"distinct, up to {longest} words); data.task=classification says otherwise"
    )


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
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_labels(examples: Sequence[Example], task: str) -> list[str]:
    """The sorted label set of classification examples; [] for generation."""
    return sorted({e.target for e in examples}) if task == "classification" else []


class ExampleCheck(Protocol):
    """A backend's own data rules (a hosted API's token limit per example), run on each file's
    examples right after it is loaded, before any split or size check, so a broken example is
    reported even where the split would fail too. ``labels``: the training labels (sorted;
    [] for generation). Raises DataError naming the file and line. What Backend.example_check
    returns; every entry point hands it to ``load_dataset``, so a file gets the same verdict."""

    def __call__(self, examples: Sequence[Example], task: str, labels: Sequence[str]) -> None: ...


def load_dataset(data: DictConfig, check: ExampleCheck | None = None) -> Dataset:
    """Loads and validates the dataset a config names; raises DataError with file and line.
    ``check`` (see ExampleCheck) runs on each file as soon as it is loaded."""
    if data.path and any(data.get(s) for s in SPLITS):
        raise DataError("data: give either data.path or data.train/validation/test, not both")
    if data.path:
        return _split_one_file(data, check)
    if data.train and data.validation:
        return _split_files(data, check)
    raise DataError("data: set data.path, or data.train and data.validation")


def _split_one_file(data: DictConfig, check: ExampleCheck | None) -> Dataset:
    fractions = (data.validation_fraction, data.test_fraction)
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise DataError("data: validation_fraction and test_fraction must be > 0, sum < 1")
    path = resolve_path(data.path)
    examples = load_examples(path, data)
    labels = file_labels(examples, data.task)
    if check is not None:
        check(examples, data.task, labels)
    _check_size(examples, data.min_rows, path)
    _check_classes(labels, data.task, path)
    by_label = data.task == "classification"
    splits = _stratified_split(examples, fractions, data.split_seed, by_label)
    _check_split_sizes(path, examples, splits, data)
    train, validation, test = splits
    if data.task == "classification":
        _check_unseen(file_labels(train, data.task), validation + test, f"training split of {path}")
    hashes = {str(path): file_sha256(path)}
    return Dataset(data.task, train, validation, test, labels, hashes)


def _split_files(data: DictConfig, check: ExampleCheck | None) -> Dataset:
    paths = {split: resolve_path(data[split]) for split in SPLITS if data.get(split)}
    parts = {split: load_examples(path, data) for split, path in paths.items()}
    labels = file_labels(parts["train"], data.task)
    if check is not None:
        for part in parts.values():
            check(part, data.task, labels)
    _check_size(parts["train"], data.min_rows, paths["train"])
    _check_classes(labels, data.task, paths["train"])
    test = parts.get("test", parts["validation"])  # no test file: test metrics on validation
    if data.task == "classification":
        _check_unseen(labels, parts["validation"] + parts.get("test", []), str(paths["train"]))
    hashes = {str(path): file_sha256(path) for path in paths.values()}
    return Dataset(data.task, parts["train"], parts["validation"], test, labels, hashes)


def split_files(data: DictConfig) -> dict[str, Path]:
    """Which file each split comes from, as ``harness.data.load_dataset`` reads them: one file
    for all three, or a file per split (without a test file, test metrics are measured on the
    validation file)."""
    if data.path:
        path = resolve_path(data.path)
        return {"train": path, "validation": path, "test": path}
    files = {split: resolve_path(data[split]) for split in ("train", "validation")}
    files["test"] = resolve_path(data.test) if data.get("test") else files["validation"]
    return files


def _check_size(examples: list[Example], min_rows: int, path: Path) -> None:
    if len(examples) < min_rows:
        raise DataError(
            f"{path}: too few rows: {len(examples)} (need at least {min_rows}, data.min_rows)"
        )


def _check_classes(labels: list[str], task: str, path: Path) -> None:
    if task == "classification" and len(labels) < 2:
        raise DataError(
            f"{path}: only one class in training data: {labels}; a classifier needs rows of "
            "at least 2 labels (for free-text answers, data.task=generation)"
        )


def _check_unseen(labels: list[str], examples: list[Example], train_where: str) -> None:
    """A label the training data lack can never be predicted: refused at its first row."""
    unseen = sorted({e.target for e in examples} - set(labels))
    if unseen:
        first = next(e for e in examples if e.target in unseen)
        raise DataError(
            f"{first.source}: labels {unseen} not in training data ({train_where}); add "
            "training rows with them or remove these rows"
        )


def _rows_for_every_split(fractions: tuple[float, float]) -> int:
    """The fewest rows a group needs so that the seeded split puts one in every split."""
    rows = 1
    while True:
        n_val, n_test = (round(rows * f) for f in fractions)
        if n_val and n_test and rows - n_val - n_test > 0:
            return rows
        rows += 1


def _check_split_sizes(
    path: Path,
    examples: list[Example],
    splits: tuple[list[Example], list[Example], list[Example]],
    data: DictConfig,
) -> None:
    counts = dict(zip(SPLITS, (len(s) for s in splits), strict=True))
    if all(counts.values()):
        return
    need = _rows_for_every_split((data.validation_fraction, data.test_fraction))
    if data.task == "classification":  # the split is per label: small labels give no rows
        sizes = Counter(e.target for e in examples).values()
        grouping = f" (per label: {len(sizes)} labels of {min(sizes)} to {max(sizes)} rows)"
        minimum = f"a label needs at least {need} rows to give one to every split"
    else:
        grouping, minimum = "", f"that needs at least {need} rows"
    given = ", ".join(f"{split} {n}" for split, n in counts.items())
    raise DataError(
        f"{path}: {len(examples)} rows split by data.validation_fraction="
        f"{data.validation_fraction} and data.test_fraction={data.test_fraction}{grouping} give "
        f"{given}; every split needs at least 1 row and {minimum}. Add rows, raise "
        "data.validation_fraction / data.test_fraction, or give the splits as files: "
        "data.path=null data.train=TRAIN_FILE data.validation=VALIDATION_FILE "
        "(data.test=TEST_FILE optional)"
    )


def label_balance(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.target for e in examples).items()))
