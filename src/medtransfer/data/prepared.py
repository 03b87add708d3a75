"""Prepared data: every image decoded, cropped to its box and resized once, stored in LitData's streaming format.

Decoding a 1024-px ChestX-ray14 PNG costs ~10 ms, an order of magnitude too slow to feed a GPU every epoch.
``medtransfer prepare`` writes each split once with ``litdata.optimize`` (``<prepared>/<split>/``, items
``{"image", "target", "row"}``, described by ``<prepared>/medtransfer_prepared.json``); ``fit`` with the same
``data.prepared`` streams it (sharded over ranks and nodes) and augments after reading. ``fit`` refuses a folder
whose labels, size or source hash differ; ``prepare`` keeps the splits already complete for the same source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import albumentations as A
import litdata
import numpy as np
import torch
from fsspec.core import url_to_fs
from litdata import StreamingDataLoader, StreamingDataset

from medtransfer.data.base import ClassificationDataModule, SeededTransformDataset, _worker_options
from medtransfer.data.sources import SPLITS, Manifest
from medtransfer.data.transforms import INTERPOLATIONS
from medtransfer.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "INFO_FILE",
    "PreparedDataset",
    "PreparedInfo",
    "check_compatible",
    "prepare",
    "prepared_hash",
    "read_info",
    "streaming_loader",
]

_logger = logging.getLogger(__name__)

#: Name of the file that describes a prepared folder.
INFO_FILE = "medtransfer_prepared.json"
#: Version of the layout above; a folder of another version is prepared afresh.
FORMAT_VERSION = 1


@dataclass
class PreparedInfo:
    """What a prepared folder holds and what it was made from (stored as ``medtransfer_prepared.json``).

    ``manifest_sha256`` is :func:`prepared_hash`, ``files_sha256`` :func:`files_hash`; ``splits`` holds per split
    ``count``, ``positive_fraction`` (per label; binary/multi-label) and ``complete`` (all chunks written).
    """

    task: str
    class_names: list[str]
    size: int
    interpolation: str
    manifest_sha256: str
    files_sha256: str = ""
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def complete(self, split: str) -> bool:
        return bool(self.splits.get(split, {}).get("complete"))


# --------------------------------------------------------------------------------------------------- storage
def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_info(prepared: str) -> PreparedInfo | None:
    """The :class:`PreparedInfo` of a prepared folder, or ``None`` when it has none (not prepared yet)."""
    fs, path = url_to_fs(_join(prepared, INFO_FILE))  # a local folder or an object store (s3://, gs://, ...)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as stream:
            return PreparedInfo(**json.load(stream))
    except (ValueError, TypeError) as err:
        raise DataError(f"{_join(prepared, INFO_FILE)}: not a medtransfer prepared-data description ({err})") from None


def _write_info(prepared: str, info: PreparedInfo) -> None:
    """Write the description atomically (a local file via rename; object stores write whole objects)."""
    text = json.dumps(asdict(info), indent=1)
    fs, path = url_to_fs(_join(prepared, INFO_FILE))
    if "file" in fs.protocol:  # "file" or ("file", "local")
        from medtransfer.files import write_text_atomic

        write_text_atomic(path, text)
    else:
        with fs.open(path, "w") as stream:
            stream.write(text)


# --------------------------------------------------------------------------------------------------- hashing
def prepared_hash(manifest: Manifest) -> str:
    """SHA-256 of the dataset prepare reads: :meth:`Manifest.sha256` (relative paths, splits, targets) plus the
    boxes. It does not depend on where the files lie or when they were copied, so training nodes with their own
    copy of the source agree with it."""
    digest = hashlib.sha256(manifest.sha256().encode())
    if manifest.boxes is not None:
        digest.update(np.ascontiguousarray(manifest.boxes).tobytes())
    return digest.hexdigest()


def files_hash(manifest: Manifest) -> str:
    """SHA-256 of every image file's size and modification time: an image replaced under the same name makes
    ``prepare`` start afresh (reading 45 GB to hash the bytes would cost as much as preparing)."""
    digest = hashlib.sha256()
    for path in manifest.paths:
        try:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(b"missing\n")
    return digest.hexdigest()


class _Encoder:
    """``litdata.optimize``'s function: row -> the stored item (decoded, cropped, resized uint8 image)."""

    def __init__(self, manifest: Manifest, size: int, interpolation: str) -> None:
        self.manifest = manifest
        # the eval pipeline's own first step, so reading a prepared image back reproduces it bit for bit
        self.resize = A.Resize(size, size, interpolation=INTERPOLATIONS[interpolation])

    def __call__(self, row: int) -> dict[str, Any]:
        image = self.resize(image=self.manifest.image(row))["image"]
        target = np.asarray(self.manifest.targets[row])
        return {"image": np.ascontiguousarray(image), "target": target, "row": int(row)}


