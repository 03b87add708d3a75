"""LastCheckpoint: ``last.ckpt`` follows the latest epoch even when validation stops improving."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from medtransfer.callbacks.last_checkpoint import LastCheckpoint


class NeverImproving(BoringModel):
    """Logs a validation score that is best in the first epoch and worse after."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/score", -float(self.current_epoch))


def test_last_checkpoint_is_rewritten_every_epoch_while_the_best_stays(tmp_path):
    best = ModelCheckpoint(monitor="val/score", mode="max")  # both resolve <root>/checkpoints
    trainer = Trainer(
        default_root_dir=tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[best, LastCheckpoint()],
    )  # fmt: skip
    trainer.fit(NeverImproving())
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] == 0
    folder = tmp_path / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2  # the resume point is current
    assert sorted(p.name for p in folder.glob("*.ckpt")) == sorted(["epoch=0-step=2.ckpt", "last.ckpt"])
