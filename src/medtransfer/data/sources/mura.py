"""MURA's ``.../patientXXXXX/studyN_positive/imageK.png`` tree: :func:`mura_manifest`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtransfer.data.readers import SUPPORTED_SUFFIXES
from medtransfer.data.sources.folder import _existing_dir, _list_images
from medtransfer.data.sources.manifest import Manifest, _carve, _check_fractions, _checked
from medtransfer.errors import DataError

__all__ = ["mura_manifest"]

_MURA_STUDY = re.compile(r"study\d+_(positive|negative)")


def mura_manifest(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    suffixes: Sequence[str] = SUPPORTED_SUFFIXES,
) -> Manifest:
    """A binary manifest of a MURA-style tree: ``.../patientXXXXX/studyN_positive/imageK.png``, split by patient.

    With MURA's official ``root/train`` and ``root/valid`` folders, ``valid`` becomes test and val is carved from train.

    Args:
        root: The dataset folder (e.g. ``MURA-v1.1``, or one body part such as ``MURA-v1.1/train/XR_ELBOW``).
        val_fraction: Share of the patients split here that goes to val.
        test_fraction: Share of the patients that goes to test (ignored with the official folders).
        seed: Seed of the patient shuffle.
        suffixes: File name endings that count as images (case-insensitive); hidden files are ignored.

    Raises:
        DataError: ``root`` is missing or holds no image, an image is not in a ``studyN_positive|negative`` folder,
            a patient is in both official folders, or a split is empty.
    """
    root = _existing_dir(root)
    paths = _list_images(root, suffixes)
    if not paths:
        raise DataError(f"{root} holds no image ending in {tuple(suffixes)}")
    labels, patients = (np.asarray(values) for values in zip(*map(_parse_mura_path, paths), strict=True))
    targets = (labels == "positive").astype(np.int64)
    official = (root / "train").is_dir() and (root / "valid").is_dir()
    fractions = _check_fractions(val_fraction, test_fraction, given=("test",) if official else ())
    given = np.asarray(["test" if official and path.is_relative_to(root / "valid") else "train" for path in paths])
    splits = _carve(given, fractions, seed, groups=patients)
    manifest = Manifest(tuple(paths), targets, splits, ("negative", "positive"), "binary", patients)
    return _checked(manifest, root, required=("train", "test") if official else ("train",))


def _parse_mura_path(path: Path) -> tuple[str, str]:
    """``(label, patient)`` of ``.../<patient>/studyN_<positive|negative>/<image>``."""
    match = _MURA_STUDY.fullmatch(path.parent.name)
    if match is None:
        raise DataError(
            f"{path}: expected a MURA layout .../patientXXXXX/studyN_positive/imageK.png (or studyN_negative), "
            f"but the image is in folder {path.parent.name!r}"
        )
    return match.group(1), path.parent.parent.name
