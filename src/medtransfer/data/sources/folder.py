"""Class folders, optionally below split folders: :func:`folder_manifest`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtransfer.data.readers import SUPPORTED_SUFFIXES
from medtransfer.data.sources.manifest import SPLITS, Manifest, _carve, _check_fractions, _checked
from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = ["folder_manifest"]

_logger = logging.getLogger(__name__)


def folder_manifest(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    suffixes: Sequence[str] = SUPPORTED_SUFFIXES,
) -> Manifest:
    """A manifest from class folders: ``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>``.

    Classes sorted by name (two: binary); a split without a folder is carved from ``train``, stratified by class.

    Args:
        root: The dataset folder.
        val_fraction: Share of the images split here that goes to val (of ``train`` when split folders exist).
        test_fraction: Share of the images split here that goes to test (ignored when ``root/test`` exists).
        seed: Seed of the split.
        suffixes: File name endings that count as images (case-insensitive); hidden files are ignored.

    Raises:
        DataError: ``root`` is missing, mixes split and class folders, holds under two classes, or a split is empty.
    """
    root = _existing_dir(root)
    split_dirs = _split_folders(root)
    fractions = _check_fractions(val_fraction, test_fraction, given=tuple(split_dirs))
    found = {split: _class_images(folder, suffixes) for split, folder in split_dirs.items()}
    paths = [path for images in found.values() for path, _ in images]
    labels = [label for images in found.values() for _, label in images]
    given = np.asarray([split for split, images in found.items() for _ in images], dtype="<U5")
    class_names = tuple(sorted(set(labels)))
    if len(class_names) < 2:
        raise DataError(
            f"{root}: found {len(paths)} image(s) in {len(class_names)} class folder(s) {list(class_names)}; "
            f"expected root/<class>/... with at least 2 classes and images ending in {tuple(suffixes)}"
        )
    targets = np.searchsorted(class_names, labels).astype(np.int64)
    splits = _carve(given, fractions, seed, strata=targets)
    task: Task = "binary" if len(class_names) == 2 else "multiclass"
    return _checked(Manifest(tuple(paths), targets, splits, class_names, task), root, required=tuple(split_dirs))


def _existing_dir(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} {'is not a folder' if path.exists() else 'does not exist'}")
    return path


def _list_images(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Image files below ``folder`` (any depth), sorted; hidden files and folders are skipped."""
    endings = tuple(suffix.lower() for suffix in suffixes)
    return sorted(
        path
        for path in folder.rglob("*")
        if path.name.lower().endswith(endings)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and (path.is_file() or path.is_symlink())  # a broken link is reported, not dropped
    )


def _split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` for ``root/{train,val,test}``, or ``{"train": root}`` for plain class folders."""
    folders = {path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")}
    present = [split for split in SPLITS if split in folders]
    if not present:
        return {"train": root}
    others = sorted(folders - set(SPLITS))
    if others or "train" not in present:
        raise DataError(
            f"{root} holds split folders {present} "
            + (f"beside other folders {others}" if others else "but no 'train' folder")
            + ": expected either root/<class>/... or root/train/<class>/... (with optional val/ and test/)"
        )
    return {split: root / split for split in present}


def _class_images(folder: Path, suffixes: Sequence[str]) -> list[tuple[Path, str]]:
    """``(path, class)`` of the images below ``folder/<class>/``: the class is the first folder level."""
    found: list[tuple[Path, str]] = []
    for class_dir in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        images = _list_images(class_dir, suffixes)
        if not images:
            _logger.warning("Ignoring %s: it holds no image ending in %s", class_dir, tuple(suffixes))
        found += [(path, class_dir.name) for path in images]
    loose = [path for path in folder.iterdir() if path.is_file() and path.name.lower().endswith(tuple(suffixes))]
    if loose:
        _logger.warning(
            "Ignoring %d image(s) directly in %s, not in a class folder (e.g. %s)", len(loose), folder, loose[0]
        )
    return found
