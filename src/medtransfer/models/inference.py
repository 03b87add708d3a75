"""The network as it is served: normalised images in, calibrated probabilities out, with nothing of Lightning, so
it exports to MLflow and a checkpoint and its MLflow model give the same probabilities."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medtransfer.data.input_spec import InputSpec
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


def input_settings(classifier: ClassifierModule, checkpoint: dict[str, Any] | None = None) -> InputSpec:
    """The input the model was trained with: the checkpoint's, else the backbone's own; the spec's defaults (gray,
    middle frame) cover checkpoints from before colour support."""
    if checkpoint and checkpoint.get("input"):
        return InputSpec.from_dict(checkpoint["input"])
    return classifier.input_spec


@torch.no_grad()
def example_input(spec: InputSpec, batch: int = 2) -> Tensor:
    """A normalised-looking batch of the model's input shape, for export and the MLflow signature."""
    return torch.zeros(batch, spec.channels, spec.size, spec.size)
