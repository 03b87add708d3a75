"""Freeze-then-finetune: train a new head on a frozen backbone, then unfreeze (part of) the backbone."""

from __future__ import annotations

import logging
from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from medtransfer.models.backbones import backbone_blocks

__all__ = ["FreezeThenFinetune"]

_logger = logging.getLogger(__name__)


class FreezeThenFinetune(BaseFinetuning):
    """Two-phase transfer learning on a module with ``.backbone`` and ``.head``.

    Phase 1 (epochs before ``unfreeze_at_epoch``): the backbone is frozen and its BatchNorm layers stay in
    eval mode, so their ImageNet running statistics are not overwritten; only the head trains, at the
    optimizer's learning rate (1e-3 in the shipped configs). Phase 2: the top ``unfreeze_blocks`` blocks of the
    backbone (all when ``None``) join the optimizer as a ``backbone`` group at ``finetune_lr`` and the head
    drops to ``head_finetune_lr`` (``finetune_lr`` when ``None``). BatchNorm statistics stay frozen unless
    ``bn_mode="train"``.

    Unlike Lightning's ``BackboneFinetuning``, BatchNorm layers are never put in train mode by freezing
    (``train_bn=True`` there), and a run resumed in phase 2 makes the restored backbone group trainable
    again instead of leaving it frozen inside the optimizer.

    Args:
        unfreeze_at_epoch: first epoch (0-based) of phase 2.
        finetune_lr: learning rate of the unfrozen backbone blocks in phase 2.
        head_finetune_lr: learning rate of the head in phase 2; ``None`` means ``finetune_lr``.
        unfreeze_blocks: how many of the backbone's top blocks to unfreeze (timm's coarse ``group_matcher``
            blocks); ``None`` unfreezes all.
        bn_mode: ``frozen`` keeps every BatchNorm of the backbone in eval mode in both phases; ``train`` lets
            the unfrozen blocks update their statistics in phase 2.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 3,
        finetune_lr: float = 1e-5,
        head_finetune_lr: float | None = None,
        unfreeze_blocks: int | None = None,
        bn_mode: Literal["frozen", "train"] = "frozen",
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0:
            raise ValueError(f"Expected argument `unfreeze_at_epoch` to be >= 0, but got {unfreeze_at_epoch}")
        if unfreeze_blocks is not None and unfreeze_blocks < 1:
            raise ValueError(f"Expected argument `unfreeze_blocks` to be None or >= 1, but got {unfreeze_blocks}")
        if bn_mode not in ("frozen", "train"):
            raise ValueError(f"Expected argument `bn_mode` to be 'frozen' or 'train', but got {bn_mode!r}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.finetune_lr = finetune_lr
        self.head_finetune_lr = head_finetune_lr
        self.unfreeze_blocks = unfreeze_blocks
        self.bn_mode = bn_mode

    def phase(self, epoch: int) -> int:
        """1 while only the head trains, 2 once the backbone is (partly) unfrozen."""
        return 1 if epoch < self.unfreeze_at_epoch else 2

    def unfrozen_modules(self, pl_module: LightningModule) -> list[nn.Module]:
        """The backbone blocks that phase 2 trains."""
        blocks = backbone_blocks(pl_module.backbone)
        top = blocks if self.unfreeze_blocks is None else blocks[-self.unfreeze_blocks :]
        return [module for block in top for module in block]

    @staticmethod
    def batchnorm_layers(modules: nn.Module | list[nn.Module]) -> list[_BatchNorm]:
        """All BatchNorm layers inside ``modules``."""
        return [m for m in BaseFinetuning.flatten_modules(modules) if isinstance(m, _BatchNorm)]

    @staticmethod
    def freeze_parameters(modules: nn.Module | list[nn.Module]) -> None:
        """Stop gradients of ``modules``, leaving BatchNorm's ``track_running_stats`` untouched."""
        for module in BaseFinetuning.flatten_modules(modules):
            for param in module.parameters(recurse=False):
                param.requires_grad = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for attribute in ("backbone", "head"):
            if not isinstance(getattr(pl_module, attribute, None), nn.Module):
                raise MisconfigurationException(
                    f"FreezeThenFinetune needs the LightningModule to have an nn.Module `{attribute}` attribute."
                )
        super().setup(trainer, pl_module, stage)

    @override
    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze_parameters(pl_module.backbone)

    @override
    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.phase(epoch) == 1:
            return
        modules = self.unfrozen_modules(pl_module)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        BaseFinetuning.make_trainable(modules)  # also what a resumed phase-2 run needs: groups exist, grads off
        new_params = [p for p in BaseFinetuning.filter_params(modules) if id(p) not in in_optimizer]
        if new_params:
            optimizer.add_param_group({"name": "backbone", "params": new_params, "lr": self.finetune_lr})
            head_lr = self.finetune_lr if self.head_finetune_lr is None else self.head_finetune_lr
            for group in optimizer.param_groups:
                if group.get("name") == "head":
                    group["lr"] = head_lr
            _logger.info(
                "Epoch %d: phase 2, %d backbone tensors unfrozen at lr %g", epoch, len(new_params), self.finetune_lr
            )

    def _set_batchnorm_modes(self, pl_module: LightningModule, epoch: int) -> None:
        """Frozen BatchNorm layers to eval mode; with ``bn_mode='train'`` the unfrozen ones train in phase 2."""
        training = set()
        if self.bn_mode == "train" and self.phase(epoch) == 2:
            training = {id(m) for m in self.batchnorm_layers(self.unfrozen_modules(pl_module))}
        for bn in self.batchnorm_layers(pl_module.backbone):
            bn.train(id(bn) in training)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainable = self._trainable_names(pl_module)
        super().on_train_epoch_start(trainer, pl_module)
        if self._trainable_names(pl_module) != trainable:
            self.rewrap_ddp(trainer, pl_module)
        self._set_batchnorm_modes(pl_module, trainer.current_epoch)
        self._log_schedule(trainer, pl_module)

    @staticmethod
    def _trainable_names(pl_module: LightningModule) -> set[str]:
        return {name for name, p in pl_module.named_parameters() if p.requires_grad}

    @staticmethod
    def rewrap_ddp(trainer: Trainer, pl_module: LightningModule) -> None:
        """Wrap the module in DDP again after an unfreeze: DDP all-reduces only the parameters that required grad
        when it wrapped the module, so the unfrozen backbone would train on each rank's gradients alone
        (Lightning issue #20340)."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = pl_module
            strategy.configure_ddp()

    def _log_schedule(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {
            "finetune/phase": float(self.phase(trainer.current_epoch)),
            "finetune/trainable_params": float(sum(p.numel() for p in pl_module.parameters() if p.requires_grad)),
        }
        for index, group in enumerate(trainer.optimizers[0].param_groups):
            metrics[f"finetune/lr_{group.get('name', index)}"] = float(group["lr"])
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)
