"""LightningDataModule for MedMNIST-style ``.npz`` files (keys ``{split}_images``, ``{split}_labels``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from medtransfer.data.download import fetch_medmnist
from medtransfer.data.medmnist_info import get_medmnist_info
from medtransfer.data.transforms import build_eval_transform, build_train_transform
from medtransfer.errors import DataError

__all__ = ["DATA_DIR_ENV", "ArrayDataset", "MedMNISTDataModule", "default_data_dir", "load_npz_split"]

_logger = logging.getLogger(__name__)

#: Environment variable naming the directory where data files are looked up (and downloaded to).
DATA_DIR_ENV = "MEDTRANSFER_DATA_DIR"
SPLITS = ("train", "val", "test")


def default_data_dir() -> Path:
    """``$MEDTRANSFER_DATA_DIR`` if set, else ``~/.cache/medtransfer/data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/.cache/medtransfer/data").expanduser()


def load_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 and integer labels ``(N,)`` of one split, with errors naming the file."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read {path} as a .npz archive: {err}") from err
    with archive:
        keys = (f"{split}_images", f"{split}_labels")
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise DataError(
                f"{path} lacks the key(s) {', '.join(missing)}; it has {', '.join(archive.files) or 'no arrays'}. "
                "Expected MedMNIST layout: {split}_images and {split}_labels for train, val and test."
            )
        images, labels = archive[keys[0]], archive[keys[1]]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{path}: {keys[0]} must be grayscale uint8 of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1:
        raise DataError(f"{path}: {keys[1]} has {labels.shape[1]} columns; multi-label data is not supported yet")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels[:, 0].astype(np.int64)


class ArrayDataset(Dataset):
    """In-memory images with integer labels, transformed on access by an albumentations pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[index])["image"], int(self.labels[index])

    def seed_transform(self, seed: int) -> None:
        """Seed the pipeline's own RNG: albumentations ignores the global seeds that Lightning sets."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, ArrayDataset):
        info.dataset.seed_transform(torch.initial_seed())


class MedMNISTDataModule(LightningDataModule):
    """A MedMNIST dataset (or any ``.npz`` in its layout) with its official train/val/test splits.

    The file is found at ``path`` if given, else at ``<root>/<flag>.npz`` (``root`` defaults to
    ``$MEDTRANSFER_DATA_DIR``, then ``~/.cache/medtransfer/data``), and downloaded there with MD5
    verification when missing and ``download`` is true. Size and normalisation follow the backbone's timm
    data config (read from the LightningModule's ``data_config``) unless ``image_size``/``mean``/``std`` are set.

    Args:
        flag: MedMNIST dataset name; sets the task and classes (``pneumoniamnist``: binary).
        path: explicit ``.npz`` file; overrides ``root``/``size``/``download``.
        root: directory to look in and download to.
        size: released image size to download (28, 64, 128, 224).
        download: fetch the official file when it is missing.
        image_size: side length fed to the network; ``None`` means the backbone's default.
        channels: 3 replicates gray to RGB; 1 feeds one channel (set the model's ``in_chans: 1``).
        mean: per-channel mean in [0, 1]; ``None`` means the backbone's.
        std: per-channel std in [0, 1]; ``None`` means the backbone's.
        interpolation: resize filter (``bilinear``, ``bicubic``, ``area``, ...); ``None`` means the backbone's.
        batch_size: images per batch.
        num_workers: data loader worker processes.
        rotate_degrees: training augmentation: maximum rotation.
        translate: training augmentation: maximum shift as a fraction of the side.
        scale: training augmentation: maximum zoom in/out as a fraction.
        brightness_contrast: training augmentation: brightness/contrast jitter (0 = off).
        horizontal_flip: training augmentation: random left-right flips (off for chest X-rays).
    """

    def __init__(
        self,
        flag: str = "pneumoniamnist",
        path: str | None = None,
        root: str | None = None,
        size: int = 28,
        download: bool = True,
        image_size: int | None = None,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        rotate_degrees: float = 10.0,
        translate: float = 0.05,
        scale: float = 0.05,
        brightness_contrast: float = 0.0,
        horizontal_flip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.info = get_medmnist_info(flag)
        if self.info.task == "multilabel":
            raise DataError(f"MedMNIST {flag!r} is multi-label, which medtransfer does not train yet")
        self.file = self._locate_file()
        self.datasets: dict[str, ArrayDataset] = {}
        #: ``(image_size, mean, std, interpolation)`` in use, resolved in ``setup``.
        self.normalisation: tuple[int, tuple[float, ...], tuple[float, ...], str] | None = None

    @property
    def task(self) -> str:
        """``binary`` or ``multiclass``, from the dataset's official description."""
        return self.info.task

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        return [self.info.labels[i] for i in range(self.num_classes)]

    def _locate_file(self) -> Path:
        if self.hparams.path is not None:
            file = Path(self.hparams.path).expanduser()
            if not file.is_file():
                raise DataError(f"Data file not found: {file} (from data.path)")
            return file
        root = Path(self.hparams.root).expanduser() if self.hparams.root else default_data_dir()
        file = root / self.info.filename(self.hparams.size)
        if not file.is_file() and not self.hparams.download:
            raise DataError(
                f"Data file not found: {file}. Set data.download: true to fetch the official file, "
                f"or point data.path (or ${DATA_DIR_ENV}) at a copy."
            )
        return file

    def prepare_data(self) -> None:
        """Download the official file if it is missing (on one process only, as Lightning arranges)."""
        if not self.file.is_file():
            _logger.info("Downloading %s to %s", self.info.filename(self.hparams.size), self.file.parent)
            fetch_medmnist(self.hparams.flag, self.hparams.size, self.file.parent)

    def _normalisation(self) -> tuple[int, Sequence[float], Sequence[float], str]:
        """Image size, mean, std, interpolation: explicit arguments first, then the backbone's timm data config."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        config = getattr(module, "data_config", None) or {}
        size = self.hparams.image_size or (config["input_size"][-1] if config else None)
        mean = self.hparams.mean or config.get("mean")
        std = self.hparams.std or config.get("std")
        interpolation = self.hparams.interpolation or config.get("interpolation") or "bilinear"
        if size is None or mean is None or std is None:
            raise DataError(
                "image_size, mean and std are unknown: set them on the data module, or attach a model that has "
                "a timm `data_config` (as ClassifierModule does)."
            )
        return int(size), mean, std, interpolation

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        size, mean, std, interpolation = self._normalisation()
        self.normalisation = (size, tuple(mean), tuple(std), interpolation)
        hp = self.hparams
        eval_transform = build_eval_transform(size, hp.channels, mean, std, interpolation)
        train_transform = build_train_transform(
            size, hp.channels, mean, std, interpolation, hp.rotate_degrees, hp.translate, hp.scale,
            hp.brightness_contrast, hp.horizontal_flip,
        )  # fmt: skip
        for split in SPLITS:
            images, labels = load_npz_split(self.file, split)
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if bad.size:
                raise DataError(
                    f"{self.file}: {split}_labels row {bad[0]} has label {labels[bad[0]]}, "
                    f"outside 0..{self.num_classes - 1}"
                )
            transform = train_transform if split == "train" else eval_transform
            self.datasets[split] = ArrayDataset(images, labels, transform)
        self.datasets["train"].seed_transform(torch.initial_seed())  # reproducible under seed_everything
        _logger.info(
            "%s: %s images at %dpx (%s), mean %s, std %s", self.file.name,
            {k: len(v) for k, v in self.datasets.items()}, size, interpolation, tuple(mean), tuple(std),
        )  # fmt: skip

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
