"""An untrained medtransfer checkpoint, written without a fit: fault tests need a model to run predict, not a
good one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from medtransfer.models.classifier import ClassifierModule


def write_untrained_checkpoint(
    path: Path, class_names: Sequence[str] = ("normal", "pneumonia"), task: str = "binary"
) -> Path:
    """EfficientNet-Lite0 (offline ImageNet weights) for 32 px input, saved as ``medtransfer fit`` would; binary
    by default, or a ``multilabel``/``multiclass`` model with one output per class name."""
    torch.manual_seed(0)
    classes = 2 if task == "binary" else len(class_names)
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="lite0-package", task=task,
                             num_classes=classes)  # fmt: skip
    settings = {"size": 32, "mean": list(model.input_spec.mean), "std": list(model.input_spec.std)}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": {**dict(model.hparams), "pretrained": "none"},
         "pytorch-lightning_version": "2.6.0", "class_names": list(class_names),
         "input": {**settings, "interpolation": "bilinear", "channels": 3}},
        path,
    )  # fmt: skip
    return path
