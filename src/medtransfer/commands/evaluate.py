"""``medtransfer evaluate``: audit a predictions CSV made elsewhere against a label file.

The predictions file holds one row per image: an id column and one ``<prob_prefix><class>`` column of
probabilities per class. The label file is joined to it on the id and may be the official ChestX-ray14 file
(``Finding Labels`` joined by ``|``), a file with one 0/1 column per class, or one column holding a single
class per row. The report has one row per class (one-vs-rest for ``multiclass``) and a ``mean`` row (macro
average): n, positives, AUROC (torchmetrics), AURC, ECE (15 bins, torchmetrics) and selective accuracy at 80,
90 and 95 % coverage (``medtransfer.metrics.functional``).

Every problem with the input files is a :class:`~medtransfer.errors.DataError` whose message names the file,
the line (the header is line 1) and the column at fault.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_calibration_error

from medtransfer.data.tables import (
    CHESTXRAY14_FINDINGS,  # re-exported (in __all__)
    parse_binary_column,
    parse_chestxray14_findings,
    parse_class_labels,
    read_csv_table,
    require_columns,
)
from medtransfer.errors import DataError, exit_on_user_error
from medtransfer.files import write_text_atomic
from medtransfer.metrics import functional as _selective  # not imported by name: run_evaluate has `predictions`

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "COVERAGES",
    "evaluate_predictions",
    "join_on_ids",
    "main",
    "read_labels",
    "read_predictions",
    "run_evaluate",
]

_logger = logging.getLogger(__name__)

_CHESTXRAY14_LABEL_COLUMN = "Finding Labels"
#: Coverages at which the report gives selective accuracy (columns ``sel_acc_80`` ...).
COVERAGES: tuple[float, ...] = (0.80, 0.90, 0.95)
_ECE_BINS = 15
_THRESHOLD = 0.5  # decision threshold of the accuracy columns; confidence is the margin |p - 0.5|
_SHOW = 5  # how many offending ids/lines an error message lists

LabelFormat = Literal["chestxray14", "columns", "single"]
Task = Literal["multilabel", "binary", "multiclass"]


# --------------------------------------------------------------------------------------------------- reading
def _read_ids(frame: pd.DataFrame, id_column: str, path: Path) -> np.ndarray:
    """The stripped ids; an empty or duplicated id is a DataError naming its lines."""
    ids = frame[id_column].str.strip()
    empty = ids.index[ids == ""]
    if len(empty):
        raise DataError(f"{path} line {empty[0]}, column {id_column!r}: the id is empty")
    duplicated = ids[ids.duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.unique()[:_SHOW]
        where = "; ".join(f"{value!r} on lines {list(duplicated.index[duplicated == value])}" for value in first)
        raise DataError(
            f"{path} has {duplicated.nunique()} duplicated id(s) in column {id_column!r}: {where}"
            + (" ..." if duplicated.nunique() > _SHOW else "")
        )
    return ids.to_numpy(dtype=object)


def read_predictions(
    path: Path | str, id_column: str = "Image Index", prob_prefix: str = "prob_", path_column: str = "path"
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read a predictions CSV: an id column and one ``<prob_prefix><class>`` probability column per class.

    ``medtransfer predict``'s CSV is read as it is: without an ``id_column`` but with a ``path_column``, the id
    of a row is the file name of its path (``images/00000001_000.png`` -> ``00000001_000.png``, the image
    names of the ChestX-ray14 label file), and rows that predict could not read (an ``error``) are skipped.

    Args:
        path: The CSV file (may be compressed, e.g. ``.csv.gz``).
        id_column: The column holding the image ids.
        prob_prefix: Prefix of the probability columns; the rest of the column name is the class name.
        path_column: The column of image paths whose file names are the ids when there is no ``id_column``.

    Returns:
        ``(ids, class_names, probs)``: ids as an object array of ``str`` of shape (N,), the class names in column
        order, and the probabilities as a float64 array of shape (N, C).

    Raises:
        DataError: The file is missing, empty or not a CSV; lacks the id column or probability columns; has an
            empty or duplicated id; or a probability is not a number, NaN or outside [0, 1] (the message names
            the line and column).
    """
    path = Path(path)
    frame = read_csv_table(path, "predictions")
    if id_column not in frame.columns and path_column in frame.columns:
        frame = _ids_from_paths(frame, id_column, path_column, path)
    require_columns(frame, [id_column], path)
    prob_columns = [name for name in frame.columns if name.startswith(prob_prefix) and name != id_column]
    if not prob_columns:
        raise DataError(
            f"{path} has no probability column: expected columns named {prob_prefix!r} + class name; "
            f"its columns are {list(frame.columns)}"
        )
    class_names = [name[len(prob_prefix) :] for name in prob_columns]
    if "" in class_names:
        raise DataError(f"{path}: column {prob_prefix!r} names no class (expected {prob_prefix!r} + class name)")
    ids = _read_ids(frame, id_column, path)
    probs = np.column_stack([_read_probabilities(frame[name], path) for name in prob_columns])
    return ids, class_names, probs


