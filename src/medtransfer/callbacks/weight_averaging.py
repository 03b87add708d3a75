"""Exponential moving average of the weights: Lightning's ``EMAWeightAveraging`` with two upstream fixes.

Upstream's ``on_load_checkpoint`` puts the *live* weights back after ``fit``, so ``test_after_fit`` would test
un-averaged weights at a threshold fitted on averaged ones: here a checkpoint loaded outside fitting keeps its
averaged ``state_dict``. Upstream also averages the fitted buffers (threshold, temperature, class weights): here
they stay the live model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["EMA"]


class EMA(EMAWeightAveraging):
    """EMA of the weights (``decay`` per optimizer step), validated, checkpointed and tested.

    Args:
        decay: weight of the running average per optimizer step; ``1 / (1 - decay)`` steps is its memory.
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__(decay=decay)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with _keeping_own_buffers(pl_module):
            super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with _keeping_own_buffers(pl_module):
            super().on_train_end(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        live = checkpoint.get("current_model_state")
        if live is not None:
            for name, _ in pl_module.named_buffers(recurse=False):
                checkpoint["state_dict"][name] = live[name]

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


@contextmanager
def _keeping_own_buffers(module: LightningModule) -> Iterator[None]:
    """The module's own (non-recursive) buffers as they were before the block, whatever it swapped."""
    kept = {name: buffer.clone() for name, buffer in module.named_buffers(recurse=False)}
    yield
    for name, buffer in module.named_buffers(recurse=False):
        buffer.copy_(kept[name])
