"""Grad-CAM heatmaps: which part of the image drove a :class:`ClassifierModule`'s score.

Grad-CAM (Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391) weighs each channel ``A_c`` of the
backbone's last feature map by the mean gradient of the target score over it, ``w_c = mean_hw dS/dA_c``, and
keeps the positive part of ``sum_c w_c A_c``. The map has the backbone's resolution (input / 32 for most timm
CNNs: 2x2 at 64 px, 7x7 at 224 px) and is upsampled to the input size, so it shows a region, not a contour.

Written here in a few lines instead of using the ``grad-cam`` package (pytorch-grad-cam): that package is not
installed, and its ``opencv-python`` dependency clashes with the ``opencv-python-headless`` that albumentations
brings. It only needs the timm split every medtransfer backbone has (``forward_features`` -> ``(N, C, h, w)``,
``forward_head`` -> pooled features); transformer backbones (token maps) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as nnf

from medtransfer.errors import MedtransferError
from medtransfer.files import atomic_open

__all__ = ["grad_cam", "overlay", "save_overlay"]

Target = int | Sequence[int] | Tensor | None


def _target_index(logits: Tensor, task: str, target: Target) -> Tensor:
    """Per image, the output column whose score is explained: the binary logit, the given class/label, or
    the predicted class (multiclass) / the highest-scoring label (multilabel)."""
    n = logits.shape[0]
    if task == "binary":
        if target is not None and not bool((torch.as_tensor(target) == 1).all()):
            raise ValueError(f"Expected argument `target` to be None or 1 for a binary task, but got {target}")
        return torch.zeros(n, dtype=torch.long, device=logits.device)
    if target is None:
        return logits.argmax(dim=1)
    index = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if index.numel() not in (1, n):
        raise ValueError(f"Expected argument `target` to be one index or {n} (one per image), but got {target}")
    index = index.expand(n).clone()
    if bool(((index < 0) | (index >= logits.shape[1])).any()):
        raise ValueError(f"Expected argument `target` to be in [0, {logits.shape[1]}), but got {target}")
    return index


def grad_cam(model: nn.Module, images: Tensor, target: Target = None) -> Tensor:
    """Grad-CAM heatmaps of a classifier for a batch of (already transformed) images.

    The model is evaluated in eval mode (no dropout, BatchNorm running statistics, which are left untouched);
    each submodule's train/eval flag is restored afterwards. The backbone runs without autograd; only the
    pooling and head are differentiated, with ``torch.autograd.grad`` with respect to the feature map, so no
    parameter's ``.grad`` is written and frozen backbones work.
    Gradients need autograd: the function switches inference mode off and grad mode on for its own work, so
    it can be called from inside ``torch.inference_mode()``/``torch.no_grad()`` blocks (the input is cloned).

    Args:
        model: a ``ClassifierModule`` or ``ProbabilityModel`` (any module with a timm ``.backbone`` built with
            ``num_classes=0``, a ``.head`` on its pooled features and a ``task`` or ``hparams.task``).
        images: ``(N, C, H, W)`` model input, normalised as for prediction.
        target: what to explain. Binary: the positive logit (``None`` or 1). Multiclass: a class index for
            all images, one per image, or ``None`` for the predicted class. Multilabel: a label index (or one
            per image), or ``None`` for the label with the highest logit.

    Returns:
        ``(N, H, W)`` float heatmaps in [0, 1] (each image's maximum is 1; an image without any positive
        evidence gets an all-zero map), on the images' device.
    """
    task = model.task if isinstance(getattr(model, "task", None), str) else model.hparams.task
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            device = next(model.parameters()).device
            x = images.detach().clone().to(device)
            with torch.no_grad():
                features = model.backbone.forward_features(x)
            if features.ndim != 4:
                raise MedtransferError(
                    f"Grad-CAM needs a convolutional backbone whose features are (N, C, h, w); "
                    f"{type(model.backbone).__name__} gives shape {tuple(features.shape)}"
                )
            features = features.detach().requires_grad_(True)
            logits = model.head(model.backbone.forward_head(features))
            index = _target_index(logits.detach(), task, target)
            scores = logits.gather(1, index[:, None]).sum()  # images are independent in eval mode
            (gradients,) = torch.autograd.grad(scores, features)
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features.detach()).sum(dim=1, keepdim=True))
        cam = nnf.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.amax(dim=(1, 2), keepdim=True)
        cam = torch.where(peak > 1e-12, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
        return cam.clamp(0, 1).to(images.device)
    finally:
        for module, training in modes.items():
            module.training = training


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
    """Blend a heatmap over the original image, for a human to look at.

    Readable at a glance: the colour map is perceptually uniform (``inferno``: dark purple -> orange ->
    yellow, also in grey print and for colour-blind readers), each pixel's opacity follows the map's value
    (``alpha * value``: where the map is cold the image shows unchanged) and the peak is marked with a cyan cross.

    Args:
        image: the original ``(H, W)`` grayscale or ``(H, W, 3)`` RGB ``uint8`` image, at any size.
        heatmap: a ``(h, w)`` map in [0, 1] (e.g. one row of :func:`grad_cam`); resized to the image.
        alpha: opacity of the colour where the map is 1 (0: the image only, 1: the colour only there).
        colormap: a matplotlib colour map name.
        mark_peak: draw a cross on the map's maximum (not when ``alpha`` is 0 or the map is all zero).

    Returns:
        ``(H, W, 3)`` ``uint8`` RGB.
    """
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
