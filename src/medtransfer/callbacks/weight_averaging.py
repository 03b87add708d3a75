"""Exponential moving average of the weights: Lightning's ``EMAWeightAveraging``, kept when the best checkpoint is
tested right after fitting.

Lightning validates and checkpoints the averaged weights (the checkpoint's ``state_dict``; the live ones go to
``current_model_state``), and its ``on_load_checkpoint`` puts the *live* weights back whenever the callback holds an
averaged model, which it still does after ``fit``. So ``test_after_fit`` (``trainer.test(ckpt_path="best")``)
would measure the un-averaged weights, and the decision threshold fitted on the averaged ones. Here a checkpoint
loaded outside fitting keeps its ``state_dict``: what was validated is what is tested, predicted and exported.
Resuming a fit (``--ckpt_path last``) restores both, as upstream does.

The module's own buffers (the decision threshold, temperature and abstention cut-off fitted on validation, the
class weights) are not weights to average: upstream swaps them out with the parameters, so validation ran with an
average of old thresholds and the checkpoint kept it instead of the one just fitted. Here they stay the live
model's throughout, and the checkpoint's ``state_dict`` carries the fitted ones.
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
    """EMA of every parameter and buffer (``decay`` per optimizer step), validated, checkpointed and tested.

    Args:
        decay: weight of the running average per step; ``1 / (1 - decay)`` steps is its memory (0.99: about 100
            steps, two epochs of PneumoniaMNIST at batch 64). Updated after every optimizer step.
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