def _positive_fraction(targets: np.ndarray, task: str) -> list[float] | None:
    if task == "multiclass" or len(targets) == 0:
        return None
    return np.atleast_1d(np.asarray(targets, dtype=np.float64).mean(0)).tolist()


def prepare(
    datamodule: ClassificationDataModule,
    prepared: str,
    size: int,
    interpolation: str,
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
) -> PreparedInfo:
    """Write every split of an ``ImageDataModule``'s manifest to ``prepared`` (folder or URI), resized to ``size``
    with ``interpolation`` as in training, decoded by ``num_workers`` processes; resumable by split."""
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    manifest = datamodule.manifest
    digest, files = prepared_hash(manifest), files_hash(manifest)
    info = read_info(prepared)
    settings = (FORMAT_VERSION, digest, files, int(size), interpolation)
    if (
        info is not None
        and (info.format_version, info.manifest_sha256, info.files_sha256, info.size, info.interpolation) != settings
    ):
        _logger.warning(
            "%s was prepared from another source or with other settings (hash %s..., %dpx %s; now %s..., %dpx %s): "
            "preparing it afresh", prepared, info.manifest_sha256[:12], info.size, info.interpolation,
            digest[:12], size, interpolation,
        )  # fmt: skip
        info = None
    if info is None:
        source = datamodule.source
        info = PreparedInfo(
            task=manifest.task, class_names=list(manifest.class_names), size=int(size), interpolation=interpolation,
            manifest_sha256=digest, files_sha256=files,
            source={"class": type(source).__name__, "arguments": {k: str(v) for k, v in source.kwargs.items()}},
        )  # fmt: skip
        _write_info(prepared, info)
    for split in SPLITS:
        part = manifest.subset(split)
        if info.complete(split):
            _logger.info("%s/%s: complete (%d images), kept", prepared, split, info.splits[split]["count"])
            continue
        started = time.perf_counter()
        if len(part):
            litdata.optimize(
                fn=_Encoder(part, size, interpolation),
                inputs=list(range(len(part))),
                output_dir=_join(prepared, split),
                chunk_bytes=chunk_bytes,
                num_workers=max(1, num_workers),
                mode="overwrite",
                keep_data_ordered=True,
                verbose=False,
                start_method="fork",
            )
        info.splits[split] = {
            "count": len(part),
            "positive_fraction": _positive_fraction(part.targets, manifest.task),
            "complete": True,
        }
        _write_info(prepared, info)  # the split counts as done only once its chunks and index are all written
        _logger.info("%s/%s: %d images in %.1f s", prepared, split, len(part), time.perf_counter() - started)
    return info


# --------------------------------------------------------------------------------------------------- reading
def check_compatible(
    info: PreparedInfo,
    prepared: str,
    *,
    size: int,
    interpolation: str,
    manifest: Manifest | None = None,
    task: str | None = None,
    num_classes: int | None = None,
) -> None:
    """Raise a one-line ``DataError`` unless the prepared folder fits the data module's and model's settings."""
    where = _join(prepared, INFO_FILE)
    if info.format_version != FORMAT_VERSION:
        raise DataError(f"{where}: format version {info.format_version}, expected {FORMAT_VERSION}; prepare again")
    missing = [split for split in SPLITS if not info.complete(split)]
    if missing:
        raise DataError(f"{where}: split(s) {missing} not (completely) prepared; run `medtransfer prepare` again")
    if (info.size, info.interpolation) != (size, interpolation):
        raise DataError(
            f"{where}: images were prepared at {info.size}px ({info.interpolation}), but this run uses {size}px "
            f"({interpolation}); prepare again with these settings or set data.image_size/interpolation to match"
        )
    if manifest is not None and prepared_hash(manifest) != info.manifest_sha256:
        raise DataError(
            f"{where}: the configured source changed since it was prepared (manifest hash "
            f"{info.manifest_sha256[:12]}... vs {prepared_hash(manifest)[:12]}...); run `medtransfer prepare` again"
        )
    if task is not None and task != info.task:
        raise DataError(f"{where}: prepared for a {info.task} task, but the model's task is {task}")
    expected = 1 if info.task == "binary" else len(info.class_names)
    if num_classes is not None and num_classes not in (expected, len(info.class_names)):
        raise DataError(
            f"{where}: holds {len(info.class_names)} classes {info.class_names}, but the model has {num_classes}"
        )


