"""Shared by the manifest tests: real PneumoniaMNIST images to write as PNG trees."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def xray_images(pneumonia_npz) -> np.ndarray:
    """60 real 28x28 PneumoniaMNIST train images, the first 30 of each class in file order, and their labels."""
    with np.load(pneumonia_npz) as data:
        labels = data["train_labels"][:, 0]
        rows = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:30]]))
        return data["train_images"][rows], labels[rows]
