"""The scoring of ``medtransfer explain-eval``: a checkpoint's heatmaps of each method (and stage) against boxes,
on the boxed images the model detects. Apart from :mod:`medtransfer.commands.explain_eval` so that its ``--help``
imports neither torch nor Captum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer.commands.predictor import Predictor, load_predictor
from medtransfer.data.readers import read_image
from medtransfer.data.transforms import build_eval_transform
from medtransfer.errors import DataError
from medtransfer.explain.methods import DEFAULT_LAYERS, box_iou, explain, map_box, pointing_hit, resolve_layer

__all__ = ["localisation_scores", "score_boxes"]

_logger = logging.getLogger(__name__)


def score_boxes(table: pd.DataFrame, root: Path, box_image_size: int | None, model: str, methods: Sequence[str],
                layers: Sequence[int | str] | None, detected_only: bool, threshold: float, max_images: int | None,
                batch_size: int, device: str) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """One row of :func:`localisation_scores` per method and layer (with ``method``, ``layer``, ``boxes``), and
    the side of the model's input the boxes were scored at."""
    predictor = load_predictor(model, device)
    if not hasattr(predictor.network, "backbone"):
        raise DataError(f"explain-eval needs a checkpoint with the model's layers, not {model}")
    targets = _targets(predictor, table["finding"].tolist())
    known = targets != -1
    if not known.any():
        raise DataError(f"None of the box findings {sorted(set(table['finding']))} is one of the model's classes")
    table, targets = table[known].reset_index(drop=True), targets[known]
    if max_images is not None:
        table, targets = table.iloc[:max_images], targets[:max_images]
    spec = predictor.settings
    transform = build_eval_transform(spec.size, spec.channels, spec.mean, spec.std, spec.interpolation)
    images, input_boxes = _load(table, root, transform, spec.size, box_image_size)
    explained, detected = _detected(predictor, images, targets, batch_size, device)
    chosen = torch.nonzero(detected if detected_only else torch.ones_like(detected)).flatten()
    _logger.info("explain-eval: %d boxes, %d detected", len(table), int(detected.sum()))
    scores = []
    for method in methods:
        for layer in [None] if method == "occlusion" else (layers or [None]):
            heat = _heatmaps(predictor, images, explained, chosen, method, layer, batch_size, device)
            name = "-" if method == "occlusion" else _layer_name(predictor.network, method, layer)
            found = localisation_scores(heat, input_boxes[chosen.numpy()], threshold)
            scores.append({"method": method, "layer": name, **found, "boxes": len(table)})
    return scores, spec.size


def localisation_scores(heatmaps: torch.Tensor | np.ndarray, boxes: np.ndarray, threshold: float = 0.5) -> dict:
    """Pointing-game hit rate, mean IoU of the thresholded map's box, and a random point's expected hit rate,
    for ``(N, H, W)`` maps and ``(N, 4)`` boxes in the maps' pixels."""
    maps = np.asarray(heatmaps, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(maps) != len(boxes):
        raise ValueError(f"Expected as many boxes as maps, but got {len(boxes)} boxes for {len(maps)} maps")
    if not len(maps):
        return {"n": 0, "hit_rate": float("nan"), "mean_iou": float("nan"), "random_rate": float("nan")}
    height, width = maps.shape[1:]
    hits = [pointing_hit(heat, box) for heat, box in zip(maps, boxes, strict=True)]
    ious = [box_iou(map_box(heat, threshold), box) for heat, box in zip(maps, boxes, strict=True)]
    clipped = np.clip(boxes, 0, [width, height, width, height])
    area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) / (width * height)
    scores = {"hit_rate": hits, "mean_iou": ious, "random_rate": area}
    return {"n": len(maps), **{name: float(np.mean(values)) for name, values in scores.items()}}


def _targets(predictor: Predictor, findings: Sequence[str]) -> np.ndarray:
    """Per box, the output explained: 0 (binary), the finding's class index, or -1 when the model lacks it."""
    if predictor.task == "binary":
        return np.zeros(len(findings), dtype=np.int64)
    names = {name.lower(): i for i, name in enumerate(predictor.class_names)}
    if not any(findings):
        return np.full(len(findings), -2, dtype=np.int64)  # no finding column: the top-scoring output
    return np.array([names.get(str(f).lower(), -1) for f in findings], dtype=np.int64)


def _load(rows: Any, root: Path, transform: Any, size: int, box_image_size: int | None) -> tuple:
    images, boxes = [], []
    for row in rows.itertuples():
        path = Path(row.path) if Path(row.path).is_absolute() else root / row.path
        image = read_image(path)
        height, width = image.shape[:2]
        sx = width / box_image_size if box_image_size else 1.0
        sy = height / box_image_size if box_image_size else 1.0
        box = np.array([row.x_min * sx, row.y_min * sy, row.x_max * sx, row.y_max * sy])
        boxes.append(box * [size / width, size / height, size / width, size / height])  # to the model's input
        images.append(transform(image=image)["image"])
    return torch.stack(images), np.stack(boxes)


def _detected(predictor: Predictor, images: torch.Tensor, targets: np.ndarray, batch_size: int,
              device: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per box, the output explained (the top-scoring one where the box names no finding) and whether the model
    decides it positive."""
    with torch.inference_mode():
        probs = torch.cat([predictor.network(images[i : i + batch_size].to(device)).cpu()
                           for i in range(0, len(images), batch_size)])  # fmt: skip
    explained = torch.as_tensor(targets)
    if predictor.task != "binary":
        explained = torch.where(explained < 0, probs.argmax(dim=1), explained)
    decided = predictor.rule.decide(probs)
    if predictor.task == "binary":
        return explained, decided == 1
    if predictor.task == "multiclass":
        return explained, decided == explained
    return explained, decided.gather(1, explained[:, None])[:, 0] == 1


def _heatmaps(predictor: Predictor, images: torch.Tensor, explained: torch.Tensor, chosen: torch.Tensor,
              method: str, layer: int | str | None, batch_size: int, device: str) -> torch.Tensor:  # fmt: skip
    """One method's maps of the chosen images, in batches."""
    maps = []
    for i in range(0, len(chosen), batch_size):
        rows = chosen[i : i + batch_size]
        target = None if predictor.task == "binary" else explained[rows]
        maps.append(explain(predictor.network, images[rows].to(device), target, method, layer).cpu())
    size = predictor.settings.size
    return torch.cat(maps) if maps else torch.zeros(0, size, size)


def _layer_name(network: torch.nn.Module, method: str, layer: int | str | None) -> str:
    return resolve_layer(network.backbone, DEFAULT_LAYERS[method] if layer is None else layer)[0]
