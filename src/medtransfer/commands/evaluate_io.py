"""Reading ``medtransfer evaluate``'s inputs: a predictions CSV and a label file, joined on the image id. Every
problem with them is a :class:`~medtransfer.errors.DataError` naming the file, line (the header is 1) and column."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Literal, get_args

import numpy as np
import pandas as pd

from medtransfer.data.tables import (
    parse_binary_column,
    parse_chestxray14_findings,
    parse_class_labels,
    read_csv_table,
    require_columns,
)
from medtransfer.errors import DataError

__all__ = ["LabelFormat", "join_on_ids", "read_labels", "read_predictions"]

_logger = logging.getLogger(__name__)

SHOW = 5  # how many offending ids/lines an error message lists

LabelFormat = Literal["chestxray14", "columns", "single"]


def _read_ids(frame: pd.DataFrame, id_column: str, path: Path) -> np.ndarray:
    """The stripped ids; an empty or duplicated id is a DataError naming its lines."""
    ids = frame[id_column].str.strip()
    empty = ids.index[ids == ""]
    if len(empty):
        raise DataError(f"{path} line {empty[0]}, column {id_column!r}: the id is empty")
    duplicated = ids[ids.duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.unique()[:SHOW]
        where = "; ".join(f"{value!r} on lines {list(duplicated.index[duplicated == value])}" for value in first)
        raise DataError(
            f"{path} has {duplicated.nunique()} duplicated id(s) in column {id_column!r}: {where}"
            + (" ..." if duplicated.nunique() > SHOW else "")
        )
    return ids.to_numpy(dtype=object)


def read_predictions(
    path: Path | str, id_column: str = "Image Index", prob_prefix: str = "prob_", path_column: str = "path"
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read a predictions CSV (may be compressed): ``(ids, class_names, probs)``, probs float64 of shape (N, C).

    An ``id_column`` and one ``<prob_prefix><class>`` column per class; ``medtransfer predict``'s CSV is read as it
    is: without an ``id_column`` the id of a row is the file name of its ``path_column`` (``images/x.png`` ->
    ``x.png``, as ChestX-ray14's label file names them), and rows predict could not read (an ``error``) are
    skipped. A missing column, an empty or duplicated id, or a probability that is not a number in [0, 1] is a
    DataError.
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
    from medtransfer.decisions.report import first_bad_probability  # imports torch: not for --help

    if (bad := first_bad_probability(values[:, None])) is not None:
        position, _, count = bad
        line, raw, value = column.index[position], text.iloc[position], values[position]
        if raw == "":
            problem = "the probability is empty"
        elif math.isnan(value) and raw.lower() not in {"nan", "-nan", "+nan"}:
            problem = f"{raw!r} is not a number"
        elif math.isnan(value):
            problem = "the probability is NaN"
        else:
            problem = f"the probability {raw} is outside [0, 1]"
        raise DataError(
            f"{path} line {line}, column {column.name!r}: {problem}"
            + (f" ({count - 1} more bad value(s) in this column)" if count > 1 else "")
        )
    return values


def read_labels(
    path: Path | str, class_names: Sequence[str], id_column: str = "Image Index",
    label_format: LabelFormat = "chestxray14", label_column: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Read a label file (may be compressed): ``(ids, targets)`` for ``class_names``, int64 0/1 of shape (N, C),
    or class indices of shape (N,) for ``single``.

    ``label_format``: ``chestxray14``, the official label file (findings ``|``-joined in ``Finding Labels``,
    ``No Finding`` for none; every class must be one of its 14 findings); ``columns``, one 0/1 column per class,
    named as the class; ``single``, one column (``label_column``, default ``label``) of a class name or 0-based
    index per row. A missing column, an empty or duplicated id, or an unknown label is a DataError.
    """
    if label_format not in get_args(LabelFormat):
        known = ", ".join(map(repr, get_args(LabelFormat)))
        raise ValueError(f"Expected argument `label_format` to be one of {known}, but got {label_format!r}")
    path, class_names = Path(path), list(class_names)
    frame = read_csv_table(path, "labels")
    require_columns(frame, [id_column], path)
    column = label_column or {"chestxray14": "Finding Labels", "single": "label"}.get(label_format)
    require_columns(frame, class_names if label_format == "columns" else [column], path)
    if label_format == "chestxray14":
        targets = parse_chestxray14_findings(frame[column], class_names, path)
    elif label_format == "columns":
        targets = np.column_stack([parse_binary_column(frame[name], path) for name in class_names])
    else:
        targets = parse_class_labels(frame[column], class_names, path)
    return _read_ids(frame, id_column, path), targets


def join_on_ids(
    pred_ids: np.ndarray, label_ids: np.ndarray, targets: np.ndarray,
    predictions_path: Path | str = "predictions", labels_path: Path | str = "labels",
) -> np.ndarray:  # fmt: skip
    """The targets reordered to the predictions' ids, dropping labels without a prediction; a predicted id without
    a label row is a DataError (how many, and the first few)."""
    positions = pd.Index(label_ids).get_indexer(pred_ids)
    missing = positions < 0
    if missing.any():
        first = ", ".join(repr(value) for value in pred_ids[missing][:SHOW])
        raise DataError(
            f"{int(missing.sum())} of {len(pred_ids)} ids in {predictions_path} have no row in {labels_path}: "
            f"{first}{' ...' if missing.sum() > SHOW else ''}"
        )
    return targets[positions]
