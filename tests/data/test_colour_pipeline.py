"""Colour reaches the network: real tissue tiles whose two classes differ in hue at equal luminance.

Tiles of scikit-image's immunohistochemistry slide (real IHC histology) are tinted one way (class 1) or the other
(class 0) along a colour direction with zero ITU-R 601 luma, so each tile's gray image is the same in both classes:
a gray pipeline cannot beat chance, a colour pipeline separates them. Every tile appears once in each class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from colour_data import hue_splits, write_npz
from lightning.pytorch import Trainer, seed_everything
from torchmetrics.functional.classification import binary_auroc

from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.data.readers import to_gray
from medtransfer.models.classifier import ClassifierModule

SPLIT_PAIRS = {"train": 96, "val": 32, "test": 64}


@pytest.fixture(scope="module")
def hue_npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("hue") / "hue.npz", hue_splits(SPLIT_PAIRS))


def test_the_two_classes_have_the_same_gray_image(hue_npz):
    with np.load(hue_npz) as data:
        images = data["test_images"]
    gray = to_gray(images)
    np.testing.assert_array_equal(gray[0::2], gray[1::2])  # the gray pipeline sees identical pairs
    assert np.abs(images[0::2].astype(int) - images[1::2]).max() == 80  # while the colours differ


def _fit_and_score(path, color: str) -> tuple[float, torch.Tensor]:
    """Test AUROC of a small random-init CNN after a few epochs, and the first batch the network received (as
    0-255 pixels)."""
    seed_everything(0)
    model = ClassifierModule(backbone="test_byobnet", pretrained="none",
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))  # fmt: skip
    dm = MedMNISTDataModule(path=str(path), image_size=32, batch_size=32, color=color, rotate_degrees=0, translate=0,
                            scale=0, clahe=0, brightness_contrast=0, input_spec=model.input_spec)  # fmt: skip
    received = []
    model.register_forward_pre_hook(
        lambda module, args: received.append(args[0].detach().clone()) if not received else None
    )
    trainer = Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    outputs = model.test_outputs
    mean, std = dm.input_spec.mean, dm.input_spec.std
    pixels = received[0] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]  # undo Normalize
    return float(binary_auroc(outputs["probs"], outputs["targets"])), (pixels * 255).round()


def test_colour_pipeline_separates_hue_that_a_gray_pipeline_cannot_see(hue_npz):
    colour_auroc, colour_batch = _fit_and_score(hue_npz, "auto")
    gray_auroc, gray_batch = _fit_and_score(hue_npz, "gray")
    print(f"equal-luminance hue test: colour AUROC {colour_auroc:.3f}, forced gray AUROC {gray_auroc:.3f}")
    assert colour_batch.shape[1] == 3 and not torch.equal(colour_batch[:, 0], colour_batch[:, 1])
    assert gray_batch.shape[1] == 3 and torch.equal(gray_batch[:, 0], gray_batch[:, 1])  # gray, replicated
    assert colour_auroc >= 0.95
    assert gray_auroc <= 0.65
