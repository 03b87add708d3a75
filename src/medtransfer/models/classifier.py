"""The LightningModule medtransfer trains: a timm backbone plus a new task head."""

from __future__ import annotations

from typing import Any, Literal

import timm
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import AUROC, Accuracy

from medtransfer.models.backbones import create_backbone

__all__ = ["ClassifierModule"]

Task = Literal["binary", "multiclass"]


def _stage_metrics(task: Task, num_classes: int, stage: str) -> MetricCollection:
    kwargs: dict[str, Any] = {"task": task} if task == "binary" else {"task": task, "num_classes": num_classes}
    return MetricCollection({"auroc": AUROC(**kwargs), "acc": Accuracy(**kwargs)}, prefix=f"{stage}/")


class ClassifierModule(LightningModule):
    """Image classifier on a timm backbone, with ``.backbone`` and ``.head`` for the finetuning callback.

    Args:
        backbone: timm model name (``tf_efficientnet_lite0``, ``densenet121``, ``resnet50``, ...).
        pretrained: ``hub``, ``none``, ``lite0-package`` or a checkpoint path (see ``create_backbone``).
        task: ``binary`` (one logit, BCE) or ``multiclass`` (softmax, cross-entropy).
        num_classes: number of classes; 2 for a binary task.
        in_chans: input channels the backbone expects (3: grayscale replicated; 1: adapted first conv).
        drop_rate: dropout before the new head.
        optimizer: optimizer factory; its learning rate is the head's (phase 1) learning rate.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "hub",
        task: Task = "binary",
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__()
        if task == "binary" and num_classes != 2:
            raise ValueError(f"Expected argument `num_classes` to be 2 for a binary task, but got {num_classes}")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be at least 2, but got {num_classes}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.backbone = create_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
        out_features = 1 if task == "binary" else num_classes
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.backbone.num_features, out_features))
        #: timm's data config of the backbone (mean, std, input size), used by the data module.
        self.data_config: dict[str, Any] = timm.data.resolve_model_data_config(self.backbone)
        self.train_metrics = _stage_metrics(task, num_classes, "train")
        self.val_metrics = _stage_metrics(task, num_classes, "val")
        self.test_metrics = _stage_metrics(task, num_classes, "test")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits: shape ``(N,)`` for a binary task, ``(N, C)`` otherwise."""
        logits = self.head(self.backbone(x))
        return logits.squeeze(1) if self.hparams.task == "binary" else logits

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Probabilities from logits: of the positive class (binary) or per class (multiclass)."""
        return logits.sigmoid() if self.hparams.task == "binary" else logits.softmax(dim=-1)

    def model_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Shared by every stage: returns loss, probabilities and targets."""
        x, y = batch
        logits = self(x)
        if self.hparams.task == "binary":
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y.float())
        else:
            loss = nn.functional.cross_entropy(logits, y)
        return loss, self.predict_proba(logits.detach()), y

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        loss, probs, y = self.model_step(batch)
        metrics.update(probs, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predict_proba(self(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimizer over the parameters trainable now, in named groups (``head``, ``backbone``).

        While the finetuning callback keeps the backbone frozen, only the head group exists; the callback
        adds the backbone group when it unfreezes it.
        """
        groups = []
        for name, module in (("head", self.head), ("backbone", self.backbone)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params})
        return self.optimizer_factory(groups)
