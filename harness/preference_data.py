"""Preference pairs (data.task=preference): a prompt, the answer preferred and one not, what
preference tuning (DPO) trains on.

Two row shapes, one per file:
- OpenAI's and Together's: ``{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", "content": ...}], "non_preferred_output": [...]}``, the input ending with the user
  message the answers reply to;
- TRL's: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each text, or (TRL's
  conversational form) the prompt a list of messages and each answer a list of one assistant
  message.
A CSV cell may hold any of these values as JSON. Every rule an API or a trainer would apply to a
pair is checked here, at the record's file:line: an answer that is not one assistant message
with text, an input that does not end with a user message, a pair whose two answers are the same
(it would teach nothing).
"""

from __future__ import annotations

import json
from typing import Any

from harness.data import CHAT_ROLES, DataError, Example

OPENAI_PAIR, TRL_PAIR = "preference/openai", "preference/trl"
# how each shape looks, for error messages
PREFERENCE_SHAPES = {
    OPENAI_PAIR: 'preference ({"input", "preferred_output", "non_preferred_output"})',
    TRL_PAIR: 'preference ({"prompt", "chosen", "rejected"})',
}
OPENAI_ANSWERS = ("preferred_output", "non_preferred_output")
TRL_ANSWERS = ("chosen", "rejected")


def preference_format(record: dict[str, Any]) -> str | None:
    """The preference shape a record has, by its answers' fields; None: not a pair."""
    if any(name in record for name in OPENAI_ANSWERS):
        return OPENAI_PAIR
    if any(name in record for name in TRL_ANSWERS):
        return TRL_PAIR
    return None


def check_task_fits(task: str, row_format: str, shape: str, where: str) -> None:
    """Preference pairs are read as data.task=preference and only so."""
    pair = row_format in PREFERENCE_SHAPES
    if task == "preference" and not pair:
        raise DataError(
            f"{where}: data.task=preference needs preference pairs, "
            f"{PREFERENCE_SHAPES[OPENAI_PAIR]} or {PREFERENCE_SHAPES[TRL_PAIR]}; this row is "
            f"{shape}"
        )
    if pair and task != "preference":
        raise DataError(
            f"{where}: this row is a {shape} pair; data.task={task} cannot read it: use "
            "data.task=preference (trained with train.method=dpo)"
        )


def preference_example(
    record: dict[str, Any], row_format: str, prompt_field: str, where: str
) -> Example:
    """The pair as an Example: text the last user message, target the preferred answer,
    rejected the other, messages the input turns."""
    if row_format == OPENAI_PAIR:
        source = _json_cell(_required(record, "input", where), "input", where)
        if not isinstance(source, dict) or "messages" not in source:
            raise DataError(f"{where}: 'input' must be an object with 'messages': a list of turns")
        turns = _input_turns(source["messages"], "input.messages", where)
        names = OPENAI_ANSWERS
    else:
        prompt = _text_or_list(_required(record, prompt_field, where))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        turns = _input_turns(prompt, prompt_field, where)
        names = TRL_ANSWERS
    preferred, rejected = (_answer(record, name, where) for name in names)
    if " ".join(preferred.split()) == " ".join(rejected.split()):
        raise DataError(
            f"{where}: {names[0]!r} and {names[1]!r} are the same answer; a pair teaches "
            "something only where the answers differ: fix one or drop the row"
        )
    return Example(turns[-1]["content"].strip(), preferred, where, turns, rejected)


def _required(record: dict[str, Any], name: str, where: str) -> Any:
    if record.get(name) is None:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    return record[name]


def _json_cell(value: Any, name: str, where: str) -> Any:
    """A CSV cell holds a list or an object as JSON text; a JSON row holds it as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: {name!r}: bad JSON: {exc.msg}") from exc
    return value


def _text_or_list(value: Any) -> Any:
    """TRL's fields are text or lists: text that reads as a JSON list (a CSV cell) is the list,
    any other text ("[urgent] ...") stays text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _input_turns(value: Any, name: str, where: str) -> tuple[dict[str, str], ...]:
    """The turns before the answers: known roles, text content, a user message last."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name!r} must be a non-empty list of messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: {name} message {index} needs a role in {sorted(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {name} message {index} needs text 'content'")
    last = value[-1]
    if last["role"] != "user":
        raise DataError(
            f"{where}: {name!r} must end with the user message the answers reply to; it ends "
            f"with a {last['role']} message"
        )
    if not last["content"].strip():
        raise DataError(f"{where}: {name!r}: the last user message (the prompt) is empty")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _answer(record: dict[str, Any], name: str, where: str) -> str:
    """One answer's text: a list of exactly one assistant message (TRL's plain text too)."""
    value = _required(record, name, where)
    value = _text_or_list(value) if name in TRL_ANSWERS else _json_cell(value, name, where)
    if isinstance(value, str) and name in TRL_ANSWERS:
        value = [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or len(value) != 1:
        count = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
        raise DataError(
            f"{where}: {name!r} must be a list of exactly one assistant message, got {count}"
        )
    message = value[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        role = message.get("role") if isinstance(message, dict) else type(message).__name__
        raise DataError(f"{where}: {name!r} must be an assistant message, got role {role!r}")
    content = message.get("content")
    if not isinstance(content, str):
        raise DataError(f"{where}: {name!r}: the assistant message needs text 'content'")
    if not content.strip():
        raise DataError(f"{where}: {name!r}: the assistant message is empty")
    return content.strip()