class PreparedDataset(StreamingDataset, SeededTransformDataset):
    """One prepared split, streamed by LitData (sharded over ranks, nodes and loader workers), then augmented.

    Items are ``(transformed image, target)`` like :class:`~medtransfer.data.images.ManifestDataset`'s.
    ``pipeline`` is the albumentations pipeline (LitData's own ``transform`` attribute means something else).
    """

    def __init__(
        self, prepared: str, split: str, pipeline: Callable, shuffle: bool = False, seed: int = 0,
        drop_last: bool | None = False,
    ) -> None:  # fmt: skip
        super().__init__(_join(prepared, split), shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.pipeline = pipeline

    def seed_transform(self, seed: int) -> None:
        if hasattr(self.pipeline, "set_random_seed"):
            self.pipeline.set_random_seed(seed % 2**32)

    @property
    def targets(self) -> np.ndarray:
        raise DataError(
            "prepared data streams its targets: sampler: balanced, train_fraction and min_epoch_samples need the "
            "raw source (leave data.prepared unset)"
        )

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, Any]:
        item = super().__getitem__(index)
        target = np.asarray(item["target"])
        target = torch.from_numpy(target.copy()) if target.ndim else int(target)
        return self.pipeline(image=item["image"])["image"], target


def streaming_loader(dataset: PreparedDataset, batch_size: int, num_workers: int) -> StreamingDataLoader:
    """A ``litdata.StreamingDataLoader`` over a prepared split (it keeps its place in its state for resumes)."""
    return StreamingDataLoader(dataset, batch_size=batch_size, **_worker_options(num_workers))


# --------------------------------------------------------------------------------------------------- data module
def check_options(hparams: Any) -> None:
    """Refuse the data-module options that need random access to the targets, which a stream does not give."""
    refused = {
        "sampler: balanced": hparams.get("sampler") == "balanced",
        "train_fraction < 1": hparams.get("train_fraction", 1.0) < 1,
        "min_epoch_samples > 0": hparams.get("min_epoch_samples", 0) > 0,
        "cache: true": bool(hparams.get("cache")),
        "calibration_fraction > 0": hparams.get("calibration_fraction", 0.0) > 0,
    }
    chosen = [name for name, on in refused.items() if on]
    if chosen:
        raise DataError(f"data.prepared streams the images; {', '.join(chosen)} need(s) the raw source instead")


def positive_fraction(prepared: str, info: PreparedInfo | None) -> torch.Tensor:
    """Share of positive training cases per label, as recorded at prepare time."""
    fraction = (info.splits.get("train") or {}).get("positive_fraction") if info is not None else None
    if fraction is None:
        raise DataError(f"{_join(prepared, INFO_FILE)}: no positive fraction of a prepared train split")
    return torch.tensor(fraction, dtype=torch.float32).reshape(-1 if info.task == "multilabel" else ())


def prepared_datasets(
    datamodule: ClassificationDataModule, train_transform: Callable, eval_transform: Callable
) -> dict:
    """The ``train``/``val``/``test`` streams of ``datamodule.hparams.prepared``, checked against the data module
    (size, interpolation, source hash) and the attached model (task, classes)."""
    prepared = datamodule.hparams.prepared
    info = read_info(prepared)
    if info is None:
        raise DataError(f"data.prepared {prepared}: not prepared yet; run `medtransfer prepare` first")
    datamodule.prepared_info = info
    size, interpolation = datamodule.input_spec.size, datamodule.input_spec.interpolation
    module = getattr(datamodule.trainer, "lightning_module", None) if datamodule.trainer is not None else None
    hparams = getattr(module, "hparams", {})
    check_compatible(
        info, prepared, size=size, interpolation=interpolation, manifest=datamodule.manifest,
        task=hparams.get("task"), num_classes=hparams.get("num_classes"),
    )  # fmt: skip
    seed = torch.initial_seed() % 2**31  # the same on every rank under seed_everything: one shuffle for all
    train = PreparedDataset(prepared, "train", train_transform, shuffle=True, seed=seed, drop_last=None)
    evaluated = {split: PreparedDataset(prepared, split, eval_transform, seed=seed) for split in ("val", "test")}
    return {"train": train} | evaluated
