"""EpochSummary: one readable line per epoch when no live progress bar is drawn."""

from __future__ import annotations

import re

from helpers import tiny_loaders
from lightning.pytorch import Trainer, seed_everything

from medtransfer.callbacks.epoch_summary import EpochSummary
from medtransfer.callbacks.finetuning import FreezeThenFinetune
from medtransfer.models.classifier import ClassifierModule


def test_prints_one_line_per_epoch_with_phase_and_validation_metrics(capsys, tmp_path):
    seed_everything(0)
    trainer = Trainer(
        max_epochs=2,
        callbacks=[FreezeThenFinetune(unfreeze_at_epoch=1), EpochSummary()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ClassifierModule(backbone="resnet10t", pretrained="none"), *tiny_loaders())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    assert re.fullmatch(r"epoch 1/2  phase 1  train/loss \d\.\d{4}  val/loss \d\.\d{4}  val/auroc [01]\.\d{4}  "
                        r"val/acc [01]\.\d{4}  \(\d+ s\)", lines[0])  # fmt: skip
    assert "phase 2" in lines[1]
