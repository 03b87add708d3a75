"""Test-time augmentation: fixed small shifts and zooms, no flips, averaged in eval mode only, exported alike."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEFAULT_CONFIG
from PIL import Image

from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import run_predict
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.test_time_augmentation import augmented_views
from medtransfer.tracking.callbacks import find_mlflow_logger


def test_views_start_with_the_image_and_move_a_dot_by_five_percent_without_flipping():
    image = torch.zeros(1, 1, 40, 40)
    image[0, 0, 10, 12] = 1.0  # off-centre, so a flip would move it to the other side
    views = augmented_views(image, "shift_scale")
    assert views.shape == (7, 1, 40, 40)
    assert torch.equal(views[0], image[0])
    peaks = [divmod(int(v.argmax()), 40) for v in views]
    shifted = {(abs(r - 10), abs(c - 12)) for r, c in peaks[1:5]}
    assert shifted == {(0, 2), (2, 0)}  # 5 % of 40 px, along each axis
    assert all(c < 20 for _, c in peaks)  # never mirrored to the right half
    assert torch.equal(augmented_views(image, "none"), image)


def test_eval_mode_averages_the_views_and_training_mode_does_not():
    torch.manual_seed(0)
    model = ClassifierModule(backbone="resnet10t", pretrained="none", test_time_augmentation="shift_scale").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        per_view = model.head(model.backbone(augmented_views(x, "shift_scale"))).squeeze(1).reshape(7, 3)
        assert torch.allclose(model(x), per_view.mean(0), atol=1e-6)
        assert not torch.allclose(model(x), per_view[0], atol=1e-4)
        model.train()
        for m in model.modules():  # dropout and BatchNorm in eval, to compare only the TTA switch
            if m is not model:
                m.eval()
        assert torch.allclose(model(x), per_view[0], atol=1e-5)


@pytest.mark.slow
def test_checkpoint_and_mlflow_model_predict_alike_with_tta(workdir, pneumonia_npz):
    cli = build_cli([
        "fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
        "--data.image_size=32", "--trainer.enable_progress_bar=false", "--model.test_time_augmentation=shift_scale",
    ])  # fmt: skip
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert torch.load(best, weights_only=True)["hyper_parameters"]["test_time_augmentation"] == "shift_scale"
    images = np.load(pneumonia_npz)["test_images"][:12]
    folder = workdir / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    run_id = find_mlflow_logger(cli.trainer).run_id
    probabilities = []
    for model in (str(best), f"runs:/{run_id}/model"):
        out = workdir / f"{len(probabilities)}.csv"
        run_predict(str(folder), model, output=out)
        with out.open() as handle:
            probabilities.append([float(row["prob_pneumonia"]) for row in csv.DictReader(handle)])
    assert probabilities[0] == pytest.approx(probabilities[1], abs=1e-5)
