"""What a study is: a fingerprint stored with it and compared on every resume.

A study answers one question: which hyperparameters are best for this task, on this data, with
this model and backend, by this objective. Resuming a study under the same name with any of those
changed would add trials of another question to it and report one "best" for both, so a resume
with a different fingerprint is refused before anything is written (``differences``). The search
space is not part of it: widening a range is a supported move (see harness.continuation).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.data import Dataset, Example

# compared on resume, in the order differences are listed
COMPARED = ("task", "data", "labels", "model", "backend", "objectives")


def fingerprint(
    cfg: DictConfig, dataset: Dataset, backend: str, objectives: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """A plain (JSON-able) description of what defines the study of ``cfg``."""
    return {
        "task": str(cfg.data.task),
        # the content of each split, so a changed file, field or split seed all show
        "data": {
            split: _digest(getattr(dataset, split)) for split in ("train", "validation", "test")
        },
        "labels": list(dataset.labels),
        "model": model_identity(cfg),
        "backend": backend,
        "objectives": [[metric, direction] for metric, direction in objectives],
        # for messages only: which files the data came from
        "data_files": {path: digest[:12] for path, digest in dataset.file_hashes.items()},
    }


def model_identity(cfg: DictConfig) -> Any:
    """The hosted backend's base model, else the local model's config minus its searched keys,
    and its adapter (a LoRA study asks another question than a full fine-tuning one)."""
    hosted = cfg.backend.get("model")
    if hosted:
        return str(hosted)
    searched = set(cfg.search.space)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    identity = {str(k): v for k, v in model.items() if f"model.{k!s}" not in searched}
    # Written only where they differ from what every study had before these keys existed (a
    # GPT-2, no adapter), so that those studies keep their fingerprint and resume
    if identity.get("architecture") == "gpt2":
        del identity["architecture"]
    if cfg.adapter.name != "none":
        identity["adapter"] = str(cfg.adapter.name)
    return identity


def _digest(examples: Sequence[Example]) -> str:
    rows = [[e.text, e.target, list(e.messages)] for e in examples]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per compared part that differs, ``what: stored -> current``."""
    lines = []
    for key in COMPARED:
        if stored.get(key) == current.get(key):
            continue
        if key == "data":
            before, after = _files(stored), _files(current)
            if before == after:  # same files, other split settings or fields
                before, after = _splits(stored), _splits(current)
            lines.append(f"data: {before} -> {after}")
        else:
            lines.append(f"{key}: {_show(stored.get(key))} -> {_show(current.get(key))}")
    return lines


def suggested_name(study: str, stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """A name for the new study: the data file's stem when the data changed, else the study's
    name with what changed (``sentiment_tiny-fake``)."""
    if stored.get("data") != current.get("data") and current.get("data_files"):
        stem = str(next(iter(current["data_files"]))).replace("\\", "/").rsplit("/", 1)[-1]
        return _clean(stem.rsplit(".", 1)[0])
    if stored.get("backend") != current.get("backend"):
        short = str(current.get("backend", "")).removesuffix("Backend").lower()
        return _clean(f"{study}-{short}")
    return f"{study}-2"


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "study"


def _files(fp: Mapping[str, Any]) -> str:
    files = fp.get("data_files") or {}
    return ", ".join(f"{path} (sha256 {digest})" for path, digest in files.items()) or "?"


def _splits(fp: Mapping[str, Any]) -> str:
    data = fp.get("data") or {}
    return "splits " + ", ".join(f"{split} {digest}" for split, digest in data.items())


def _show(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value) or "(none)"
    if isinstance(value, list):
        return ", ".join(" ".join(str(x) for x in v) for v in value)
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
