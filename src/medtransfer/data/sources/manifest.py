"""The :class:`Manifest` of a dataset and the split rules every layout's builder shares.

Splits are deterministic for a seed: patients (else images, stratified by class) are shuffled and the first
``round(test_fraction * P)`` go to test, the next ``round(val_fraction * P)`` to val (at least one each when its
fraction is positive). A fraction is a share of the rows being split (of the train/val pool when test is given).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medtransfer.data.readers import Color, Frame, read_image
from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = ["SPLITS", "Manifest", "Missing", "Split"]

_logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
Missing = Literal["error", "skip"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SHOW = 5  # how many offending lines an error message lists


@dataclass(frozen=True, eq=False, repr=False)
class Manifest:
    """The images of a dataset with their targets and splits (read-only copies): what an image ``Dataset`` needs.

    ``targets`` are int64 class indices ``(N,)``, or 0/1 float32 ``(N, L)`` for ``multilabel``; ``patients`` (str)
    and ``boxes`` (float32 ``(N, 4)`` ``x_min, y_min, x_max, y_max`` pixels, NaN: no box) may be ``None``.
    """

    paths: tuple[Path, ...]
    targets: np.ndarray
    splits: np.ndarray
    class_names: tuple[str, ...]
    task: Task
    patients: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"Expected argument `task` to be binary, multiclass or multilabel, but got {self.task!r}")
        if self.task == "multilabel":
            target_dtype, target_shape = np.float32, (n, len(self.class_names))
        else:
            target_dtype, target_shape = np.int64, (n,)
        arrays = {
            "targets": (self.targets, target_dtype, target_shape),
            "splits": (self.splits, np.str_, (n,)),
            "patients": (self.patients, np.str_, (n,)),
            "boxes": (self.boxes, np.float32, (n, 4)),
        }
        for name, (value, dtype, shape) in arrays.items():
            if value is None:
                continue
            array = np.array(value, dtype=dtype)  # a copy, so that freezing it leaves the caller's array alone
            if array.shape != shape:
                raise ValueError(f"Expected argument `{name}` to have shape {shape}, but got {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        unknown = set(np.unique(self.splits)) - set(SPLITS)
        if unknown:
            raise ValueError(f"Expected argument `splits` to hold only {SPLITS}, but got {sorted(unknown)}")
        object.__setattr__(self, "paths", tuple(Path(path) for path in self.paths))
        object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={int((self.splits == split).sum())}" for split in SPLITS)
        return f"Manifest(task={self.task!r}, classes={len(self.class_names)}, n={len(self)}, {sizes})"

    @property
    def num_classes(self) -> int:
        """The number of classes (labels for ``multilabel``)."""
        return len(self.class_names)

    def subset(self, split: Split) -> Manifest:
        """The images of one split, in their order here."""
        if split not in SPLITS:
            raise ValueError(f"Expected argument `split` to be one of {SPLITS}, but got {split!r}")
        return self.take(np.flatnonzero(self.splits == split))

    def sha256(self) -> str:
        """SHA-256 of the content: each image path (relative to the images' common folder), its split and its
        target. It changes when images, labels or the split change, but not when the folder moves."""
        paths = [str(p) for p in self.paths]
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
        digest = hashlib.sha256()
        for path, split in zip(paths, self.splits.tolist(), strict=True):
            digest.update(f"{os.path.relpath(path, root)}\t{split}\n".encode())
        digest.update(np.ascontiguousarray(self.targets).tobytes())
        return digest.hexdigest()

    def image(self, index: int, color: Color = "gray", frame: Frame = "error") -> np.ndarray:
        """The uint8 image at ``index`` (:func:`~medtransfer.data.readers.read_image` with ``color`` and ``frame``),
        cropped to its box when it has one."""
        image = read_image(self.paths[index], color=color, frame=frame)
        if self.boxes is not None and not np.isnan(self.boxes[index]).any():
            x0, y0, x1, y1 = (round(float(v)) for v in self.boxes[index])
            image = image[max(y0, 0) : y1, max(x0, 0) : x1]
            if image.size == 0:
                raise DataError(f"{self.paths[index]}: box {self.boxes[index].tolist()} lies outside the image")
        return image

    def take(self, rows: Sequence[int] | np.ndarray) -> Manifest:
        """The images at ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            paths=tuple(self.paths[row] for row in rows),
            targets=self.targets[rows],
            splits=self.splits[rows],
            patients=None if self.patients is None else self.patients[rows],
            boxes=None if self.boxes is None else self.boxes[rows],
        )


