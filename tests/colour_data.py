"""Small real colour datasets for tests: tiles of scikit-image's immunohistochemistry slide (real IHC histology)
whose two classes differ in hue at equal luminance, as a MedMNIST-layout npz, PNG files, a CSV and class folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from medtransfer.data.readers import to_gray

#: An RGB direction of (almost exactly) zero ITU-R 601 luma: 0.299 * 40 - 0.587 * 20 - 0.114 * 2 = -0.008.
TINT = np.array([40, -20, -2])
CLASSES = ("cool", "warm")


def tissue_tiles(size: int = 16, seed: int = 0) -> np.ndarray:
    """The 512x512 IHC slide cut into ``(512 // size) ** 2`` RGB tiles, in a seeded random order."""
    slide = skdata.immunohistochemistry()
    n = 512 // size
    tiles = slide[: n * size, : n * size].reshape(n, size, n, size, 3).swapaxes(1, 2).reshape(-1, size, size, 3)
    return tiles[np.random.default_rng(seed).permutation(len(tiles))]


def hue_pairs(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(2N, T, T, 3)`` images and ``(2N,)`` labels: each tile's luma squeezed into 60-190 (so that no tint
    clips), then tinted ``-TINT`` (class 0) and ``+TINT`` (class 1): the two have the same gray image."""
    gray = 60 + np.rint(to_gray(tiles) * (130 / 255)).astype(int)
    images = np.stack([gray[..., None] + sign * TINT for sign in (-1, 1)], axis=1).astype(np.uint8)
    return images.reshape(-1, *images.shape[2:]), np.tile([0, 1], len(tiles))


def hue_splits(pairs: dict[str, int], size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``split -> (images, labels)`` of hue pairs on disjoint tiles."""
    tiles, start, splits = tissue_tiles(size), 0, {}
    for split, count in pairs.items():
        splits[split] = hue_pairs(tiles[start : start + count])
        start += count
    return splits


def write_npz(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """The splits in MedMNIST's layout: ``{split}_images`` ``(N, H, W[, 3])`` and ``{split}_labels`` ``(N, 1)``."""
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays |= {f"{split}_images": images, f"{split}_labels": labels[:, None]}
    np.savez(path, **arrays)
    return path


def write_files(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    """PNGs in ``root/{split}/{class}/`` (a folder layout) and ``root/labels.csv`` (path, label, split)."""
    rows = []
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / split / CLASSES[label] / f"{split}{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            rows.append({"path": str(path.relative_to(root)), "label": CLASSES[label], "split": split})
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root, root / "labels.csv"
