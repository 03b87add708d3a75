"""What every medtransfer data module shares: input size and normalisation from the backbone, the
albumentations pipelines, seeded augmentation, and the data loaders. Subclasses only build the datasets."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import albumentations as A
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from medtransfer.data.input_spec import InputSpec
from medtransfer.data.transforms import build_eval_transform, build_train_transform
from medtransfer.errors import DataError

__all__ = ["ClassificationDataModule", "SeededTransformDataset", "TrainSubset", "calibration_rows", "stratified_subset"]

_logger = logging.getLogger(__name__)


class SeededTransformDataset(Dataset):
    """``(transformed image, target)`` items from ``load(index)`` (a uint8 image) and ``targets``, through an
    albumentations pipeline (``self.transform``) that can be seeded: albumentations keeps its own RNG and ignores
    the global seeds that Lightning sets."""

    transform: object

    def load(self, index: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def targets(self) -> np.ndarray:
        """Class indices ``(N,)`` or 0/1 labels ``(N, L)``, for samplers and label statistics."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        target = self.targets[index]
        target = torch.from_numpy(target.copy()) if target.ndim else int(target)  # multi-label: a 0/1 vector
        return self.transform(image=self.load(index))["image"], target

    def seed_transform(self, seed: int) -> None:
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)

    def subset(self, indices: np.ndarray) -> SeededTransformDataset:
        """The rows ``indices`` as a dataset of their own; subclasses may return their own type."""
        return TrainSubset(self, indices)


class TrainSubset(SeededTransformDataset):
    """The rows ``indices`` of a dataset, with its targets and its (seedable) augmentation pipeline."""

    def __init__(self, dataset: SeededTransformDataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    @property
    def transform(self) -> object:
        return self.dataset.transform

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.dataset.targets)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[int(self.indices[index])]


