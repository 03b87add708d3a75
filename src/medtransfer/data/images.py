"""Image files on disk as a LightningDataModule: ChestX-ray14, a CSV of paths, a folder per class, MURA.

The source (``class_path`` in YAML) builds a :class:`~medtransfer.data.sources.Manifest`; every image is read by
:func:`~medtransfer.data.readers.read_image`, cropped to its box, then transformed like the other data modules.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from medtransfer.data.base import ClassificationDataModule, SeededTransformDataset
from medtransfer.data.readers import check_image, is_color, read_image
from medtransfer.data.sources import (
    SPLITS,
    Manifest,
    chestxray14_manifest,
    csv_manifest,
    folder_manifest,
    mura_manifest,
)
from medtransfer.data.transforms import INTERPOLATIONS
from medtransfer.errors import DataError

__all__ = [
    "ChestXray14Source",
    "CsvSource",
    "FolderSource",
    "ImageDataModule",
    "ManifestDataset",
    "ManifestSource",
    "MuraSource",
]

_logger = logging.getLogger(__name__)


class ManifestSource:
    """A dataset layout on disk, chosen in YAML by ``class_path``: ``build()`` lists its images, targets and splits.

    A subclass names its manifest builder (``class CsvSource(ManifestSource, builder=csv_manifest)``), whose
    signature and docstring become the constructor's, so LightningCLI offers the builder's arguments (kept in
    ``kwargs``). Builders type paths ``str | Path`` in that order, so that a path from YAML stays a plain string.
    """

    builder: Callable[..., Manifest]
    kwargs: dict[str, Any]

    def __init_subclass__(cls, builder: Callable[..., Manifest] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if builder is None:
            return
        signature = inspect.signature(builder, eval_str=True)  # real types, for jsonargparse

        def __init__(self: ManifestSource, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.kwargs = dict(bound.arguments)

        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *signature.parameters.values()], return_annotation=None
        )
        __init__.__doc__, __init__.__qualname__ = builder.__doc__, f"{cls.__qualname__}.__init__"
        cls.__init__, cls.builder = __init__, staticmethod(builder)  # type: ignore[method-assign]

    def build(self) -> Manifest:
        return self.builder(**self.kwargs)


class ChestXray14Source(ManifestSource, builder=chestxray14_manifest):
    """NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (14 findings joined by ``|``) and its PNG folder."""


class CsvSource(ManifestSource, builder=csv_manifest):
    """A CSV with a path column and one label column (class names or indices) or one 0/1 column per label."""


class FolderSource(ManifestSource, builder=folder_manifest):
    """``root/<class>/**/<image>``, or ``root/{train,val,test}/<class>/...`` with the splits given."""


class MuraSource(ManifestSource, builder=mura_manifest):
    """MURA-style ``.../patientXXXXX/studyN_positive/imageK.png``, labelled by the study folder."""


class ManifestDataset(SeededTransformDataset):
    """Reads, crops and transforms the images of one split of a manifest; ``fill_cache`` decodes and resizes them
    once into memory (shared with loader workers started afterwards)."""

    def __init__(self, manifest: Manifest, transform: Callable, color: str = "gray", frame: str = "error") -> None:
        self.manifest, self.transform, self.color, self.frame = manifest, transform, color, frame
        self.cache: list[np.ndarray] | None = None

    def load(self, index: int) -> np.ndarray:
        """The uint8 image (gray ``(H, W)`` or RGB ``(H, W, 3)``), cropped to its box when the manifest has one."""
        return self.cache[index] if self.cache is not None else self.manifest.image(index, self.color, self.frame)

    def fill_cache(self, size: int, interpolation: str) -> None:
        flag = INTERPOLATIONS[interpolation]
        self.cache = None
        self.cache = [cv2.resize(self.load(i), (size, size), interpolation=flag) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def targets(self) -> np.ndarray:
        return self.manifest.targets

    def subset(self, indices: np.ndarray) -> ManifestDataset:
        subset = ManifestDataset(self.manifest.take(indices), self.transform, self.color, self.frame)
        if self.cache is not None:
            subset.cache = [self.cache[i] for i in indices]
        return subset


def _failures(manifest: Manifest, check: Callable[[Path], Any]) -> dict[int, str]:
    """Row -> message of the images on which ``check`` raises a ``DataError``."""
    failures = {}
    for index, path in enumerate(manifest.paths):
        try:
            check(path)
        except DataError as err:
            failures[index] = str(err)
    return failures


def _without_unreadable(manifest: Manifest, frame: str = "error") -> Manifest:
    """The manifest less the images that ``read_image`` refuses; logs how many and the first few."""
    failures = _failures(manifest, lambda path: read_image(path, frame=frame))
    if not failures:
        return manifest
    _logger.warning(
        "Skipping %d unreadable image(s) of %d (bad_images: skip), e.g. %s",
        len(failures), len(manifest), "; ".join(list(failures.values())[:3]),
    )  # fmt: skip
    return manifest.take([row for row in range(len(manifest)) if row not in failures])


def _reject_unreadable(manifest: Manifest, show: int = 5) -> None:
    """Raise one ``DataError`` naming the first ``show`` images whose header fails ``check_image``, if any."""
    failures = list(_failures(manifest, check_image).values())
    if failures:
        raise DataError(
            f"{len(failures)} of {len(manifest)} images cannot be read (bad_images: error; set bad_images: skip "
            f"to train without them): " + "; ".join(failures[:show]) + ("; ..." if len(failures) > show else "")
        )


class ImageDataModule(ClassificationDataModule):
    """Images on disk, from any :class:`ManifestSource`, with the shared pipelines and loaders.

    Args:
        source: the layout (``ChestXray14Source``, ``CsvSource``, ...); may be left out when ``prepared`` is given.
        cache: decode and resize every image once at setup and keep them in memory (100k at 224 px: about 5 GB).
        bad_images: ``error``: check every file's header at setup and stop naming bad files; ``skip``: leave them out.
        prepared: folder or URI (``s3://...``) written by ``medtransfer prepare``, streamed instead of the files.
        **kwargs: size, normalisation, augmentation and loader options of ``ClassificationDataModule``.
    """

    def __init__(
        self,
        source: ManifestSource | None = None,
        cache: bool = False,
        bad_images: Literal["error", "skip"] = "error",
        prepared: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.prepared_info = None
        if source is None and prepared is None:
            raise DataError("ImageDataModule needs a `source`, or `prepared` data written by `medtransfer prepare`")
        if prepared is not None:
            from medtransfer.data.prepared import check_options, read_info

            check_options(self.hparams)
            self.prepared_info = read_info(prepared)
            if source is None and self.prepared_info is None:
                raise DataError(f"data.prepared {prepared}: not prepared yet; run `medtransfer prepare` first")
        # reads the table now: task and classes are known before the model
        self.manifest = source.build() if source is not None else None

    @property
    def name(self) -> str:
        """Short dataset name for run names: ``chestxray14``, ``csv``, ``folder`` or ``mura`` (``prepared``)."""
        return type(self.source).__name__.removesuffix("Source").lower() if self.source else "prepared"

    @property
    def task(self) -> str:
        return self.manifest.task if self.manifest is not None else self.prepared_info.task

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names if self.manifest is not None else self.prepared_info.class_names)

    @property
    def positive_fraction(self) -> torch.Tensor:
        """Share of positive training cases (per label; of the ``train_fraction`` subset after ``setup``)."""
        if self.hparams.prepared is not None:
            from medtransfer.data.prepared import positive_fraction

            return positive_fraction(self.hparams.prepared, self.prepared_info)
        train = self.datasets["train"] if self.datasets else self.manifest.subset("train")
        return torch.tensor(train.targets, dtype=torch.float32).mean(0)

    def source_has_color(self, sample: int = 16) -> bool:
        """Whether any of ``sample`` training images, spread over the split, holds colour (unequal channels); prepared
        data without its source is read as gray unless ``color: rgb``."""
        if self.manifest is None:
            return False
        paths = self.manifest.subset("train").paths or self.manifest.paths
        for index in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int)):
            try:
                if is_color(read_image(paths[index], color="auto", frame=self.hparams.dicom_frame)):
                    return True
            except DataError as err:  # reported when the images are checked or read
                _logger.debug("color: auto skips %s", err)
        return False

    def build_datasets(self, train_transform, eval_transform) -> dict[str, ManifestDataset]:
        if self.hparams.prepared is not None:
            from medtransfer.data.prepared import prepared_datasets

            return prepared_datasets(self, train_transform, eval_transform)
        if self.hparams.bad_images == "skip":
            self.manifest = _without_unreadable(self.manifest, self.hparams.dicom_frame)
        else:
            _reject_unreadable(self.manifest)
        color, frame = self.color_mode, self.hparams.dicom_frame
        pipelines = {"train": train_transform, "val": eval_transform, "test": eval_transform}
        return {split: ManifestDataset(self.manifest.subset(split), pipelines[split], color, frame) for split in SPLITS}

    def setup(self, stage: str | None = None) -> None:
        fresh = not self.datasets
        super().setup(stage)
        if fresh and self.hparams.cache:  # after the train_fraction subset, so only the images in use are decoded
            for dataset in self.datasets.values():
                dataset.fill_cache(self.input_spec.size, self.input_spec.interpolation)

    def _loader(self, split: str, shuffle: bool) -> torch.utils.data.DataLoader:
        if self.hparams.prepared is None:
            return super()._loader(split, shuffle)
        from medtransfer.data.prepared import streaming_loader

        return streaming_loader(self.datasets[split], self.hparams.batch_size, self.hparams.num_workers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.manifest!r}, source={type(self.source).__name__})"
