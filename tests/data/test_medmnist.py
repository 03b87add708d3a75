"""MedMNISTDataModule on the real PneumoniaMNIST file: splits, tensors, normalisation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule

HALF = (0.5, 0.5, 0.5)


def _datamodule(path, **kwargs) -> MedMNISTDataModule:
    kwargs = {"image_size": 64, "mean": HALF, "std": HALF, "batch_size": 16, **kwargs}
    return MedMNISTDataModule(path=str(path), **kwargs)


def test_official_splits_and_binary_labels(pneumonia_npz):
    dm = _datamodule(pneumonia_npz)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 4690, "val": 524, "test": 624}
    assert (dm.task, dm.num_classes, dm.class_names) == ("binary", 2, ["normal", "pneumonia"])
    assert int(dm.datasets["val"].labels.sum()) == 389  # pneumonia cases in the official val split


def test_batches_are_resized_replicated_and_normalised(pneumonia_npz):
    dm = _datamodule(pneumonia_npz)
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    assert -1.0 <= images.min() and images.max() <= 1.0  # uint8 scaled by mean=std=0.5
    torch.testing.assert_close(images[:, 0], images[:, 2])  # gray replicated to RGB
    raw = dm.datasets["val"].images[0].astype(np.float32) / 255
    assert images[0, 0].mean().item() == pytest.approx((raw.mean() - 0.5) / 0.5, abs=0.02)


def test_eval_is_deterministic_and_train_is_augmented(pneumonia_npz):
    dm = _datamodule(pneumonia_npz)
    dm.setup("fit")
    assert torch.equal(dm.datasets["val"][0][0], dm.datasets["val"][0][0])
    assert not torch.equal(dm.datasets["train"][0][0], dm.datasets["train"][0][0])
    no_aug = _datamodule(pneumonia_npz, rotate_degrees=0, translate=0, scale=0, brightness_contrast=0, clahe=0)
    no_aug.setup("fit")
    assert torch.equal(no_aug.datasets["train"][0][0], no_aug.datasets["train"][0][0])


def test_single_channel_for_an_adapted_stem(pneumonia_npz):
    dm = _datamodule(pneumonia_npz, channels=1)
    dm.setup("fit")
    assert dm.datasets["test"][0][0].shape == (1, 64, 64)


def test_size_and_statistics_follow_the_model_input_spec(pneumonia_npz):
    model = ClassifierModule(backbone="resnet18", pretrained="none")
    dm = MedMNISTDataModule(path=str(pneumonia_npz), image_size=32, batch_size=64, input_spec=model.input_spec)
    trainer = Trainer(limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=dm)
    spec = dm.input_spec
    assert spec.size == 32 and spec.interpolation == "bicubic"  # resnet18 resizes bicubic in timm
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.std == pytest.approx((0.229, 0.224, 0.225))


def test_default_location_is_the_data_dir_environment_variable(pneumonia_npz, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_DATA_DIR", str(pneumonia_npz.parent))
    assert MedMNISTDataModule().file == pneumonia_npz


def test_missing_explicit_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"Data file not found: .*nothing\.npz"):
        MedMNISTDataModule(path=str(tmp_path / "nothing.npz"))


def test_missing_file_without_download_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"pneumoniamnist\.npz.*download: true"):
        MedMNISTDataModule(root=str(tmp_path), download=False)


def test_npz_without_expected_keys_lists_what_is_missing(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros((2, 1)))
    dm = _datamodule(path)
    with pytest.raises(DataError, match=r"wrong\.npz lacks the key\(s\) train_images, train_labels; it has x_train"):
        dm.setup("fit")


def test_out_of_range_label_names_split_and_row(tmp_path):
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((3, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1], [0]])
    arrays["val_labels"] = np.array([[0], [1], [7]])
    np.savez(tmp_path / "labels.npz", **arrays)
    with pytest.raises(DataError, match=r"val_labels row 2 has label 7, outside 0\.\.1"):
        _datamodule(tmp_path / "labels.npz").setup("fit")


def test_not_an_npz_file_is_reported(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"Cannot read .*broken\.npz as a \.npz archive"):
        _datamodule(path).setup("fit")


def test_multilabel_file_gives_a_zero_one_vector_per_image(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (6, 14))
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    dm = _datamodule(tmp_path / "chestmnist.npz", flag="chestmnist")
    dm.setup("fit")
    _, target = dm.datasets["val"][2]
    assert dm.task == "multilabel" and target.shape == (14,) and target.dtype == torch.float32
    assert torch.equal(target, torch.as_tensor(arrays["val_labels"][2], dtype=torch.float32))
    torch.testing.assert_close(
        dm.positive_fraction, torch.as_tensor(arrays["train_labels"].mean(0), dtype=torch.float32)
    )
    arrays["test_labels"][0, 3] = 2
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"test_labels row 0 column 3 is not 0 or 1"):
        _datamodule(tmp_path / "bad.npz", flag="chestmnist").setup("fit")


def test_augmentation_is_reproducible_under_a_global_seed(pneumonia_npz):
    def first_train_images(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        dm = _datamodule(pneumonia_npz)
        dm.setup("fit")
        return torch.stack([dm.datasets["train"][i][0] for i in range(4)])

    assert torch.equal(first_train_images(3), first_train_images(3))
    assert not torch.equal(first_train_images(3), first_train_images(4))


def test_loader_workers_draw_different_augmentations(pneumonia_npz):
    torch.manual_seed(0)
    dm = _datamodule(pneumonia_npz, num_workers=2, batch_size=1)
    dm.setup("fit")
    dm.datasets["train"].images = dm.datasets["train"].images[[0, 0]]  # one image twice, one per worker
    dm.datasets["train"].labels = dm.datasets["train"].labels[[0, 0]]
    loader = torch.utils.data.DataLoader(
        dm.datasets["train"], batch_size=1, num_workers=2, worker_init_fn=dm.train_dataloader().worker_init_fn
    )
    first, second = (batch[0] for batch in loader)
    assert not torch.equal(first, second)


def test_yaml_transforms_replace_the_built_in_augmentation_and_stay_out_of_the_checkpoint(pneumonia_npz, tmp_path):
    import albumentations as A

    flip = _datamodule(pneumonia_npz, train_transforms=[A.HorizontalFlip(p=1.0)], eval_transforms=[A.CLAHE(p=1.0)])
    flip.setup("fit")
    plain = _datamodule(pneumonia_npz, rotate_degrees=0, translate=0, scale=0, brightness_contrast=0, clahe=0)
    plain.setup("fit")
    torch.testing.assert_close(flip.datasets["train"][0][0], plain.datasets["train"][0][0].flip(-1))
    assert not torch.equal(flip.datasets["val"][0][0], plain.datasets["val"][0][0])  # CLAHE applied
    assert "train_transforms" not in flip.hparams
    torch.save(dict(flip.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["image_size"] == 64


def test_balanced_sampler_draws_both_classes_equally_often(pneumonia_npz):
    torch.manual_seed(0)
    dm = _datamodule(pneumonia_npz, sampler="balanced")
    dm.setup("fit")
    indices = list(dm.train_dataloader().sampler)
    drawn = dm.datasets["train"].targets[indices]
    assert len(indices) == 4690
    assert drawn.mean() == pytest.approx(0.5, abs=0.03)  # the split itself is 74 % pneumonia
    assert dm.datasets["train"].targets.mean() == pytest.approx(3477 / 4690)


def test_balanced_sampler_refuses_multilabel_data(tmp_path):
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((4, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.eye(4, 14, dtype=int)
    np.savez(tmp_path / "chest.npz", **arrays)
    dm = _datamodule(tmp_path / "chest.npz", flag="chestmnist", sampler="balanced")
    dm.setup("fit")
    with pytest.raises(DataError, match="class_weighting"):
        dm.train_dataloader()


def test_medical_default_augmentation_and_flips_by_modality(pneumonia_npz, tmp_path):
    chest = _datamodule(pneumonia_npz)
    chest.setup("fit")
    steps = [type(t).__name__ for t in chest.datasets["train"].transform.transforms]
    assert {"Affine", "CLAHE", "RandomBrightnessContrast"} <= set(steps) and "HorizontalFlip" not in steps
    assert _datamodule(pneumonia_npz, horizontal_flip=True).flips
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((7, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.arange(7).reshape(7, 1)
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    skin = _datamodule(tmp_path / "dermamnist.npz", flag="dermamnist")
    assert skin.flips and not chest.flips
    skin.setup("fit")
    assert "HorizontalFlip" in [type(t).__name__ for t in skin.datasets["train"].transform.transforms]
