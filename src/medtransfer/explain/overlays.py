"""Heatmaps drawn for people: a map blended over the original image, its peak marked, written as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as nnf

from medtransfer.files import atomic_open

__all__ = ["overlay", "save_overlay"]


def _resize(heatmap: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32) if not isinstance(heatmap, Tensor) else heatmap)
    if heat.ndim != 2:
        raise ValueError(f"Expected argument `heatmap` to be a (h, w) map, but got shape {tuple(heat.shape)}")
    heat = heat.detach().float().cpu()[None, None]
    return nnf.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _mark(rgb: np.ndarray, x: float, y: float) -> None:
    """Draw a cyan cross, with a dark outline, centred on pixel ``(x, y)`` (in place)."""
    height, width = rgb.shape[:2]
    arm, cx, cy = max(2, min(height, width) // 25), round(x), round(y)
    for colour, grow in (((0, 0, 0), 1), ((0, 255, 255), 0)):
        thick = max(0, min(height, width) // 200) + grow
        rgb[max(0, cy - thick) : cy + thick + 1, max(0, cx - arm - grow) : cx + arm + grow + 1] = colour
        rgb[max(0, cy - arm - grow) : cy + arm + grow + 1, max(0, cx - thick) : cx + thick + 1] = colour


def overlay(
    image: np.ndarray,
    heatmap: Tensor | np.ndarray,
    alpha: float = 0.6,
    colormap: str = "inferno",
    mark_peak: bool = True,
) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: a ``(h, w)`` heatmap in [0, 1], resized, blended over a ``(H, W)`` or
    ``(H, W, 3)`` uint8 image in a perceptually uniform colour map (also readable in grey and by colour-blind
    readers), each pixel's opacity ``alpha * value`` (cold areas show the image unchanged), the peak marked
    with a cyan cross."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected argument `alpha` to be in [0, 1], but got {alpha}")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(
            f"Expected argument `image` to be a (H, W) or (H, W, 3) uint8 array, but got {image.dtype} {image.shape}"
        )
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    heat = _resize(heatmap, rgb.shape[:2])
    colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    weight = alpha * heat[..., None]  # opacity follows the value
    blended = np.clip(np.rint((1.0 - weight) * rgb.astype(np.float32) + weight * colours), 0, 255).astype(np.uint8)
    if mark_peak and alpha > 0 and heat.max() > 0:
        ys, xs = np.nonzero(heat >= heat.max() - 1e-6)
        _mark(blended, float(xs.mean()), float(ys.mean()))
    return blended


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    heatmap: Tensor | np.ndarray,
    alpha: float = 0.6,
    colormap: str = "inferno",
    mark_peak: bool = True,
) -> Path:
    """Write :func:`overlay` of ``image`` and ``heatmap`` to ``path`` as a PNG, atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as stream:
        Image.fromarray(overlay(image, heatmap, alpha, colormap, mark_peak)).save(stream, format="PNG")
    return path
