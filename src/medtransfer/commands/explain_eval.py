"""``medtransfer explain-eval``: do a model's heatmaps point at the findings?

Each method (and stage) of :func:`medtransfer.explain.explain` is scored against boxes on the boxed images the
model detects: ``hit_rate``, the pointing game (Zhang et al. 2016, https://arxiv.org/abs/1608.00507: the share of
maps whose peak lies in the box); ``mean_iou``, of the box and the box of the peak's region of ``map >= threshold``;
``random_rate``, what a random point would score. Printed, written to JSON and logged to one MLflow run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medtransfer.data.boxes import BOX_COLUMNS, CHESTXRAY14_BOX_SIZE, chestxray14_boxes, read_box_table
from medtransfer.errors import DataError
from medtransfer.explain.choices import METHODS, Method
from medtransfer.files import write_text_atomic

__all__ = ["ExplainEvalResult", "run_explain_eval"]


@dataclass
class ExplainEvalResult:
    """The scores, one row per method and layer (``method``, ``layer``, ``n``, ``hit_rate``, ``mean_iou``,
    ``random_rate``, ``boxes``), and the JSON they were written to."""

    scores: list[dict[str, Any]]
    output: Path


def run_explain_eval(
    boxes: str,
    model: str,
    image_root: str | None = None,
    path_column: str = "path",
    box_columns: Sequence[str] = BOX_COLUMNS,
    finding_column: str | None = None,
    box_image_size: int | None = None,
    methods: Sequence[Method] = METHODS,
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
    from medtransfer.commands.explain_scores import score_boxes  # here, not at the top: --help needs no torch

    table, root, box_image_size = _box_table(boxes, image_root, path_column, box_columns, finding_column,
                                             box_image_size)  # fmt: skip
    scores, size = score_boxes(table, root, box_image_size, model, methods, layers, detected_only, threshold,
                               max_images, batch_size, device)  # fmt: skip
    _report(scores, size)
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
    from medtransfer.tracking.mlflow import open_run

    metrics = {}
    for r in results:
        key = r["method"] if r["layer"] == "-" else f"{r['method']}/{r['layer']}"
        metrics |= {f"{key}/{m}": r[m] for m in ("hit_rate", "mean_iou", "random_rate", "n") if r["n"] or m == "n"}
    with open_run(experiment, f"explain-eval-{Path(model).stem}", tracking_uri) as logger:
        logger.log_hyperparams({"model": str(model), "boxes": str(boxes)})
        logger.log_metrics(metrics)
        logger.experiment.log_artifact(logger.run_id, str(output))
