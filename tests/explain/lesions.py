"""Planted lesions: real normal X-rays at 64 px with a bright blob whose box is known."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as nnf

SIZE = 64  # px, the default config's input size
SIGMA = 0.04 * SIZE  # px; the blob's Gaussian width; its box is +-2 sigma
MEAN, STD = 0.449, 0.226  # ImageNet's, averaged over RGB


def _backgrounds(npz_path, split: str) -> torch.Tensor:
    """Real normal (label 0) chest X-rays of one split, upsampled to SIZE, in [0, 1]."""
    data = np.load(npz_path)
    normal = data[f"{split}_images"][data[f"{split}_labels"][:, 0] == 0]
    images = torch.as_tensor(normal, dtype=torch.float32)[:, None] / 255
    return nnf.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _plant(images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Add a bright Gaussian blob (the lesion) at each ``(x, y)`` centre (pixel coordinates, edges at 0..SIZE)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * SIGMA**2))
    return (images + 0.5 * blob[:, None]).clamp(0, 1)


def _centres(n: int, generator: torch.Generator) -> torch.Tensor:
    return 2 * SIGMA + torch.rand(n, 2, generator=generator) * (SIZE - 4 * SIGMA)


def _boxes(centres: torch.Tensor) -> np.ndarray:
    return torch.cat([centres - 2 * SIGMA, centres + 2 * SIGMA], dim=1).numpy()


def _input(images: torch.Tensor) -> torch.Tensor:
    return ((images - MEAN) / STD).expand(-1, 3, -1, -1)
