"""LightningDataModule for MedMNIST-style ``.npz`` files (keys ``{split}_images``, ``{split}_labels``)."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.data.base import ClassificationDataModule, SeededTransformDataset
from medtransfer.data.download import fetch_medmnist
from medtransfer.data.medmnist_info import get_medmnist_info
from medtransfer.data.readers import is_color, to_gray
from medtransfer.data.sources import SPLITS
from medtransfer.errors import DataError

__all__ = ["DATA_DIR_ENV", "ArrayDataset", "MedMNISTDataModule", "default_data_dir", "load_npz_split"]

_logger = logging.getLogger(__name__)

#: MedMNIST datasets of H&E-stained histology (a stain jitter helps).
_STAINED_FLAGS = frozenset({"pathmnist"})
#: MedMNIST datasets whose images have no left/right meaning.
_SYMMETRIC_FLAGS = frozenset(
    {"pathmnist", "dermamnist", "bloodmnist", "tissuemnist", "retinamnist", "octmnist", "breastmnist"}
)

#: Environment variable naming the directory where data files are looked up (and downloaded to).
DATA_DIR_ENV = "MEDTRANSFER_DATA_DIR"


def default_data_dir() -> Path:
    """``$MEDTRANSFER_DATA_DIR`` if set, else ``~/.cache/medtransfer/data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/.cache/medtransfer/data").expanduser()


def load_npz_split(path: Path, split: str, num_classes: int, multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` (gray) or ``(N, H, W, 3)`` (RGB) uint8 and labels of one split; errors name the file."""
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
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: {keys[0]} must be uint8 of shape (N, H, W) (gray) or (N, H, W, 3) (RGB), "
            f"got {images.dtype} {images.shape}"
        )
    labels = labels.reshape(len(labels), -1)
    if multilabel:
        bad = np.argwhere((labels != 0) & (labels != 1))
        if bad.size:
            raise DataError(f"{path}: {keys[1]} row {bad[0][0]} column {bad[0][1]} is not 0 or 1")
        if labels.shape[1] != num_classes:
            raise DataError(f"{path}: {keys[1]} has {labels.shape[1]} columns, not {num_classes}")
        return images, labels.astype(np.float32)
    if labels.shape[1] != 1:
        raise DataError(f"{path}: {keys[1]} has {labels.shape[1]} columns; expected one class index per image")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels in split {split!r}")
    bad = np.flatnonzero((labels[:, 0] < 0) | (labels[:, 0] >= num_classes))
    if len(bad):
        raise DataError(f"{path}: {keys[1]} row {bad[0]} has label {labels[bad[0], 0]}, outside 0..{num_classes - 1}")
    return images, labels[:, 0].astype(np.int64)


def npz_has_color(path: Path, split: str = "train", sample: int = 64) -> bool:
    """Whether ``{split}_images`` is ``(N, H, W, 3)`` with unequal channels in its first ``sample`` images, reading
    only the array's header and those images; an unreadable file counts as gray (:func:`load_npz_split` reports it)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{split}_images.npy") as stream:
            version = np.lib.format.read_magic(stream)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(stream)
            if len(shape) != 4 or shape[-1] != 3:
                return False
            count = min(sample, shape[0])
            if fortran or dtype != np.uint8:
                return True
            head = np.frombuffer(stream.read(count * int(np.prod(shape[1:]))), np.uint8).reshape(count, *shape[1:])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # load_npz_split reports it, naming the file
        return False
    return any(is_color(image) for image in head)


class ArrayDataset(SeededTransformDataset):
    """In-memory images with integer labels, transformed on access by an albumentations pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    @property
    def targets(self) -> np.ndarray:
        return self.labels

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.images[indices], self.labels[indices], self.transform)


class MedMNISTDataModule(ClassificationDataModule):
    """A MedMNIST dataset (or any ``.npz`` in its layout) with its official train/val/test splits, read from
    ``path``, else ``<root>/<flag>.npz`` (downloaded there, MD5-checked, when missing and ``download`` is true).

    Args:
        flag: MedMNIST dataset name; sets the task and classes (``pneumoniamnist``: binary).
        path: explicit ``.npz`` file; overrides ``root``/``size``/``download``.
        root: directory to look in and download to.
        size: released image size to download (28, 64, 128, 224).
        download: fetch the official file when it is missing.
        **kwargs: size, normalisation, augmentation and loader options of ``ClassificationDataModule``.
    """

    def __init__(
        self,
        flag: str = "pneumoniamnist",
        path: str | None = None,
        root: str | None = None,
        size: int = 28,
        download: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.info = get_medmnist_info(flag)
        self.file = self._locate_file()

    @property
    def name(self) -> str:
        """Short dataset name for run names: the MedMNIST flag."""
        return self.hparams.flag

    @property
    def symmetric_modality(self) -> bool:
        """Flips are safe for pathology, dermoscopy, blood cells, tissue, retina, OCT and breast ultrasound."""
        return self.hparams.flag in _SYMMETRIC_FLAGS

    @property
    def stained_modality(self) -> bool:
        """PathMNIST (H&E colorectal histology)."""
        return self.hparams.flag in _STAINED_FLAGS

    def source_has_color(self) -> bool:
        """The file's training images hold colour; before a download: the dataset's official channel count."""
        if self.file.is_file():
            return npz_has_color(self.file)
        return self.info.n_channels == 3

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.file})"

    @property
    def task(self) -> str:
        """``binary`` or ``multiclass``, from the dataset's official description."""
        return self.info.task

    @property
    def class_names(self) -> list[str]:
        return [self.info.labels[i] for i in range(self.info.num_classes)]

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

    def build_datasets(self, train_transform, eval_transform) -> dict[str, ArrayDataset]:
        datasets = {}
        for split in SPLITS:
            images, labels = load_npz_split(self.file, split, self.num_classes, self.task == "multilabel")
            images = self._in_color_mode(images, split)
            datasets[split] = ArrayDataset(images, labels, train_transform if split == "train" else eval_transform)
        return datasets

    def _in_color_mode(self, images: np.ndarray, split: str) -> np.ndarray:
        """``images`` as :attr:`color_mode` wants them: RGB to luma for gray; one channel refused for colour."""
        if self.color_mode == "gray":
            return to_gray(images) if images.ndim == 4 else images
        if images.ndim == 3:
            raise DataError(
                f"{self.file}: {split}_images holds one-channel images {images.shape} but the data is read in colour "
                f"(color: {self.hparams.color}); a colour model needs (N, H, W, 3) RGB images, or set color: gray"
            )
        return images
