"""Freeze-then-finetune: train a new head on a frozen backbone, then unfreeze (part of) the backbone."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from typing_extensions import override

from medtransfer.models.backbones import backbone_blocks
from medtransfer.upstream import extend_scheduler, rewrap_ddp

__all__ = ["FreezeThenFinetune", "phase_lr_factor"]

Schedule = Literal["constant", "cosine", "onecycle"]


def phase_lr_factor(schedule: Schedule, progress: float, warmup_fraction: float) -> float:
    """The share of a group's peak learning rate at ``progress`` (0 to 1) through a phase.

    ``cosine``: linear warm-up from 0, then cosine decay to 0. ``onecycle``: ``OneCycleLR``'s shape (warm-up
    from 1/25 of the peak, anneal to 1e-4 of it). Not torch's schedulers: they fix their parameter groups at
    construction, so the group added at the unfreeze would be left out or break them.
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    start, end = (0.0, 0.0) if schedule == "cosine" else (1 / 25, 1e-4)
    if warmup_fraction > 0 and progress < warmup_fraction:
        warm = (progress + 1e-12) / warmup_fraction
        return start + (1.0 - start) * warm if schedule == "onecycle" else max(warm, 1e-3)
    rest = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-12)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * rest))


_logger = logging.getLogger(__name__)


