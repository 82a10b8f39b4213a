"""Shared fixtures. Nothing here downloads: HF_HUB_OFFLINE is set before transformers loads."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from pathlib import Path

import pytest

from harness.config import load_config


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def make_cfg(runs: Path):
    """load_config with runs_dir in the test's temp folder."""

    def make(*overrides: str):
        return load_config([*overrides, f"paths.runs_dir={runs}"])

    return make


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
