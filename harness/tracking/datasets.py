"""The study's data files as MLflow dataset inputs (the runs table's Dataset column)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from harness.data import file_sha256, split_files

# A split's MLflow dataset context (the tag the runs table shows beside the dataset's name)
CONTEXTS = {"train": "training", "validation": "validation", "test": "test"}


def dataset_inputs(data: DictConfig, hashes: Mapping[str, str]) -> list[Any]:
    """The study's data as MLflow dataset inputs, one per split: they fill the runs table's
    Dataset column and its dataset filter. Digest: the file's sha256, as much of it as MLflow
    keeps (36 characters); source: the file. Each split is named ``<file>:<split>`` because
    MLflow keeps one input per name and digest, and one file may hold all three splits (its
    seeded split is then the dataset's profile)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    files = split_files(data)
    profile = None
    if data.path:
        profile = json.dumps(
            {
                "split_seed": data.split_seed,
                "validation_fraction": data.validation_fraction,
                "test_fraction": data.test_fraction,
            }
        )
    digests = {  # the sha256 the loader took, else read here
        path: (hashes.get(str(path)) or file_sha256(path))[:36] for path in set(files.values())
    }
    return [
        DatasetInput(
            Dataset(
                name=f"{path.name}:{split}",
                digest=digests[path],
                source_type="local",
                source=json.dumps({"uri": str(path)}),
                profile=profile,
            ),
            [InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])],
        )
        for split, path in files.items()
    ]
