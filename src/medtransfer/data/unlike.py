"""A cheap check that an image looks like the training data: five statistics of the model's input image against
the range they take on the validation images.

A pneumonia model scores an MR slice as confidently as an X-ray, so ``predict`` flags such images: ``mean``, ``std``,
``colour`` (spread between channels), ``dark`` (share in the darkest tenth) and ``edges`` (mean neighbour difference
over the std), against their 0.5-99.5 % quantiles on validation images widened by half their width. It catches
other modalities, colour photos and blank or inverted images; it is not a trained detector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["STATISTICS", "image_statistics", "reference_from_dataset", "reference_range", "unlike_reasons"]

STATISTICS = ("mean", "std", "colour", "dark", "edges")
_MARGIN = 0.5  # the accepted range is [low - m, high + m], m = margin * (high - low) + _FLOOR
_FLOOR = 0.02  # in normalised units: lets a statistic that is constant in training (grey: colour 0) vary a little


def image_statistics(images: Tensor) -> Tensor:
    """``(N, 5)`` statistics (:data:`STATISTICS`) of a batch of normalised images ``(N, C, H, W)``."""
    x = images.float()
    grey = x.mean(1)
    low = grey.amin((1, 2), keepdim=True)
    high = grey.amax((1, 2), keepdim=True)
    std = x.std((1, 2, 3))
    edges = (grey.diff(dim=1).abs().mean((1, 2)) + grey.diff(dim=2).abs().mean((1, 2))) / (std + 1e-6)
    return torch.stack([
        x.mean((1, 2, 3)),
        std,
        (x.amax(1) - x.amin(1)).mean((1, 2)),
        (grey <= low + 0.1 * (high - low)).float().mean((1, 2)),
        edges,
    ], 1)  # fmt: skip


def reference_range(statistics: Tensor) -> dict[str, list[float]]:
    """``{"low": [...], "high": [...]}``: the 0.5 and 99.5 % quantiles of each statistic over ``(N, 5)`` rows."""
    low, high = torch.quantile(statistics.double(), torch.tensor([0.005, 0.995], dtype=torch.float64), dim=0)
    return {"statistics": list(STATISTICS), "low": low.tolist(), "high": high.tolist()}


def reference_from_dataset(dataset: Any, max_images: int = 256) -> dict[str, list[float]] | None:
    """The reference range of up to ``max_images`` evenly spaced images of ``dataset`` (``(image, target)``
    items); None for an empty dataset."""
    n = len(dataset)
    if n == 0:
        return None
    indices = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique().tolist()
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
    return reference_range(image_statistics(images))


def unlike_reasons(images: Tensor, reference: dict[str, list[float]] | None) -> list[str]:
    """Per image, ``""`` when every statistic is within the reference range, else the statistics outside it
    (``"colour 0.61 > 0.02; dark 0.58 > 0.31"``)."""
    if not reference:
        return [""] * len(images)
    stats = image_statistics(images).double().cpu()
    low, high = (torch.tensor(reference[key], dtype=torch.float64) for key in ("low", "high"))
    margin = _MARGIN * (high - low) + _FLOOR
    lower, upper = (low - margin).tolist(), (high + margin).tolist()
    reasons = []
    for row in stats.tolist():
        parts = [f"{name} {v:.2f} < {lo:.2f}" for name, v, lo in zip(STATISTICS, row, lower, strict=True) if v < lo]
        parts += [f"{name} {v:.2f} > {hi:.2f}" for name, v, hi in zip(STATISTICS, row, upper, strict=True) if v > hi]
        reasons.append("; ".join(parts))
    return reasons
