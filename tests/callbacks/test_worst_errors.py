"""WorstErrorsGallery: the k most confidently wrong images, found without keeping the split in memory, drawn
with label, probability and Grad-CAM heatmap, and logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_loaders
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.callbacks.worst_errors import WorstErrorsGallery, denormalise, plot_gallery
from medtransfer.models.classifier import ClassifierModule

BACKBONE = "resnet10t"  # small; timm's forward_features/forward_head split, so Grad-CAM works


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> Trainer:
    options = {"logger": False, "enable_checkpointing": False} | kwargs
    return Trainer(
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        **options,
    )  # fmt: skip


def _reference(model: ClassifierModule, loader: DataLoader, k: int) -> pd.DataFrame:
    """Brute force over the whole split, batch by batch like the loader: the k wrong cases with the lowest
    probability of their true label."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader]).long()
    probs = model.predict_proba(logits)
    decisions = model.decide(probs)
    if model.hparams.task == "binary":
        prob_label = torch.where(labels == 1, probs, 1 - probs)
    else:
        prob_label = probs.gather(1, labels[:, None]).squeeze(1)
    table = pd.DataFrame({"index": range(len(labels)), "label": labels, "decision": decisions, "p": prob_label})
    return table[table.label != table.decision].sort_values(["p", "index"]).head(k)


def test_denormalise_undoes_the_input_normalisation():
    image = np.random.default_rng(0).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = (torch.from_numpy(image).permute(2, 0, 1) / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert np.array_equal(denormalise(x, mean, std), image)
    gray = (torch.from_numpy(image[..., :1]).permute(2, 0, 1) / 255 - np.mean(mean)) / np.mean(std)
    assert np.array_equal(denormalise(gray.float(), mean, std), image[..., 0])  # gray input, RGB statistics


def test_gallery_has_one_captioned_panel_per_image():
    pictures = [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 255, np.uint8)]
    fig = plot_gallery(pictures, ["a", "b", "c"], ncols=2, title="t")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 4 and [ax.get_title() for ax in shown] == ["a", "b", "c"]


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="Expected argument `k` to be at least 1, but got 0"):
        WorstErrorsGallery(k=0)


def test_binary_gallery_lists_the_most_confidently_wrong_validation_images(tmp_path):
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    _, val = tiny_loaders(n=48, batch_size=8, signal=0.3)
    gallery = WorstErrorsGallery(k=4, heatmap=False, dirpath=str(tmp_path / "out"))
    _trainer(tmp_path, [gallery]).validate(model, val)
    assert sum(len(heap) for heap in gallery._heaps.values()) <= 2 * gallery.k  # bounded, not the whole split
    table = pd.read_csv(tmp_path / "out" / "worst_errors_val.csv")
    expected = _reference(model, val, k=4)
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert list(table["index"]) == list(expected["index"])
    assert (table["label"] != table["decision"]).all()
    assert table["prob_label"].to_numpy() == pytest.approx(expected["p"].to_numpy(), abs=1e-6)
    positive = table["label"] == 1
    assert table["prob"][positive].to_numpy() == pytest.approx(table["prob_label"][positive].to_numpy())
    assert Image.open(tmp_path / "out" / "worst_errors_val.png").size[0] > 0


def test_multiclass_gallery_ranks_by_the_probability_of_the_true_class(tmp_path):
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none", task="multiclass", num_classes=3)
    data = TensorDataset(torch.randn(30, 3, 32, 32), torch.arange(30) % 3)
    val = DataLoader(data, batch_size=8)
    gallery = WorstErrorsGallery(k=5, heatmap=False, dirpath=str(tmp_path))
    _trainer(tmp_path, [gallery]).validate(model, val)
    table = pd.read_csv(tmp_path / "worst_errors_val.csv")
    expected = _reference(model, val, k=5)
    assert list(table["index"]) == list(expected["index"])
    assert list(table["decision"]) == list(expected["decision"])
    assert (table["prob"] >= table["prob_label"]).all()  # the decided class is the most probable one


def test_test_gallery_with_heatmaps_is_an_mlflow_artifact(tmp_path):
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none")
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    gallery = WorstErrorsGallery(k=3)
    _trainer(tmp_path, [gallery], logger=logger).test(model, tiny_loaders(n=24)[1])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "diagnostics")}
    assert artifacts == {"diagnostics/worst_errors_test.png", "diagnostics/worst_errors_test.csv"}
    assert all(path.parent.name == "diagnostics" and path.is_file() for path in gallery.paths)


class FileProbe(Callback):
    """At the end of each training epoch (after its validation): is the validation gallery there yet?"""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(self.path.is_file())


@pytest.mark.parametrize(("every_n_epochs", "during_fit"), [(0, [False, False]), (1, [True, True])])
def test_fit_draws_the_last_validation_epoch_or_every_n(tmp_path, every_n_epochs, during_fit):
    seed_everything(0)
    target = tmp_path / "worst_errors_val.csv"
    probe = FileProbe(target)
    gallery = WorstErrorsGallery(k=2, every_n_epochs=every_n_epochs, heatmap=False, dirpath=str(tmp_path))
    trainer = _trainer(tmp_path, [gallery, probe], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1)
    trainer.fit(ClassifierModule(backbone=BACKBONE, pretrained="none"), *tiny_loaders(n=16))
    assert probe.seen == during_fit  # the sanity check draws nothing
    assert target.is_file()


def test_multilabel_gallery_ranks_image_finding_pairs_each_at_its_own_threshold(tmp_path):
    seed_everything(0)
    model = ClassifierModule(backbone=BACKBONE, pretrained="none", task="multilabel", num_classes=3)
    with torch.no_grad():  # confident, finding-specific outputs: errors far from 0.5, thresholds apart
        model.head[1].weight.mul_(30)
        model.head[1].bias.copy_(torch.tensor([1.5, -1.5, 0.0]))
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 2, size=(40, 3))).float()
    images = torch.randn(40, 3, 32, 32) + 3 * labels[:, :, None, None]  # finding f brightens channel f
    val = DataLoader(TensorDataset(images, labels), batch_size=8)
    gallery = WorstErrorsGallery(k=6, dirpath=str(tmp_path / "out"))
    _trainer(tmp_path, [gallery]).validate(model, val)
    assert model.decision_threshold.unique().numel() == 3  # thresholds fitted per finding on this epoch

    model.eval()
    with torch.no_grad():
        probs = model.predict_proba(torch.cat([model(x) for x, _ in val]))
    decisions = model.decide(probs).long()
    pairs = [
        (float(probs[i, f] if labels[i, f] == 1 else 1 - probs[i, f]), i, f)
        for i in range(40) for f in range(3) if decisions[i, f] != labels[i, f]
    ]  # fmt: skip
    expected = sorted(pairs)[:6]
    table = pd.read_csv(tmp_path / "out" / "worst_errors_val.csv")
    assert list(table.columns) == ["rank", "index", "finding", "label", "decision", "prob", "prob_label"]
    assert list(zip(table["index"], table["finding"].astype(str), strict=True)) == [(i, str(f)) for _, i, f in expected]
    assert table["prob_label"].to_numpy() == pytest.approx([p for p, _, _ in expected], abs=1e-6)
    assert (table["label"] != table["decision"]).all() and set(table["label"]) == {0, 1}
    assert table["finding"].nunique() > 1  # the ranking mixes findings with different thresholds
    assert sum(len(heap) for heap in gallery._heaps.values()) <= 2 * 3 * gallery.k
    assert Image.open(tmp_path / "out" / "worst_errors_val.png").size[0] > 0  # with per-finding heatmaps
