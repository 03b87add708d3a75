"""albumentations pipelines for gray ``(H, W)`` and colour ``(H, W, 3)`` medical images, sized and normalised for
the backbone; gray is replicated to ``channels``."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = ["INTERPOLATIONS", "build_eval_transform", "build_train_transform"]

#: timm's interpolation names (as in a model's data config) -> OpenCV flags.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _finish(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], interpolation: str, color: str = "gray"
) -> list[A.BasicTransform]:
    """Resize, replicate gray to ``channels`` and normalise with the backbone's mean/std (per channel)."""
    if channels not in (1, 3):
        raise ValueError(f"Expected argument `channels` to be 1 or 3, but got {channels}")
    if color not in ("gray", "rgb"):
        raise ValueError(f"Expected argument `color` to be gray or rgb, but got {color!r}")
    if color == "rgb" and channels != 3:
        raise ValueError("Colour images need `channels: 3` (and the model's `in_chans: 3`), but got channels 1")
    if color == "rgb" and len(mean) != 3:
        raise ValueError(f"Expected a mean and std per RGB channel for colour images, but got mean {tuple(mean)}")
    if channels == 1:  # one channel for timm's adapted first conv: the average of the RGB statistics
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Expected argument `interpolation` to be one of {sorted(INTERPOLATIONS)}, but got {interpolation!r}"
        )
    steps: list[A.BasicTransform] = [A.Resize(size, size, interpolation=INTERPOLATIONS[interpolation])]
    if channels == 3 and color == "gray":
        steps.append(A.ToRGB(num_output_channels=3))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return steps


def build_eval_transform(
    size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    steps: Sequence[A.BasicTransform] = (),
    color: str = "gray",
) -> A.Compose:
    """Deterministic pipeline for validation, test and prediction; ``steps`` run on the resized uint8 image.
    ``color``: ``gray`` for ``(H, W)`` input, ``rgb`` for ``(H, W, 3)`` input."""
    finish = _finish(size, channels, mean, std, interpolation, color)
    return A.Compose([finish[0], *steps, *finish[1:]])


def build_train_transform(
    size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    rotate_degrees: float = 10.0,
    translate: float = 0.05,
    scale: float = 0.05,
    brightness_contrast: float = 0.0,
    horizontal_flip: bool = False,
    clahe: float = 0.0,
    steps: Sequence[A.BasicTransform] | None = None,
    color: str = "gray",
    color_jitter: float = 0.0,
    stain_jitter: float = 0.0,
) -> A.Compose:
    """Training pipeline: a small random affine (and optional CLAHE, brightness/contrast, flip), then as eval.

    Flips are off by default: on chest X-rays laterality carries meaning. ``steps`` (albumentations transforms,
    e.g. from YAML) replace the built-in augmentations. Colour input only: ``color_jitter`` (saturation ``1 +- s``,
    hue ``+- s/4``, half the time; camera colour balance) and ``stain_jitter`` (probability of ``HEStain``; H&E
    staining that varies between labs).
    """
    if color != "rgb" and (color_jitter or stain_jitter):
        raise ValueError("color_jitter and stain_jitter need colour images (color: rgb); set them to 0 for gray data")
    augment: list[A.BasicTransform] = list(steps) if steps is not None else []
    if steps is None and (rotate_degrees or translate or scale):
        augment.append(
            A.Affine(
                rotate=(-rotate_degrees, rotate_degrees),
                translate_percent=(-translate, translate),
                scale=(1 - scale, 1 + scale),
                border_mode=cv2.BORDER_CONSTANT,
                p=1.0,
            )
        )
    if steps is None and clahe:
        augment.append(A.CLAHE(clip_limit=2.0, p=clahe))
    if steps is None and brightness_contrast:
        augment.append(A.RandomBrightnessContrast(brightness_contrast, brightness_contrast, p=0.5))
    if steps is None and horizontal_flip:
        augment.append(A.HorizontalFlip(p=0.5))
    if steps is None and color_jitter:
        augment.append(A.ColorJitter(brightness=0, contrast=0, saturation=color_jitter, hue=color_jitter / 4, p=0.5))
    if steps is None and stain_jitter:
        augment.append(A.HEStain(p=stain_jitter))
    finish = _finish(size, channels, mean, std, interpolation, color)
    return A.Compose([finish[0], *augment, *finish[1:]])
