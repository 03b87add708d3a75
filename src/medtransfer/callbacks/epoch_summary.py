"""One line per epoch for logs: when the live progress bar is off or output is not a terminal."""

from __future__ import annotations

import sys
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["EpochSummary"]

_SHOWN = ("finetune/phase", "train/loss", "val/loss", "val/auroc", "val/acc")


class EpochSummary(Callback):
    """Print ``epoch 3/13  phase 2  train/loss 0.21  val/auroc 0.953  (17 s)`` at the end of each epoch, unless
    a live progress bar draws on a terminal (it draws nothing into ``make fit > log``)."""

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self._started = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    @override
    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.always or trainer.progress_bar_callback is None or not sys.stdout.isatty()):
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in _SHOWN:
            if key in metrics:
                value = float(metrics[key])
                parts.append(f"phase {value:.0f}" if key == "finetune/phase" else f"{key} {value:.4f}")
        parts.append(f"({time.perf_counter() - self._started:.0f} s)")
        print("  ".join(parts), flush=True)