def _strata(targets: np.ndarray) -> np.ndarray:
    """One stratum per image: its class, or for multi-label 0/1 rows its first positive label (-1: none)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return targets
    positive = targets.reshape(len(targets), -1) > 0
    return np.where(positive.any(axis=1), positive.argmax(axis=1), -1)


def stratified_subset(targets: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded, stratified ``fraction`` of ``targets``.

    Each stratum (class; multi-label: the first positive label, or none) keeps the first ``ceil(fraction * n)``
    rows of its own seeded permutation: every stratum keeps a row, and for one seed a smaller fraction's rows lie
    inside a larger one's (a learning curve adds data). Label-set strata would give each rare combination a row.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"Expected argument `train_fraction` to be in (0, 1], but got {fraction}")
    strata = _strata(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for stratum in np.unique(strata):  # sorted, so the draw does not depend on the order of the rows
        rows = np.flatnonzero(strata == stratum)
        keep.append(rng.permutation(rows)[: math.ceil(fraction * len(rows))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def calibration_rows(
    targets: np.ndarray, fraction: float, seed: int = 0, groups: np.ndarray | None = None
) -> np.ndarray:
    """Sorted rows of validation held out for calibration: a seeded, stratified ``fraction`` of the rows, or of
    the patients (``groups``, each stratified by its first image) so that no patient is in both parts."""
    if groups is None:
        return stratified_subset(targets, fraction, seed)
    groups = np.asarray(groups)
    unique, first = np.unique(groups, return_index=True)
    chosen = unique[stratified_subset(np.asarray(targets)[first], fraction, seed)]
    return np.flatnonzero(np.isin(groups, chosen))


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, SeededTransformDataset):
        info.dataset.seed_transform(torch.initial_seed())


def _worker_options(workers: int) -> dict:
    """Loader options for ``workers`` processes, each with its own augmentation stream."""
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": _seed_worker if workers > 0 else None}  # fmt: skip


class ClassificationDataModule(LightningDataModule):
    """Base of the data modules: subclasses fill ``self.datasets[split]`` in ``build_datasets``.

    Size, mean, std and interpolation follow the model's :class:`InputSpec` (the CLI links it) unless set here.

    Args:
        image_size: side length fed to the network; ``None``: the backbone's default.
        channels: 3 replicates gray to RGB; 1 feeds one channel (set the model's ``in_chans: 1``).
        mean: per-channel mean in [0, 1]; ``None``: the backbone's.
        std: per-channel std in [0, 1]; ``None``: the backbone's.
        interpolation: resize filter (``bilinear``, ``bicubic``, ``area``, ...); ``None``: the backbone's.
        batch_size: images per batch.
        num_workers: data loader worker processes.
        rotate_degrees: training augmentation: maximum rotation.
        translate: training augmentation: maximum shift as a fraction of the side.
        scale: training augmentation: maximum zoom in/out as a fraction.
        brightness_contrast: training augmentation: brightness/contrast jitter (0 = off).
        horizontal_flip: training augmentation: left-right flips; ``None``: by modality (off for radiographs, CT).
        clahe: training augmentation: probability of CLAHE contrast equalisation (0 = off).
        train_transforms: albumentations transforms on the resized uint8 training image; replace the options above.
        eval_transforms: deterministic transforms for validation/test/predict (e.g. ``CLAHE`` with ``p: 1``).
        sampler: ``shuffle``, or ``balanced``: each class drawn equally often (multi-label: weigh the loss instead).
        train_fraction: train on a stratified, seeded subset of this share of the training split (learning curves).
        subset_seed: seed of that subset (and of the calibration split); one seed gives nested subsets.
        min_epoch_samples: an epoch draws at least this many training images (small ``train_fraction``); 0: one pass.
        color: ``auto`` keeps colour where the data has it; ``gray`` turns colour into luma; ``rgb`` feeds colour.
        dicom_frame: multi-frame DICOM: read the ``first`` or ``middle`` frame, or refuse them (``error``).
        color_jitter: colour data: hue/saturation jitter strength (0 = off); ``None``: 0.1 for colour, off for gray.
        stain_jitter: colour data: probability of an H&E stain jitter; ``None``: 0.5 for stained histology, else off.
        calibration_fraction: share of validation held out (``calib``) to fit threshold and risk on; 0: validation.
        input_spec: the model's input spec (linked by the CLI); standalone, give it or ``image_size``, mean, std.
    """

    def __init__(
        self,
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
        brightness_contrast: float = 0.1,
        horizontal_flip: bool | None = None,
        clahe: float = 0.25,
        train_transforms: list[A.BasicTransform] | None = None,
        eval_transforms: list[A.BasicTransform] | None = None,
        sampler: Literal["shuffle", "balanced"] = "shuffle",
        train_fraction: float = 1.0,
        subset_seed: int = 0,
        min_epoch_samples: int = 0,
        color: Literal["auto", "gray", "rgb"] = "auto",
        dicom_frame: Literal["first", "middle", "error"] = "middle",  # not `frame`: save_hyperparameters drops it
        color_jitter: float | None = None,
        stain_jitter: float | None = None,
        calibration_fraction: float = 0.0,
        input_spec: InputSpec | None = None,
    ) -> None:
        super().__init__()
        if color not in ("auto", "gray", "rgb"):
            raise DataError(f"Expected argument `color` to be auto, gray or rgb, but got {color!r}")
        if not 0 <= calibration_fraction < 1:
            raise DataError(f"Expected argument `calibration_fraction` to be in [0, 1), but got {calibration_fraction}")
        if not 0 < train_fraction <= 1:
            raise DataError(f"Expected argument `train_fraction` to be in (0, 1], but got {train_fraction}")
        if min_epoch_samples < 0:
            raise DataError(f"Expected argument `min_epoch_samples` to be >= 0, but got {min_epoch_samples}")
        # transform objects and the model's spec stay out of the checkpoint (it loads with weights_only=True;
        # the resolved spec goes in as plain values): the CLI logs them
        self.save_hyperparameters(ignore=["train_transforms", "eval_transforms", "input_spec"], logger=False)
        self.train_transforms, self.eval_transforms = train_transforms, list(eval_transforms or [])
        self.datasets: dict[str, SeededTransformDataset] = {}
        self._model_spec = input_spec
        #: The input in use (the model's spec, explicit options over it), resolved in ``setup``.
        self.input_spec: InputSpec | None = None
        self._color_mode: str | None = None

    @property
    def color_mode(self) -> Literal["gray", "rgb"]:
        """The colour the images are fed in: ``color`` if set, else ``rgb`` when :meth:`source_has_color`."""
        if self._color_mode is None:
            color = self.hparams.color
            self._color_mode = color if color != "auto" else ("rgb" if self.source_has_color() else "gray")
            _logger.info("%s: %s images (color: %s)", type(self).__name__, self._color_mode, color)
        return self._color_mode  # type: ignore[return-value]

    def source_has_color(self) -> bool:
        """Whether the data holds colour (channels that differ); subclasses look at their files."""
        return False

    @property
    def stained_modality(self) -> bool:
        """H&E-stained histology, where a stain jitter helps; subclasses know better."""
        return False

    def _colour_augmentation(self) -> tuple[float, float]:
        """``(color_jitter, stain_jitter)``: as set, else on for colour data (stain: for stained histology)."""
        hp, colour = self.hparams, self.color_mode == "rgb"
        jitter = hp.color_jitter if hp.color_jitter is not None else (0.1 if colour else 0.0)
        stain = hp.stain_jitter if hp.stain_jitter is not None else (0.5 if colour and self.stained_modality else 0.0)
        return jitter, stain

    def _check_channels(self) -> None:
        """Colour needs three channels, and the model's first convolution must take what the data gives."""
        in_chans = self._model_spec.channels if self._model_spec else None
        channels = self.hparams.channels
        if self.color_mode == "rgb" and channels != 3:
            raise DataError(f"{self!r} holds colour images (color: {self.hparams.color}) but channels is {channels}; "
                            "set channels: 3 (and the model's in_chans: 3), or color: gray")  # fmt: skip
        if in_chans is not None and in_chans != channels:
            raise DataError(f"The data gives {channels}-channel images but the model's in_chans is {in_chans}; "
                            f"set model.in_chans: {channels}")  # fmt: skip

    @property
    def flips(self) -> bool:
        """Whether training flips left-right: ``horizontal_flip`` if set, else the modality's default."""
        flag = self.hparams.horizontal_flip
        return self.symmetric_modality if flag is None else flag

    @property
    def symmetric_modality(self) -> bool:
        """Mirror images are as plausible as the originals (not so for radiographs); subclasses know better."""
        return False

    def build_datasets(self, train_transform, eval_transform) -> dict[str, SeededTransformDataset]:
        """Return the ``train``/``val``/``test`` datasets with these pipelines."""
        raise NotImplementedError

    def resolve_input_spec(self) -> InputSpec:
        """The model's ``input_spec`` with this module's explicit options over it, and its channels, colour and
        DICOM frame."""
        hp, given = self.hparams, self._model_spec
        size = hp.image_size or (given.size if given else None)
        mean, std = hp.mean or (given.mean if given else None), hp.std or (given.std if given else None)
        if size is None or mean is None or std is None:
            raise DataError(
                "image_size, mean and std are unknown: set them on the data module, or give it the model's "
                "`input_spec` (input_spec=model.input_spec; the medtransfer CLI links it)."
            )
        interpolation = hp.interpolation or (given.interpolation if given else None) or "bilinear"
        return InputSpec(size, mean, std, interpolation, hp.channels, self.color_mode, hp.dicom_frame)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        spec = self.input_spec = self.resolve_input_spec()
        hp = self.hparams
        self._check_channels()
        color_jitter, stain_jitter = self._colour_augmentation()
        sized = (spec.size, hp.channels, spec.mean, spec.std, spec.interpolation)
        eval_transform = build_eval_transform(*sized, self.eval_transforms, color=spec.color)
        train_transform = build_train_transform(
            *sized, rotate_degrees=hp.rotate_degrees, translate=hp.translate, scale=hp.scale, clahe=hp.clahe,
            brightness_contrast=hp.brightness_contrast, horizontal_flip=self.flips, steps=self.train_transforms,
            color=spec.color, color_jitter=color_jitter, stain_jitter=stain_jitter,
        )  # fmt: skip
        self.datasets = self.build_datasets(train_transform, eval_transform)
        if hp.train_fraction < 1 and "train" in self.datasets:
            full = self.datasets["train"]
            self.datasets["train"] = full.subset(stratified_subset(full.targets, hp.train_fraction, hp.subset_seed))
            _logger.info(
                "Training on %d of %d images (train_fraction %g, subset_seed %d)",
                len(self.datasets["train"]), len(full), hp.train_fraction, hp.subset_seed,
            )  # fmt: skip
        if hp.calibration_fraction > 0 and "val" in self.datasets:
            self._hold_out_calibration(hp.calibration_fraction, hp.subset_seed)
        empty = [split for split, data in self.datasets.items() if len(data) == 0]
        if empty:
            raise DataError(f"The {', '.join(empty)} split(s) of {type(self).__name__} hold no images")
        self.datasets["train"].seed_transform(torch.initial_seed())  # reproducible under seed_everything
        _logger.info(
            "%s: %s %s images at %dpx (%s), mean %s, std %s", type(self).__name__,
            {k: len(v) for k, v in self.datasets.items()}, spec.color, spec.size, spec.interpolation,
            spec.mean, spec.std,
        )  # fmt: skip

    def _hold_out_calibration(self, fraction: float, seed: int) -> None:
        """Split ``val`` into ``calib`` (``fraction``) and the rest, which stays ``val``."""
        val = self.datasets["val"]
        manifest = getattr(val, "manifest", None)
        rows = calibration_rows(val.targets, fraction, seed, getattr(manifest, "patients", None))
        rest = np.setdiff1d(np.arange(len(val)), rows)
        self.datasets["calib"], self.datasets["val"] = val.subset(rows), val.subset(rest)
        _logger.info("Calibration: %d of %d validation images held out (calibration_fraction %g); %d pick the "
                     "checkpoint", len(rows), len(val), fraction, len(rest))  # fmt: skip
        if len(rows) < 114:
            _logger.warning(
                "Only %d calibration images: risk control can certify 2 %% errors at delta 0.1 only on >= 114 "
                "decided cases (5 %%: 45), so a low target_risk will refer everything. HINT: raise "
                "calibration_fraction or the target.", len(rows),
            )  # fmt: skip

    def _balanced_sampler(self) -> WeightedRandomSampler:
        targets = np.asarray(self.datasets["train"].targets)
        if targets.ndim != 1:
            raise DataError("sampler: balanced needs one class per image; for multi-label data use class_weighting")
        counts = np.bincount(targets)
        weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        return WeightedRandomSampler(weights, num_samples=self._epoch_samples(), replacement=True, generator=generator)

    def _epoch_samples(self) -> int:
        """Training images per epoch: the training set once, or ``min_epoch_samples`` if that is more."""
        return max(len(self.datasets["train"]), self.hparams.min_epoch_samples)

    def _train_sampler(self) -> torch.utils.data.Sampler | None:
        if self.hparams.sampler == "balanced":
            return self._balanced_sampler()
        if self._epoch_samples() > len(self.datasets["train"]):  # fresh permutations, drawn from torch's RNG
            return RandomSampler(self.datasets["train"], num_samples=self._epoch_samples())
        return None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        sampler = self._train_sampler() if shuffle else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            **_worker_options(self.hparams.num_workers),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_fraction(self) -> torch.Tensor:
        """Share of positive training cases (per label), for class-weighted losses; after ``setup``."""
        return torch.tensor(self.datasets["train"].targets, dtype=torch.float32).mean(0)

    def calibration_dataloader(self) -> DataLoader | None:
        """The ``calib`` split held out of validation (``calibration_fraction``), or ``None``."""
        return self._loader("calib", shuffle=False) if "calib" in self.datasets else None
