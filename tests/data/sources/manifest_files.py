"""Real images, and writers of small image trees and CSV manifests over them, for the manifest tests.

No conftest.py here: other test modules import ``conftest`` by name, which a second one would shadow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medtransfer.data.sources import Manifest


def load_xray_images(pneumonia_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """60 real 28x28 PneumoniaMNIST train images, the first 30 of each class in file order, and their labels."""
    with np.load(pneumonia_npz) as data:
        labels = data["train_labels"][:, 0]
        rows = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:30]]))
        return data["train_images"][rows], labels[rows]


def write_pngs(xray_images, folder: Path, names: list[str]) -> list[Path]:
    """Write one real image per name (cycling through the images) under ``folder``."""
    images, _ = xray_images
    paths = []
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index % len(images)]).save(path)
        paths.append(path)
    return paths


def write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


def labelled_csv(tmp_path: Path, xray_images, n: int = 20, **columns) -> Path:
    """``tmp_path/labels.csv`` over ``n`` real PNGs in ``tmp_path/img``; ``columns`` are extra per-row lists."""
    names = [f"img/{index:03d}.png" for index in range(n)]
    write_pngs(xray_images, tmp_path, names)
    rows = [{"path": name, **{key: values[row] for key, values in columns.items()}} for row, name in enumerate(names)]
    return write_csv(tmp_path / "labels.csv", rows)


def assert_patients_disjoint(manifest: Manifest) -> None:
    by_split = {split: set(manifest.subset(split).patients) for split in ("train", "val", "test")}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
