"""``medtransfer explain-eval``: do a model's heatmaps point at the findings?

Each method (and stage) of :func:`medtransfer.explain.explain` is scored against boxes on the boxed images the
model detects: ``hit_rate``, the pointing game (Zhang et al. 2016, https://arxiv.org/abs/1608.00507: the share of
maps whose peak lies in the box); ``mean_iou``, of the box and the box of the peak's region of ``map >= threshold``;
``random_rate``, what a random point would score. Printed, written to JSON and logged to one MLflow run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medtransfer.commands.predict import Predictor, load_predictor
from medtransfer.data.boxes import BOX_COLUMNS, CHESTXRAY14_BOX_SIZE, chestxray14_boxes, read_box_table
from medtransfer.data.readers import read_image
from medtransfer.data.transforms import build_eval_transform
from medtransfer.errors import DataError
from medtransfer.explain.methods import DEFAULT_LAYERS, METHODS, box_iou, explain, map_box, pointing_hit, resolve_layer
from medtransfer.files import write_text_atomic
from medtransfer.tracking.mlflow import open_run

__all__ = ["ExplainEvalResult", "localisation_scores", "run_explain_eval"]

_logger = logging.getLogger(__name__)


@dataclass
class ExplainEvalResult:
    """The scores, one row per method and layer (``method``, ``layer``, ``n``, ``hit_rate``, ``mean_iou``,
    ``random_rate``, ``boxes``), and the JSON they were written to."""

    scores: list[dict[str, Any]]
    output: Path


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


def run_explain_eval(
    boxes: str,
    model: str,
    image_root: str | None = None,
    path_column: str = "path",
    box_columns: Sequence[str] = BOX_COLUMNS,
    finding_column: str | None = None,
    box_image_size: int | None = None,
    methods: Sequence[Literal["gradcam", "layercam", "fusion", "occlusion"]] = METHODS,
    layers: Sequence[int | str] | None = None,
    detected_only: bool = True,
    threshold: float = 0.5,
    max_images: int | None = None,
    batch_size: int = 32,
    device: Literal["cpu", "cuda"] = "cpu",
    output: Path = Path("explain_eval.json"),
    tracking_uri: str | None = None,
    experiment: str = "medtransfer-explain",
) -> ExplainEvalResult:
    """Score each explanation method's heatmaps against boxes.

    Args:
        boxes: a CSV of ``path_column`` and ``box_columns``, or ``chestxray14`` (or a ``BBox_List_2017.csv``).
        model: a checkpoint written by ``medtransfer fit`` (the layers are needed).
        image_root: folder the relative image paths resolve against; default: the CSV's folder.
        path_column: the column of image paths.
        box_columns: the four box columns, ``x_min, y_min, x_max, y_max`` in pixels of the image.
        finding_column: the column naming each box's finding, for multi-label models (default: the top label).
        box_image_size: side of the square images the boxes were drawn on (ChestX-ray14: 1024); default: the files'.
        methods: the explanation methods to score.
        layers: stages (``feature_info`` index or module name) of the layer methods; default: each method's own.
        detected_only: score only boxes whose finding the model decides positive (true positives).
        threshold: share of a map's maximum that outlines its region, for the IoU.
        max_images: score at most this many boxes (the first ones), for a quick look.
        batch_size: images per explanation batch.
        device: where the model runs.
        output: JSON file for the table (written atomically).
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else ``mlruns/mlflow.db``).
        experiment: MLflow experiment of the run.
    """
    table, root, box_image_size = _box_table(boxes, image_root, path_column, box_columns, finding_column,
                                             box_image_size)  # fmt: skip
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
    _report(scores, spec.size)
    write_text_atomic(Path(output), json.dumps(scores, indent=2) + "\n")
    _log_to_mlflow(scores, Path(output), model, boxes, tracking_uri, experiment)
    return ExplainEvalResult(scores, Path(output))


def _box_table(
    boxes: str, image_root: str | None, path_column: str, box_columns: Sequence[str], finding_column: str | None,
    box_image_size: int | None,
) -> tuple[Any, Path, int | None]:  # fmt: skip
    """The boxes (a CSV, or ChestX-ray14's list narrowed to the images present), the folder their paths resolve
    against, and the side of the images they were drawn on."""
    chestxray14 = boxes == "chestxray14" or Path(boxes).name.startswith("BBox_List_2017")
    if not chestxray14:
        table = read_box_table(boxes, path_column, box_columns, finding_column)
        return table, Path(image_root) if image_root is not None else Path(boxes).parent, box_image_size
    if image_root is None:
        raise DataError("explain-eval with ChestX-ray14's boxes needs --image_root (the folder of its PNGs)")
    table, root = chestxray14_boxes(None if boxes == "chestxray14" else boxes), Path(image_root)
    table = table[[(root / p).is_file() for p in table["path"]]].reset_index(drop=True)  # the images that are here
    return table, root, box_image_size or CHESTXRAY14_BOX_SIZE


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


def _report(results: list[dict[str, Any]], size: int) -> None:
    print(f"{'method':<10} {'layer':<12} {'n':>5} {'hit rate':>9} {'mean IoU':>9} {'random':>7}   ({size} px)")
    for r in results:
        print(
            f"{r['method']:<10} {r['layer']:<12} {r['n']:>5} {r['hit_rate']:>9.3f} {r['mean_iou']:>9.3f} "
            f"{r['random_rate']:>7.3f}"
        )


def _log_to_mlflow(
    results: list[dict], output: Path, model: str, boxes: str, tracking_uri: str | None, experiment: str
) -> None:
    metrics = {}
    for r in results:
        key = r["method"] if r["layer"] == "-" else f"{r['method']}/{r['layer']}"
        metrics |= {f"{key}/{m}": r[m] for m in ("hit_rate", "mean_iou", "random_rate", "n") if r["n"] or m == "n"}
    with open_run(experiment, f"explain-eval-{Path(model).stem}", tracking_uri) as logger:
        logger.log_hyperparams({"model": str(model), "boxes": str(boxes)})
        logger.log_metrics(metrics)
        logger.experiment.log_artifact(logger.run_id, str(output))