class FreezeThenFinetune(BaseFinetuning):
    """Two-phase transfer learning on a module with ``.backbone`` and ``.head``.

    Phase 1: the backbone is frozen, its BatchNorm in eval mode (ImageNet statistics kept), and only the head
    trains. Phase 2: the top ``unfreeze_blocks`` backbone blocks join the optimizer as a ``backbone`` group (one
    ``backbone.<block>`` group per block with ``lr_decay < 1``, timm's layer decay).

    Unlike Lightning's ``BackboneFinetuning``, freezing never puts BatchNorm in train mode, and a run resumed in
    phase 2 makes the restored backbone group trainable again instead of leaving it frozen in the optimizer.

    Args:
        unfreeze_at_epoch: first epoch (0-based) of phase 2.
        finetune_lr: learning rate of the unfrozen backbone blocks in phase 2.
        head_finetune_lr: learning rate of the head in phase 2; ``None`` means ``finetune_lr``.
        unfreeze_blocks: how many of the backbone's top (timm ``group_matcher``) blocks to unfreeze; ``None``: all.
        bn_mode: ``frozen`` keeps the backbone's BatchNorm in eval mode; ``train`` lets unfrozen blocks update it.
        lr_decay: factor between the learning rates of neighbouring backbone blocks; 1 keeps one ``backbone`` group.
        schedule: learning-rate shape within each phase: ``constant``, ``cosine`` or ``onecycle``.
        warmup_fraction: share of each phase spent warming up (``cosine`` and ``onecycle``).
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 3,
        finetune_lr: float = 1e-5,
        head_finetune_lr: float | None = None,
        unfreeze_blocks: int | None = None,
        bn_mode: Literal["frozen", "train"] = "frozen",
        lr_decay: float = 1.0,
        schedule: Schedule = "constant",
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0:
            raise ValueError(f"Expected argument `unfreeze_at_epoch` to be >= 0, but got {unfreeze_at_epoch}")
        if unfreeze_blocks is not None and unfreeze_blocks < 1:
            raise ValueError(f"Expected argument `unfreeze_blocks` to be None or >= 1, but got {unfreeze_blocks}")
        if bn_mode not in ("frozen", "train"):
            raise ValueError(f"Expected argument `bn_mode` to be 'frozen' or 'train', but got {bn_mode!r}")
        if not 0.0 < lr_decay <= 1.0:
            raise ValueError(f"Expected argument `lr_decay` to be in (0, 1], but got {lr_decay}")
        if schedule not in ("constant", "cosine", "onecycle"):
            raise ValueError(f"Expected argument `schedule` to be constant, cosine or onecycle, but got {schedule!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"Expected argument `warmup_fraction` to be in [0, 1), but got {warmup_fraction}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.finetune_lr = finetune_lr
        self.head_finetune_lr = head_finetune_lr
        self.unfreeze_blocks = unfreeze_blocks
        self.bn_mode = bn_mode
        self.lr_decay = lr_decay
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction

    def phase(self, epoch: int) -> int:
        """1 while only the head trains, 2 once the backbone is (partly) unfrozen."""
        return 1 if epoch < self.unfreeze_at_epoch else 2

    def unfrozen_blocks(self, pl_module: LightningModule) -> list[tuple[int, list[nn.Module]]]:
        """The backbone blocks that phase 2 trains, as ``(block index, modules)``, input to output."""
        blocks = list(enumerate(backbone_blocks(pl_module.backbone)))
        return blocks if self.unfreeze_blocks is None else blocks[-self.unfreeze_blocks :]

    def unfrozen_modules(self, pl_module: LightningModule) -> list[nn.Module]:
        """The backbone modules that phase 2 trains."""
        return [module for _, block in self.unfrozen_blocks(pl_module) for module in block]

    def backbone_groups(self, pl_module: LightningModule) -> list[tuple[str, float, list[nn.Module]]]:
        """``(name, lr, modules)`` of the phase-2 groups: one ``backbone``, or one per block (``lr_decay < 1``)."""
        if self.lr_decay == 1.0:
            return [("backbone", self.finetune_lr, self.unfrozen_modules(pl_module))]
        blocks = self.unfrozen_blocks(pl_module)
        return [
            (f"backbone.{index}", self.finetune_lr * self.lr_decay ** (len(blocks) - 1 - rank), modules)
            for rank, (index, modules) in enumerate(blocks)
        ]

    @staticmethod
    def batchnorm_layers(modules: nn.Module | list[nn.Module]) -> list[_BatchNorm]:
        """All BatchNorm layers inside ``modules``."""
        return [m for m in BaseFinetuning.flatten_modules(modules) if isinstance(m, _BatchNorm)]

    @staticmethod
    def freeze_parameters(modules: nn.Module | list[nn.Module]) -> None:
        """Stop gradients of ``modules``, leaving BatchNorm's ``track_running_stats`` untouched."""
        for param in BaseFinetuning.filter_params(modules):
            param.requires_grad = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for attribute in ("backbone", "head"):
            if not isinstance(getattr(pl_module, attribute, None), nn.Module):
                raise MisconfigurationException(
                    f"FreezeThenFinetune needs the LightningModule to have an nn.Module `{attribute}` attribute."
                )
        if self.schedule != "constant" and getattr(pl_module, "scheduler_factory", None) is not None:
            raise MisconfigurationException(
                f"finetuning.schedule={self.schedule} and model.scheduler both set the learning rate; "
                "keep one of them (finetuning.schedule: constant, or model.scheduler: null)."
            )
        if self.schedule != "constant" and stage == "fit" and (trainer.max_epochs or -1) < 1:
            raise MisconfigurationException(f"finetuning.schedule={self.schedule} needs trainer.max_epochs >= 1.")
        super().setup(trainer, pl_module, stage)

    @override
    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze_parameters(pl_module.backbone)

    @override
    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.phase(epoch) == 1:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        BaseFinetuning.make_trainable(self.unfrozen_modules(pl_module))  # a resumed phase 2 needs this too
        added = 0
        for name, lr, modules in self.backbone_groups(pl_module):
            new_params = [p for p in BaseFinetuning.filter_params(modules) if id(p) not in in_optimizer]
            if new_params:
                optimizer.add_param_group({"name": name, "params": new_params, "lr": lr, "peak_lr": lr})
                added += len(new_params)
        if added:
            head_lr = self.finetune_lr if self.head_finetune_lr is None else self.head_finetune_lr
            for group in optimizer.param_groups:
                if group.get("name") == "head":
                    group["lr"] = group["peak_lr"] = head_lr
            _logger.info("Epoch %d: phase 2, %d backbone tensors unfrozen at lr %g", epoch, added, self.finetune_lr)

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
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:  # the phase-1 peak: the optimizer's own learning rate
            group.setdefault("peak_lr", group["lr"])
        groups_before = len(optimizer.param_groups)
        super().on_train_epoch_start(trainer, pl_module)
        if self._trainable_names(pl_module) != trainable:
            rewrap_ddp(trainer, pl_module)
        for config in trainer.lr_scheduler_configs:  # torch's schedulers know only the groups they were built with
            for group in optimizer.param_groups[groups_before:]:
                extend_scheduler(config.scheduler, group)
        self._set_batchnorm_modes(pl_module, trainer.current_epoch)
        self._log_schedule(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.schedule == "constant":
            return
        epoch, end = trainer.current_epoch, trainer.max_epochs
        first, last = (0, min(self.unfreeze_at_epoch, end)) if self.phase(epoch) == 1 else (self.unfreeze_at_epoch, end)
        batches = max(int(trainer.num_training_batches), 1)
        progress = ((epoch - first) * batches + batch_idx) / max((last - first) * batches, 1)
        factor = phase_lr_factor(self.schedule, progress, self.warmup_fraction)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group.get("peak_lr", group["lr"]) * factor

    @staticmethod
    def _trainable_names(pl_module: LightningModule) -> set[str]:
        return {name for name, p in pl_module.named_parameters() if p.requires_grad}

    def _log_schedule(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {
            "finetune/phase": float(self.phase(trainer.current_epoch)),
            "finetune/trainable_params": float(sum(p.numel() for p in pl_module.parameters() if p.requires_grad)),
        }
        for index, group in enumerate(trainer.optimizers[0].param_groups):
            metrics[f"finetune/lr_{group.get('name', index)}"] = float(group["lr"])
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)