def _ids_from_paths(frame: pd.DataFrame, id_column: str, path_column: str, path: Path) -> pd.DataFrame:
    """``predict``'s rows with an id (the path's file name) in ``id_column``; unreadable images dropped."""
    errors = frame["error"].str.strip() != "" if "error" in frame.columns else pd.Series(False, index=frame.index)
    if errors.any():
        _logger.warning("%s: %d row(s) of images predict could not read are left out (first: line %d)",
                        path, int(errors.sum()), errors.index[errors][0])  # fmt: skip
        frame = frame[~errors]
    if frame.empty:
        raise DataError(f"{path} has no predicted image: every row has an error")
    frame = frame.copy()
    frame[id_column] = [PurePath(p.strip().replace("\\", "/")).name for p in frame[path_column]]
    _logger.info("%s: no %r column; matching the file names in %r to the label file", path, id_column, path_column)
    return frame


def _read_probabilities(column: pd.Series, path: Path) -> np.ndarray:
    """One column of probabilities as float64; the first bad cell is a DataError naming its line and column."""
    text = column.str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~((values >= 0.0) & (values <= 1.0))  # also True for NaN
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        line, raw, value = column.index[position], text.iloc[position], values[position]
        if raw == "":
            problem = "the probability is empty"
        elif math.isnan(value) and raw.lower() not in {"nan", "-nan", "+nan"}:
            problem = f"{raw!r} is not a number"
        elif math.isnan(value):
            problem = "the probability is NaN"
        else:
            problem = f"the probability {raw} is outside [0, 1]"
        more = int(bad.sum()) - 1
        raise DataError(
            f"{path} line {line}, column {column.name!r}: {problem}"
            + (f" ({more} more bad value(s) in this column)" if more else "")
        )
    return values


