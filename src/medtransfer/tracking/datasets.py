"""Each run's train/validation/test data as MLflow dataset inputs: the UI's Dataset column and filter, and what
``medtransfer compare`` groups runs by. Two runs share a split's digest exactly when they used the same cases.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from medtransfer.errors import DataError
from medtransfer.tracking.tags import dataset_tags

__all__ = ["DATASET_CONTEXT", "dataset_inputs", "log_dataset_inputs", "split_digest"]

#: MLflow's tag naming the role of a dataset input in a run (``train``, ``validation``, ``test``).
DATASET_CONTEXT = "mlflow.data.context"
_CONTEXT = {"train": "train", "val": "validation", "test": "test"}


def split_digest(identity: str, split: str, targets: Any) -> str:
    """16 hex digits (as MLflow shows) of SHA-256 over the dataset identity, the split name and its targets."""
    digest = hashlib.sha256(f"{identity}\t{split}\t".encode())
    digest.update(np.ascontiguousarray(np.asarray(targets, dtype=np.float32)).tobytes())
    return digest.hexdigest()[:16]


def dataset_inputs(datamodule: Any, splits: tuple[str, ...] = ("train", "val", "test")) -> list[Any]:
    """``DatasetInput`` entities of the data module's set-up splits (name ``<dataset>-<split>``, digest, source:
    the dataset's file, or ``<dataset>`` when it has none)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    tags = dataset_tags(datamodule)
    name = tags.get("dataset.name", "data")
    identity = tags.get("dataset.manifest_sha256") or tags.get("dataset.sha256") or name
    source = json.dumps({"uri": tags.get("dataset.file", name)})  # MLflow's "local" source format
    datasets = getattr(datamodule, "datasets", None) or {}
    inputs = []
    for split in splits:
        if datasets.get(split) is None:
            continue
        split_identity = identity
        try:
            targets = datasets[split].targets
        except DataError:  # prepared data streams its targets: the digest covers what prepare recorded instead
            targets = np.zeros(0)
            prepared = getattr(datamodule, "prepared_info", None)
            split_identity = f"{identity}:{getattr(prepared, 'manifest_sha256', '')}"
        digest = split_digest(split_identity, split, targets)
        dataset = Dataset(f"{name}-{split}", digest, "local", source)
        inputs.append(DatasetInput(dataset, [InputTag(DATASET_CONTEXT, _CONTEXT[split])]))
    return inputs


def log_dataset_inputs(client: Any, run_id: str, datamodule: Any, splits: tuple[str, ...] = ("train", "val", "test"))\
        -> None:  # fmt: skip
    """Log the splits as dataset inputs of ``run_id`` (MLflow keeps one copy of an input logged twice)."""
    inputs = dataset_inputs(datamodule, splits)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
