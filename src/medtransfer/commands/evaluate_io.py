"""Reading ``medtransfer evaluate``'s inputs: a predictions CSV and a label file, joined on the image id.

Every problem with the input files is a :class:`~medtransfer.errors.DataError` whose message names the file,
the line (the header is line 1) and the column at fault.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
import pandas as pd

from medtransfer.data.tables import (
    parse_binary_column,
    parse_chestxray14_findings,
    parse_class_labels,
    read_csv_table,
    require_columns,
)
from medtransfer.decisions.report import first_bad_probability
from medtransfer.errors import DataError

__all__ = ["LabelFormat", "join_on_ids", "read_labels", "read_predictions"]

_logger = logging.getLogger(__name__)

_CHESTXRAY14_LABEL_COLUMN = "Finding Labels"
SHOW = 5  # how many offending ids/lines an error message lists

LabelFormat = Literal["chestxray14", "columns", "single"]


# --------------------------------------------------------------------------------------------------- reading
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
        more = count - 1
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
        first = ", ".join(repr(value) for value in pred_ids[missing][:SHOW])
        raise DataError(
            f"{int(missing.sum())} of {len(pred_ids)} ids in {predictions_path} have no row in {labels_path}: "
            f"{first}{' ...' if missing.sum() > SHOW else ''}"
        )
    return targets[positions]
