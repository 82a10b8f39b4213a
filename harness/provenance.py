"""What it takes to repeat a run: code version, library versions, data content hashes."""

from __future__ import annotations

import subprocess
from importlib import metadata

from harness.config import PROJECT_ROOT

LIBRARIES = ("torch", "transformers", "optuna", "mlflow", "hydra-core", "harness")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown"}
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "not installed"
    return versions


def provenance(file_hashes: dict[str, str], seed: int) -> dict[str, str]:
    """Flat tags: git commit and dirtiness, library versions, sha256 of each data file, seed."""
    data = {
        f"data.sha256.{path.rsplit('/', 1)[-1]}": digest for path, digest in file_hashes.items()
    }
    return {**git_state(), **library_versions(), **data, "seed": str(seed)}
