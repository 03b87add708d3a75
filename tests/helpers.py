"""Small builders shared by tests: a tiny two-class image task that a real timm backbone can fit."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def tiny_loaders(
    n: int = 32, size: int = 32, batch_size: int = 8, seed: int = 0, signal: float = 1.0
) -> tuple[DataLoader, DataLoader]:
    """Train/val loaders of noise images whose class is a brighter centre; both classes in each split."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=generator)
    images[:, :, size // 4 : -size // 4, size // 4 : -size // 4] += signal * labels.view(-1, 1, 1, 1).float()
    dataset = TensorDataset(images, labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)
