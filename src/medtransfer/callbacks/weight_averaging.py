"""Exponential moving average of the weights: Lightning's ``EMAWeightAveraging``, kept when the best checkpoint is
tested right after fitting.

Lightning validates and checkpoints the averaged weights (the checkpoint's ``state_dict``; the live ones go to
``current_model_state``), and its ``on_load_checkpoint`` puts the *live* weights back whenever the callback holds an
averaged model, which it still does after ``fit``. So ``test_after_fit`` (``trainer.test(ckpt_path="best")``)
would measure the un-averaged weights, and the decision threshold fitted on the averaged ones. Here a checkpoint
loaded outside fitting keeps its ``state_dict``: what was validated is what is tested, predicted and exported.
Resuming a fit (``--ckpt_path last``) restores both, as upstream does.
"""

from __future__ import annotations

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
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
