"""``medtransfer evaluate``: audit a predictions CSV made elsewhere against a label file (read and joined by
:mod:`medtransfer.commands.evaluate_io`), with the one per-class table of :mod:`medtransfer.decisions.report`."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
#: From this many images on, evaluate says where it stands on stderr (the report itself goes to stdout).
PROGRESS_ROWS = 10_000


@dataclass
class EvaluateResult:
    """The report (one row per class and a ``mean`` row, see :func:`evaluate_predictions`) and, with ``model``,
    the verdict of the exchangeability check (``None`` without); with ``prevalence``, the same report of the
    probabilities adapted to the class shares (``None`` when nothing was adapted) and the ``prevalence`` entry
    (predict's, plus the labels' ``true`` shares)."""

    report: pd.DataFrame
    guarantee: dict[str, Any] | None = None
    adapted: pd.DataFrame | None = None
    prevalence: dict[str, Any] | None = None


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
    prevalence: str = "none",
    prevalence_method: Literal["em", "bbse"] = "em",
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
        prevalence: As predict's, and with model only: none, estimate (the class shares of these predictions, from
            their probabilities and the model's calibration shares) or the shares given (0.3, or 0.2,0.3,0.5); the
            probabilities adapted to them are scored too, beside the labels' true shares.
        prevalence_method: How estimate estimates: em (maximum likelihood) or bbse.

    Returns:
        The report; with ``model`` the check's verdict, with ``prevalence`` the adapted report and the shares.
    """
    from medtransfer.commands.predict import parse_prevalence

    shares = parse_prevalence(prevalence)
    if shares is not None and model is None:
        raise DataError(f"--prevalence {prevalence} needs --model: the checkpoint or MLflow URI that made the "
                        "predictions, whose calibration class shares the probabilities are adapted from")  # fmt: skip
    pred_ids, class_names, probs, targets = _read_joined(predictions, labels, id_column, prob_prefix, label_format,
                                                         label_column, task, path_column)  # fmt: skip
    if model is not None:
        from medtransfer.commands import evaluate_model  # torch and timm: only with a model

        predictor = evaluate_model.load_model(model, task, class_names, shares)
    from medtransfer.decisions.report import evaluation_table  # torch and torchmetrics: not for --help

    started, large = time.perf_counter(), len(pred_ids) >= PROGRESS_ROWS
    report = evaluation_table(probs, targets, class_names, task, threshold)
    if large:
        print(f"evaluate: scored in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    result = EvaluateResult(report)
    title = f"{Path(predictions).name} vs {Path(labels).name}: {task}, {len(pred_ids)} images"
    _print_report(report, title)
    if model is not None:
        result.guarantee = evaluate_model.guarantee(predictor, probs, task)
        if shares is not None:
            result.adapted, result.prevalence = evaluate_model.adapted_report(
                predictor, report, probs, targets, class_names, task, threshold, shares, prevalence_method
            )
            _print_adapted(result, title)
    if out_dir is not None:
        _write_report(result, Path(out_dir), predictions, labels, task)
    return result


def _read_joined(
    predictions: Path, labels: Path, id_column: str, prob_prefix: str, label_format: LabelFormat,
    label_column: str | None, task: Task, path_column: str,
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:  # fmt: skip
    """The predictions' ids, class names and probabilities, and the labels joined to them; a multi-class image
    without exactly one class is a DataError. From :data:`PROGRESS_ROWS` images on, says how long it took."""
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
    if len(pred_ids) >= PROGRESS_ROWS:
        read = time.perf_counter() - started
        print(f"evaluate: {len(pred_ids):,} images read and joined to {labels} in {read:.1f} s "
              f"({len(pred_ids) / max(read, 1e-9):,.0f} images/s); scoring {len(class_names)} classes ...",
              file=sys.stderr, flush=True)  # fmt: skip
    return pred_ids, class_names, probs, targets


def _print_report(report: pd.DataFrame, title: str) -> None:
    shown = report.rename(columns=_short_headers()).rename_axis("class").reset_index()
    print_table(shown, title, 160, whole=shown.columns)


def _print_adapted(result: EvaluateResult, title: str) -> None:
    from medtransfer.commands.predict import prevalence_line

    entry = result.prevalence
    if result.adapted is None:
        print(f"Prevalence ({entry['method']}) not adapted; true shares: "
              + ", ".join(f"{name} {share:.3f}" for name, share in entry["true"].items()))  # fmt: skip
        return
    print(prevalence_line(entry))
    _print_report(result.adapted, f"{title}, adapted to the prevalence ({entry['method']})")


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


def _write_report(result: EvaluateResult, out_dir: Path, predictions: Path, labels: Path, task: str) -> None:
    """``evaluation.csv`` and ``evaluation.json`` (NaN as null, keeping the JSON valid). With adapted probabilities
    the CSV's rows come twice, told apart by a ``probabilities`` column (``as_predicted``, ``adapted``), and the
    JSON holds their ``adapted`` table and the ``prevalence`` entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"predictions": str(predictions), "labels": str(labels), "task": task,
                               "classes": _records(result.report)}  # fmt: skip
    table = result.report
    if result.adapted is not None:
        summary["adapted"] = _records(result.adapted)
        table = pd.concat({"as_predicted": table, "adapted": result.adapted}, names=["probabilities"])
    if result.prevalence is not None:
        summary["prevalence"] = result.prevalence
    write_text_atomic(out_dir / "evaluation.csv", table.to_csv())
    write_text_atomic(out_dir / "evaluation.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _logger.info("Wrote %s and %s", out_dir / "evaluation.csv", out_dir / "evaluation.json")


def _records(report: pd.DataFrame) -> list[dict[str, Any]]:
    """One JSON object per row of the report, NaN as ``None``."""
    return report.astype(object).where(report.notna(), None).rename_axis("class").reset_index().to_dict("records")
