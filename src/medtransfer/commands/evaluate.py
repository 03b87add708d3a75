"""``medtransfer evaluate``: audit a predictions CSV made elsewhere against a label file (read and joined by
:mod:`medtransfer.commands.evaluate_io`), with the one per-class table of :mod:`medtransfer.decisions.report`."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer.commands.compare import print_table
from medtransfer.commands.evaluate_io import SHOW, LabelFormat, join_on_ids, read_labels, read_predictions
from medtransfer.data.tables import CHESTXRAY14_FINDINGS  # re-exported (in __all__)
from medtransfer.errors import DataError
from medtransfer.files import write_text_atomic
from medtransfer.task import Task

__all__ = ["CHESTXRAY14_FINDINGS", "EvaluateResult", "join_on_ids", "read_labels",
           "read_predictions", "run_evaluate"]  # fmt: skip

_logger = logging.getLogger(__name__)

_THRESHOLD = 0.5  # decision threshold of the accuracy columns; confidence is the margin |p - 0.5|


@dataclass
class EvaluateResult:
    """The report (one row per class and a ``mean`` row, see :func:`evaluate_predictions`) and, with ``model``,
    the verdict of the exchangeability check (``None`` without)."""

    report: pd.DataFrame
    guarantee: dict[str, Any] | None = None


def run_evaluate(
    predictions: Path,
    labels: Path,
    out_dir: Path | None = None,
    id_column: str = "Image Index",
    prob_prefix: str = "prob_",
    label_format: LabelFormat = "chestxray14",
    label_column: str | None = None,
    task: Task = "multilabel",
    path_column: str = "path",
    threshold: float | list[float] = _THRESHOLD,
    model: str | None = None,
) -> EvaluateResult:
    """Audit predictions made elsewhere: join them to a label file on the image id and report per-class metrics.

    Per class and on average: n, positives, AUROC, AURC, ECE (15 bins), accuracy at the threshold and selective
    accuracy at 80/90/95 % coverage (confidence = distance from the threshold); blank where a class lacks
    positives or negatives. The help text is generated from this docstring, so it avoids markup.

    Args:
        predictions: CSV of predictions (may be .gz). Every id must have a row in the labels file.
        labels: CSV of labels (may be .gz), joined on the id; rows without a prediction are ignored.
        out_dir: If given, write evaluation.csv and evaluation.json to this folder (created if missing).
        id_column: Name of the id column, in both files.
        prob_prefix: Prefix of the probability columns in the predictions file (the rest names the class).
        label_format: chestxray14 ('|'-joined 'Finding Labels'), columns (0/1 per class) or single (a class per row).
        label_column: Column of the labels for chestxray14 (default 'Finding Labels') and single (default 'label').
        task: multilabel, binary (the last probability column is the positive class) or multiclass; scored one-vs-rest.
        path_column: Without an id column (predict's CSV), the file names of this column's paths are the ids.
        threshold: Decision threshold of the accuracy columns, one for all classes or one per class.
        model: Optional checkpoint or MLflow URI that made the predictions: checks they look like its calibration data.

    Returns:
        The report, and with ``model`` the check's verdict.
    """
    started = time.perf_counter()
    pred_ids, class_names, probs = read_predictions(predictions, id_column, prob_prefix, path_column)
    label_ids, targets = read_labels(labels, class_names, id_column, label_format, label_column)
    targets = join_on_ids(pred_ids, label_ids, targets, predictions, labels)
    if task == "multiclass" and targets.ndim == 2:
        wrong = targets.sum(axis=1) != 1
        if wrong.any():
            first = ", ".join(repr(value) for value in pred_ids[wrong][:SHOW])
            raise DataError(
                f"task 'multiclass' needs exactly one class per image, but {int(wrong.sum())} image(s) in {labels} "
                f"have none or several: {first}{' ...' if wrong.sum() > SHOW else ''}"
            )
    read, large = time.perf_counter() - started, len(pred_ids) >= PROGRESS_ROWS
    if large:
        rate = len(pred_ids) / max(read, 1e-9)
        print(f"evaluate: {len(pred_ids):,} images read and joined to {labels} in {read:.1f} s ({rate:,.0f} "
              f"images/s); scoring {len(class_names)} classes ...", file=sys.stderr, flush=True)  # fmt: skip
    from medtransfer.decisions.report import evaluation_table  # torch and torchmetrics: not for --help

    report = evaluation_table(probs, targets, class_names, task, threshold)
    if large:
        print(f"evaluate: scored in {time.perf_counter() - started - read:.1f} s", file=sys.stderr, flush=True)
    guarantee = _guarantee(model, probs, task) if model is not None else None
    shown = report.rename(columns=_short_headers()).rename_axis("class").reset_index()
    print_table(shown, f"{Path(predictions).name} vs {Path(labels).name}: {task}, {len(pred_ids)} images", 160,
                whole=shown.columns)  # fmt: skip
    if out_dir is not None:
        _write_report(report, Path(out_dir), predictions, labels, task)
    return EvaluateResult(report, guarantee)


#: From this many images on, evaluate says where it stands on stderr (the report itself goes to stdout).
PROGRESS_ROWS = 10_000


def _guarantee(model: str, probs: np.ndarray, task: str) -> dict:
    """The exchangeability verdict of these probabilities against ``model``'s calibration scores."""
    import torch

    from medtransfer.commands.predict import load_predictor
    from medtransfer.decisions.risk_control import guarantee_verdict

    predictor = load_predictor(model)
    scores = torch.as_tensor(probs[:, -1] if task == "binary" else probs, dtype=torch.float32)
    verdict = guarantee_verdict(predictor.rule, predictor.calibration, [scores])
    print(f"Guarantee of {model}: {verdict.get('message', 'calibrated')}")
    return verdict


def _short_headers() -> dict[str, str]:
    """Narrower headers of the printed table (the files keep the report's names)."""
    from medtransfer.decisions.report import COVERAGES

    return {"positives": "pos", "accuracy": "acc",
            **{f"sel_acc_{round(c * 100)}": f"acc@{round(c * 100)}" for c in COVERAGES}}  # fmt: skip


def __getattr__(name: str) -> Any:
    """``COVERAGES`` and ``evaluate_predictions`` (the one report, per class), imported on first use."""
    if name in ("COVERAGES", "evaluate_predictions"):
        from medtransfer.decisions import report

        return getattr(report, "evaluation_table" if name == "evaluate_predictions" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _write_report(report: pd.DataFrame, out_dir: Path, predictions: Path, labels: Path, task: str) -> None:
    """``evaluation.csv`` and ``evaluation.json`` (NaN as null, keeping the JSON valid)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = report.astype(object).where(report.notna(), None).rename_axis("class").reset_index()
    summary = {"predictions": str(predictions), "labels": str(labels), "task": task,
               "classes": classes.to_dict("records")}  # fmt: skip
    write_text_atomic(out_dir / "evaluation.csv", report.to_csv())
    write_text_atomic(out_dir / "evaluation.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _logger.info("Wrote %s and %s", out_dir / "evaluation.csv", out_dir / "evaluation.json")
