"""The network as it is served: normalised images in, calibrated probabilities out.

``ProbabilityModel`` holds a trained classifier's backbone, head and temperature and nothing of Lightning, so it
can be exported with ``torch.export`` into an MLflow model; batch prediction runs this same module whether the
model came from a checkpoint or from MLflow, so both give the same probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medtransfer.models.classifier import ClassifierModule, probabilities

__all__ = ["ProbabilityModel", "example_input", "input_settings"]


class ProbabilityModel(nn.Module):
    """Probabilities of a trained ``ClassifierModule``: sigmoid (binary ``(N,)``, multi-label ``(N, L)``) or
    softmax (multi-class ``(N, C)``) of the temperature-scaled logits."""

    def __init__(self, classifier: ClassifierModule) -> None:
        super().__init__()
        self.backbone, self.head = classifier.backbone, classifier.head
        self.task: str = classifier.hparams.task
        self.register_buffer("temperature", classifier.temperature.detach().clone())

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(self.backbone(images))
        return probabilities(logits.squeeze(1) if self.task == "binary" else logits, self.temperature, self.task)


def input_settings(classifier: ClassifierModule, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Image size, channels, mean, std, interpolation, colour (``gray``/``rgb``) and DICOM frame choice the model
    was trained with.

    Read from the checkpoint (the data module's settings, saved by ``ClassifierModule.on_save_checkpoint``), else
    timm's data config of the backbone. Checkpoints from before colour support hold neither setting: they were
    trained gray (``color: gray``), and multi-frame DICOMs given to them read the middle frame.
    """
    if checkpoint and checkpoint.get("input"):
        return {"color": "gray", "dicom_frame": "middle", **checkpoint["input"]}
    config = classifier.data_config
    return {
        "size": int(config["input_size"][-1]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": config.get("interpolation", "bilinear"),
        "channels": int(classifier.hparams.in_chans),
        "color": "gray",
        "dicom_frame": "middle",
    }


@torch.no_grad()
def example_input(settings: dict[str, Any], batch: int = 2) -> Tensor:
    """A normalised-looking batch of the model's input shape, for export and the MLflow signature."""
    return torch.zeros(batch, settings["channels"], settings["size"], settings["size"])