def _check_fractions(val_fraction: float, test_fraction: float, given: Sequence[str] = ()) -> dict[str, float]:
    """``{"val": ..., "test": ...}`` less the ``given`` splits, each in [0, 1) and summing to below 1."""
    fractions = {name: value for name, value in (("val", val_fraction), ("test", test_fraction)) if name not in given}
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Expected argument `{name}_fraction` to be in [0, 1), but got {value}")
    if sum(fractions.values()) >= 1.0:
        raise ValueError(
            "Expected arguments `val_fraction` + `test_fraction` to be below 1 (train needs images), "
            f"but got {' + '.join(map(str, fractions.values()))}"
        )
    return fractions


def _split(
    n: int,
    fractions: Mapping[str, float],
    seed: int,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Split ``n`` rows into train and the ``fractions`` (``{"val": 0.1, "test": 0.2}``): ``groups`` (patients)
    are shuffled and cut whole; else rows, shuffled with each class (``strata``) spread evenly over the order."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        units, unit_of_row = np.unique(groups, return_inverse=True)
        order = rng.permutation(len(units))
    else:
        unit_of_row = np.arange(n)
        order = rng.permutation(n) if strata is None else _stratified_order(strata, rng)
    unit_splits = np.full(len(order), "train", dtype="<U5")
    start = 0
    for name in ("test", "val"):
        fraction = fractions.get(name, 0.0)
        count = max(1, round(fraction * len(order))) if fraction > 0 else 0
        unit_splits[order[start : start + count]] = name
        start += count
    return unit_splits[unit_of_row]


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the rows in which every class is spread evenly, so any prefix holds each class's share."""
    key = np.empty(len(strata))
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        key[rows] = (rng.permutation(len(rows)) + rng.random()) / len(rows)
    return np.argsort(key, kind="stable")


def _carve(
    given: np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """``given`` with its ``"train"`` rows split again into train and ``fractions`` by :func:`_split` (all rows
    when nothing is given; the train/val pool when a test set is given)."""
    splits = np.array(given, dtype="<U5")
    pool = splits == "train"
    if fractions and pool.any():
        groups = None if groups is None else groups[pool]
        strata = None if strata is None else strata[pool]
        splits[pool] = _split(int(pool.sum()), fractions, seed, groups=groups, strata=strata)
    return splits


def _checked(
    manifest: Manifest, source: Path, lines: pd.Index | None = None, required: Sequence[str] = ("train",)
) -> Manifest:
    """``manifest`` once no ``required`` split is empty and no patient in two (errors name ``lines`` of ``source``,
    else paths); logs a summary."""
    for split in required:
        if not (manifest.splits == split).any():
            raise DataError(f"{source}: the {split!r} split is empty ({len(manifest)} images in all)")
    if manifest.patients is not None:
        _check_patients(manifest, source, None if lines is None else lines.to_numpy())
    _logger.info("%s: %r", source, manifest)
    return manifest


def _check_patients(manifest: Manifest, source: Path, lines: np.ndarray | None) -> None:
    splits, patients = manifest.splits, manifest.patients
    per_patient = pd.Series(splits).groupby(patients).nunique()
    shared = per_patient.index[per_patient.to_numpy() > 1]
    if len(shared):
        rows = np.flatnonzero(patients == shared[0])
        if lines is not None:
            where = f"lines {lines[rows][:_SHOW].tolist()}"
        else:
            where = f"images {[str(manifest.paths[row]) for row in rows[:_SHOW]]}"
        raise DataError(
            f"{source}: patient {shared[0]!r} is in splits {sorted(set(splits[rows].tolist()))} ({where}; "
            f"{len(shared)} patient(s) in several splits); a patient's images must share one split"
        )
