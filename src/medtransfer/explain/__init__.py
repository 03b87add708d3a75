"""Explanations of a trained classifier's decisions: heatmaps (Grad-CAM, LayerCAM, multi-stage fusion,
occlusion) at the input's resolution, their peaks and boxes as data, and overlays on the image."""

from medtransfer.explain.methods import (
    DEFAULT_METHOD,
    METHODS,
    box_iou,
    explain,
    map_box,
    map_peak,
    pointing_hit,
    resolve_layer,
)
from medtransfer.explain.overlays import overlay, save_overlay

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "box_iou",
    "explain",
    "map_box",
    "map_peak",
    "overlay",
    "pointing_hit",
    "resolve_layer",
    "save_overlay",
]
