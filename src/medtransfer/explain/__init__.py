"""Explanations of a trained classifier's decisions: heatmaps (Grad-CAM, LayerCAM, multi-stage fusion,
occlusion) at the input's resolution, their peaks and boxes as data, and overlays on the image (imported on
first use: the method names need no torch)."""

from importlib import import_module
from typing import Any

from medtransfer.explain.choices import DEFAULT_METHOD, METHODS

__all__ = ["DEFAULT_METHOD", "METHODS", "box_iou", "explain", "map_box", "map_peak", "overlay", "pointing_hit",
           "resolve_layer", "save_overlay"]  # fmt: skip

_HOMES = {"overlay": "overlays", "save_overlay": "overlays"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES.get(name, 'methods')}"), name)