def read_labels(
    path: Path | str,
    class_names: Sequence[str],
    id_column: str = "Image Index",
    label_format: LabelFormat = "chestxray14",
    label_column: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a label file and return its ids and targets for ``class_names``.

    Args:
        path: The CSV file (may be compressed, e.g. the official ``Data_Entry_2017_v2020.csv.gz``).
        class_names: The classes to return targets for, in order (usually those of the predictions file).
        id_column: The column holding the image ids.
        label_format: ``"chestxray14"``: the official ChestX-ray14 label file, findings joined by ``|`` in
            ``Finding Labels`` (``"No Finding"`` means none); every class name must be one of the 14 findings.
            ``"columns"``: one 0/1 column per class, named exactly as the class. ``"single"``: one column holding
            one class per row, as a class name or a 0-based index (for a single class name: 0, 1 or that name,
            which means 1).
        label_column: The column holding the labels: ``"Finding Labels"`` by default for ``chestxray14``,
            ``"label"`` for ``single``; unused for ``columns``.

    Returns:
        ``(ids, targets)``: ids as an object array of ``str`` of shape (N,); targets as an int64 array of 0/1 of
        shape (N, C) for ``chestxray14`` and ``columns``, or of class indices of shape (N,) for ``single``.

    Raises:
        DataError: The file is missing, empty or not a CSV; lacks a column; has an empty or duplicated id; or a
            label is unknown or not 0/1 (the message names the line, the column and the value).
    """
    path = Path(path)
    class_names = list(class_names)
    frame = read_csv_table(path, "labels")
    require_columns(frame, [id_column], path)
    if label_format == "chestxray14":
        column = label_column or _CHESTXRAY14_LABEL_COLUMN
        require_columns(frame, [column], path)
        targets = parse_chestxray14_findings(frame[column], class_names, path)
    elif label_format == "columns":
        require_columns(frame, class_names, path)
        targets = np.column_stack([parse_binary_column(frame[name], path) for name in class_names])
    elif label_format == "single":
        column = label_column or "label"
        require_columns(frame, [column], path)
        targets = parse_class_labels(frame[column], class_names, path)
    else:
        raise ValueError(
            "Expected argument `label_format` to be one of 'chestxray14', 'columns', 'single', "
            f"but got {label_format!r}"
        )
    return _read_ids(frame, id_column, path), targets


# --------------------------------------------------------------------------------------------------- joining
def join_on_ids(
    pred_ids: np.ndarray,
    label_ids: np.ndarray,
    targets: np.ndarray,
    predictions_path: Path | str = "predictions",
    labels_path: Path | str = "labels",
) -> np.ndarray:
    """The targets reordered to the predictions' ids; labels of images without a prediction are dropped.

    Raises:
        DataError: Some predicted ids have no label row; the message gives how many and the first few.
    """
    positions = pd.Index(label_ids).get_indexer(pred_ids)
    missing = positions < 0
    if missing.any():
        first = ", ".join(repr(value) for value in pred_ids[missing][:_SHOW])
        raise DataError(
            f"{int(missing.sum())} of {len(pred_ids)} ids in {predictions_path} have no row in {labels_path}: "
            f"{first}{' ...' if missing.sum() > _SHOW else ''}"
        )
    return targets[positions]


# --------------------------------------------------------------------------------------------------- metrics
def evaluate_predictions(
    probs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    task: Task = "multilabel",
    threshold: float | Sequence[float] = _THRESHOLD,
) -> pd.DataFrame:
    """Per-class metrics of probabilities against targets, one-vs-rest, plus a macro ``mean`` row.

    Each class is scored as a binary problem (its probability against its 0/1 target): AUROC (torchmetrics
    ``binary_auroc``; NaN when the class has no positive or no negative), ECE (torchmetrics
    ``binary_calibration_error``, 15 bins, L1), AURC and selective accuracy at :data:`COVERAGES` (confidence =
    margin from the threshold, ``medtransfer.metrics.functional``). A class without positives or without
    negatives has no AUROC, AURC or selective accuracy (NaN, never 0). The ``mean`` row averages the classes,
    ignoring NaN, so those means cover the defined classes only; ``medtransfer test`` writes the same table
    (``plots/evaluation.csv``, with the model's validation-fitted thresholds).

    Args:
        probs: ``multilabel``: (N, C). ``multiclass``: (N, C), rows summing to 1. ``binary``: (N,), (N, 1) or
            (N, 2); the last column is the positive class.
        targets: ``multilabel``: (N, C) of 0/1, or (N,) class indices (one label per image).
        class_names: One name per probability column.
        task: ``multilabel``, ``binary`` or ``multiclass``.
        threshold: The decision threshold, one for all classes or one per class (of the scored classes: one
            for ``binary``).

    Returns:
        One row per class and a ``mean`` row, indexed by ``class``, with columns ``n``, ``positives``,
        ``auroc``, ``aurc``, ``ece``, ``accuracy`` and ``sel_acc_80``, ``sel_acc_90``, ``sel_acc_95``.
    """
    probs = np.asarray(probs.cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    class_names = list(class_names)
    scores, labels, names = _one_vs_rest(probs, targets, class_names, task)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64).reshape(-1), (len(names),))
    rows = [_binary_report(scores[:, k], labels[:, k], float(thresholds[k])) for k in range(len(names))]
    report = pd.DataFrame(rows, index=pd.Index(names, name="class"))
    mean = report.mean(numeric_only=True, skipna=True)
    mean["n"], mean["positives"] = len(scores), np.nan
    report.loc["mean"] = mean
    report["n"] = report["n"].astype("Int64")
    report["positives"] = report["positives"].round().astype("Int64")
    return report


def _one_vs_rest(
    probs: np.ndarray, targets: np.ndarray, class_names: list[str], task: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores (N, K) and 0/1 labels (N, K) of the K binary problems the report scores, and their names."""
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(
            f"Expected argument `probs` to have shape (N, {len(class_names)}) for {len(class_names)} class names, "
            f"but got {probs.shape}"
        )
    n, num_classes = probs.shape
    bad = ~((probs >= 0.0) & (probs <= 1.0))  # NaN too: a NaN would turn every metric of its class into NaN
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"Expected argument `probs` to hold probabilities in [0, 1], but got {probs[row, col]} "
            f"at row {row}, class {class_names[col]!r} ({int(bad.sum())} bad value(s) in all)"
        )
    if len(targets) != n:
        raise ValueError(f"Expected argument `targets` to have {n} rows like `probs`, but got {len(targets)}")
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if task == "binary":
        if num_classes > 2:
            raise ValueError(
                f"Expected argument `probs` to have 1 or 2 columns for task 'binary', but got {num_classes}"
            )
        positive = targets[:, -1] if targets.ndim == 2 else targets
        labels = positive[:, None]
        probs, class_names = probs[:, -1:], class_names[-1:]
    elif task in ("multilabel", "multiclass"):
        if targets.ndim == 1:
            if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
                raise ValueError(f"Expected argument `targets` to hold class indices 0..{num_classes - 1}")
            labels = np.eye(num_classes, dtype=np.int64)[targets]
        elif targets.shape == probs.shape:
            labels = targets
            if task == "multiclass" and not (labels.sum(axis=1) == 1).all():
                raise ValueError("Expected argument `targets` to have exactly one positive per row for 'multiclass'")
        else:
            raise ValueError(
                f"Expected argument `targets` to have shape (N,) or {probs.shape}, but got {targets.shape}"
            )
        if task == "multiclass" and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            _logger.warning(
                "Multiclass probabilities do not sum to 1 in every row.\n"
                "HINT: were they made with a sigmoid? Then the task is 'multilabel'."
            )
    else:
        raise ValueError(
            f"Expected argument `task` to be one of 'multilabel', 'binary', 'multiclass', but got {task!r}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("Expected argument `targets` to hold 0/1 labels")
    return probs, labels.astype(np.int64), class_names


def _binary_report(scores: np.ndarray, labels: np.ndarray, threshold: float = _THRESHOLD) -> dict[str, float]:
    """The report's metrics for one binary problem: P(positive) against 0/1 labels."""
    preds, target = torch.from_numpy(scores.copy()), torch.from_numpy(labels.copy())
    positives = int(target.sum())
    both_classes = 0 < positives < len(target)
    auroc = float(binary_auroc(preds, target)) if both_classes else math.nan
    selective = _selective_report(preds, target, threshold)
    if not both_classes:  # undefined, as in `test` (medtransfer.metrics.defined)
        selective = {k: (v if k == "accuracy" else math.nan) for k, v in selective.items()}
    return {
        "n": len(target),
        "positives": positives,
        "auroc": auroc,
        "aurc": selective.pop("aurc"),
        "ece": float(binary_calibration_error(preds, target, n_bins=_ECE_BINS, norm="l1")),
        **selective,
    }


def _selective_report(probs: torch.Tensor, target: torch.Tensor, threshold: float = _THRESHOLD) -> dict[str, float]:
    """AURC, accuracy and selective accuracy at :data:`COVERAGES` of the decisions ``probs >= threshold``."""
    confidence = _selective.confidence_scores(probs, "binary", threshold=threshold, score="margin")
    decided = _selective.predictions(probs, "binary", threshold=threshold)
    correct = (decided == target).long()
    row = {"aurc": float(_selective.aurc(confidence, correct)), "accuracy": float(correct.double().mean())}
    for coverage in COVERAGES:
        at = _selective.selective_metrics_at_coverage(confidence, decided, target, coverage)
        row[f"sel_acc_{round(coverage * 100)}"] = float(at["accuracy"])
    return row


# --------------------------------------------------------------------------------------------------- entry point
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
) -> pd.DataFrame:
    """Audit predictions made elsewhere: join them to a label file on the image id and report per-class metrics.

    Prints a table with, per class and on average: n, positives, AUROC, AURC, ECE (15 bins), accuracy at the
    threshold (0.5 unless given) and selective accuracy at 80/90/95 % coverage (confidence = distance from the
    threshold). A class without positives or negatives has no AUROC, AURC or selective accuracy (blank); the
    mean row averages the classes that have them.
    The help text is generated from this docstring, so it avoids markup.

    Args:
        predictions: CSV of predictions (may be .gz): an id column and one probability column per class, named
            <prob_prefix><class name>. Every id must have a row in the labels file.
        labels: CSV of labels (may be .gz), joined on the id; rows without a prediction are ignored.
        out_dir: If given, write evaluation.csv and evaluation.json to this folder (created if missing).
        id_column: Name of the id column, in both files.
        prob_prefix: Prefix of the probability columns in the predictions file.
        label_format: chestxray14: the official ChestX-ray14 label file, findings joined by '|' in
            'Finding Labels' ('No Finding' = none); columns: one 0/1 column per class, named as the class;
            single: one column holding a class name or 0-based class index per row.
        label_column: Column holding the labels for chestxray14 (default 'Finding Labels') and single
            (default 'label').
        task: multilabel (independent probabilities), binary (the last probability column is the positive
            class) or multiclass (rows sum to 1); every class is scored one-vs-rest.
        path_column: medtransfer predict's CSV has no id column but this column of image paths: their file
            names are matched to the ids of the labels file (e.g. ChestX-ray14's 'Image Index').
        threshold: decision threshold of the accuracy columns, one for all classes or one per class (give a
            model's validation-fitted thresholds to reproduce its test table).
        model: Optional checkpoint or MLflow model URI that made the predictions: their scores are compared with
            the calibration scores stored in it (exchangeability check), with a warning and the p-values when
            they differ, since its abstention guarantee holds only for data like its calibration data.

    Returns:
        The report: one row per class and a ``mean`` row (see :func:`evaluate_predictions`); with ``model``,
        ``report.attrs["guarantee"]`` holds the check's verdict.

    Raises:
        DataError: A file is missing, empty or malformed, or the two files do not match (names the file, line
            and column at fault).
    """
    started = time.perf_counter()
    pred_ids, class_names, probs = read_predictions(predictions, id_column, prob_prefix, path_column)
    label_ids, targets = read_labels(
        labels, class_names, id_column=id_column, label_format=label_format, label_column=label_column
    )
    targets = join_on_ids(pred_ids, label_ids, targets, predictions, labels)
    if task == "multiclass" and targets.ndim == 2:
        wrong = targets.sum(axis=1) != 1
        if wrong.any():
            first = ", ".join(repr(value) for value in pred_ids[wrong][:_SHOW])
            raise DataError(
                f"task 'multiclass' needs exactly one class per image, but {int(wrong.sum())} image(s) in {labels} "
                f"have none or several: {first}{' ...' if wrong.sum() > _SHOW else ''}"
            )
    read, large = time.perf_counter() - started, len(pred_ids) >= PROGRESS_ROWS
    if large:
        _step(f"evaluate: {len(pred_ids):,} images read and joined to {labels} in {read:.1f} s "
              f"({len(pred_ids) / max(read, 1e-9):,.0f} images/s); scoring {len(class_names)} classes ...")  # fmt: skip
    report = evaluate_predictions(probs, targets, class_names, task, threshold)
    if large:
        _step(f"evaluate: scored in {time.perf_counter() - started - read:.1f} s")
    if model is not None:
        report.attrs["guarantee"] = _guarantee(model, probs, task)
    _print_report(report, f"{Path(predictions).name} vs {Path(labels).name}: {task}, {len(pred_ids)} images")
    if out_dir is not None:
        _write_report(report, Path(out_dir), predictions, labels, task)
    return report


#: From this many images on, evaluate says where it stands (reading and scoring take seconds to minutes).
PROGRESS_ROWS = 10_000


def _step(message: str) -> None:
    """Where a long evaluation stands, on stderr (the report itself goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def _guarantee(model: str, probs: np.ndarray, task: str) -> dict:
    """The exchangeability verdict of these probabilities against ``model``'s calibration scores."""
    from medtransfer.commands.predict import load_predictor
    from medtransfer.decisions.risk_control import guarantee_verdict

    predictor = load_predictor(model)
    scores = torch.as_tensor(probs[:, -1] if task == "binary" else probs, dtype=torch.float32)
    verdict = guarantee_verdict(predictor.rule, predictor.calibration, [scores])
    print(f"Guarantee of {model}: {verdict.get('message', 'calibrated')}")
    return verdict


_SHORT_HEADERS = {
    "positives": "pos",
    "accuracy": "acc",
    **{f"sel_acc_{round(c * 100)}": f"acc@{round(c * 100)}" for c in COVERAGES},
}


def _print_report(report: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log: do not squeeze the numbers into 80 columns
        console = Console(width=160)
    table = Table(title=title)
    table.add_column("class", no_wrap=True)
    for name in report.columns:
        table.add_column(_SHORT_HEADERS.get(name, name), justify="right", no_wrap=True)
    for name, row in report.iterrows():
        cells = ["" if pd.isna(value) else f"{value:.4f}" if isinstance(value, float) else str(value) for value in row]
        table.add_row(str(name), *cells, end_section=name == report.index[-2])
    console.print(table)


def _write_report(report: pd.DataFrame, out_dir: Path, predictions: Path, labels: Path, task: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {"class": name, **{key: _json_value(value) for key, value in row.items()}} for name, row in report.iterrows()
    ]
    summary = {
        "predictions": str(predictions),
        "labels": str(labels),
        "task": task,
        "classes": records,
    }
    write_text_atomic(out_dir / "evaluation.csv", report.to_csv())
    write_text_atomic(out_dir / "evaluation.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _logger.info("Wrote %s and %s", out_dir / "evaluation.csv", out_dir / "evaluation.json")


def _json_value(value: object) -> object:
    if pd.isna(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def main(args: list[str] | None = None) -> None:
    """Entry point of ``medtransfer evaluate``: the CLI is generated from :func:`run_evaluate`'s signature."""
    from jsonargparse import auto_cli

    with exit_on_user_error():
        auto_cli(run_evaluate, args=args, prog="medtransfer evaluate")


if __name__ == "__main__":
    main()
