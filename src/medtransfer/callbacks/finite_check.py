"""Stop a run at the first NaN or infinite training loss or model output, with a message naming the step.

A NaN loss does not stop Lightning (``detect_anomaly=True`` does, several times slower); training would go on
with NaN weights. This is one ``isfinite`` per batch: the loss before ``backward`` and the evaluation output.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from medtransfer.errors import MedtransferError

__all__ = ["FiniteCheck", "NonFiniteError"]

_STAGES = {"validate": "validation", "sanity_check": "sanity-check validation", "test": "test", "predict": "predict"}


class NonFiniteError(MedtransferError, FloatingPointError):
    """A training loss or model output is NaN or infinite; the message names the stage, epoch and step."""


class FiniteCheck(Callback):
    """Raise :class:`NonFiniteError` (a ``MedtransferError``: one line, exit status 2) at the first non-finite
    training loss or evaluation output.

    Args:
        check_outputs: also check the model's output (logits) in validation, test and predict batches.
    """

    def __init__(self, check_outputs: bool = True) -> None:
        self.check_outputs = check_outputs
        self._batch_idx = 0
        self._handle: RemovableHandle | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.check_outputs and self._handle is None:
            self._handle = pl_module.register_forward_hook(self._make_output_hook(trainer))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"Training loss is {_describe(loss)} at epoch {trainer.current_epoch}, step {trainer.global_step} "
                f"(batch {self._batch_idx}): lower the learning rate (e.g. model.optimizer.init_args.lr), add "
                "gradient clipping (trainer.gradient_clip_val) or check the data for NaN/inf values"
            )

    def _make_output_hook(self, trainer: Trainer) -> Any:
        def check(module: LightningModule, args: Any, output: Any) -> None:
            if trainer.training or not isinstance(output, Tensor) or not output.is_floating_point():
                return  # in training the loss is checked before backward
            if not bool(torch.isfinite(output.detach()).all()):
                stage = _STAGES.get(getattr(trainer.state.stage, "value", None), "evaluation")
                raise NonFiniteError(
                    f"The model's {stage} output (logits) holds {_describe(output)} at epoch {trainer.current_epoch}, "
                    f"after step {trainer.global_step}: the weights or the input hold NaN/inf; lower the learning "
                    "rate or check the data and the checkpoint"
                )

        return check


def _describe(tensor: Tensor) -> str:
    """``nan`` / ``inf`` for a scalar, else how many values are NaN and how many infinite."""
    tensor = tensor.detach()
    if tensor.numel() == 1:
        return str(float(tensor))
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    return f"{nan} NaN and {inf} infinite of {tensor.numel()} values"
