"""Manifests from comma-separated tables: :func:`csv_manifest`, and the row readers ChestX-ray14 and boxes share."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.data.sources.manifest import SPLITS, Manifest, Missing, _carve, _check_fractions, _checked
from medtransfer.data.tables import parse_binary_column, parse_class_labels, read_csv_table, require_columns
from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = ["csv_manifest"]

_logger = logging.getLogger(__name__)


def csv_manifest(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    path_column: str = "path",
    label_columns: Sequence[str] = ("label",),
    split_column: str | None = None,
    patient_column: str | None = None,
    box_columns: Sequence[str] | None = None,
    task: Task | None = None,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    missing: Missing = "error",
) -> Manifest:
    """A manifest from a comma-separated file with one row per image.

    Args:
        csv_path: The CSV file (may be compressed, e.g. ``.csv.gz``).
        image_root: Folder that relative paths resolve against; default: the CSV's folder.
        path_column: The column holding the image paths.
        label_columns: One column of class names or 0-based indices, or several 0/1 columns (multilabel).
        split_column: A column of ``train``/``val``/``test``; default: a column named ``split``, else split here.
        patient_column: A column holding the patient id; no patient may be in two splits.
        box_columns: Four columns ``x_min, y_min, x_max, y_max`` (pixels); all four empty = no box.
        task: ``binary``, ``multiclass`` or ``multilabel``; default: from the label columns and classes.
        class_names: Class names in index order (multilabel: of the label columns); default: ``0..max`` or sorted.
        val_fraction: Share of the rows (patients) split here that goes to val.
        test_fraction: Share of the rows (patients) split here that goes to test.
        seed: Seed of the split.
        missing: ``"error"``: an image missing on disk is an error; ``"skip"``: its row is dropped (logged).

    Raises:
        DataError: A problem with the file, a row, a patient in two splits or an empty split (naming file, line
            and column).
    """
    csv_path = Path(csv_path)
    image_root = csv_path.parent if image_root is None else Path(image_root)
    fractions = _check_fractions(val_fraction, test_fraction)
    frame = read_csv_table(csv_path, "manifest CSV", min_columns=2)
    split_column = _split_column_or_default(frame, split_column, label_columns, csv_path)
    optional = [name for name in (split_column, patient_column) if name is not None]
    require_columns(frame, [path_column, *label_columns, *optional, *(box_columns or ())], csv_path)
    frame, paths = _locate_images(frame, path_column, image_root, csv_path, missing)
    targets, class_names, task = _read_targets(frame, label_columns, task, class_names, csv_path)
    patients = None if patient_column is None else _filled(frame[patient_column], csv_path, "patient id")
    boxes = None if box_columns is None else _read_boxes(frame, box_columns, csv_path)
    if split_column is not None:
        splits, required = _read_splits(frame[split_column], csv_path), SPLITS
    else:
        strata = None if task == "multilabel" else targets
        splits, required = _carve(np.full(len(frame), "train"), fractions, seed, patients, strata), ("train",)
    manifest = Manifest(tuple(paths), targets, splits, class_names, task, patients, boxes)
    return _checked(manifest, csv_path, frame.index, required)


def _split_column_or_default(
    frame: pd.DataFrame, split_column: str | None, label_columns: Sequence[str], source: Path
) -> str | None:
    """``split_column``, else a column named ``split`` when the file has one: a file that states its own split is
    never silently re-split at random. The choice is logged, so the user sees which split was used."""
    if split_column is not None or "split" not in frame.columns or "split" in label_columns:
        return split_column
    _logger.warning(
        "%s has a 'split' column: using it as the split (train/val/test per row).\n"
        "HINT: set split_column to name another column; rename the column to have a random split made instead.",
        source,
    )
    return "split"


def _filled(column: pd.Series, source: Path, what: str) -> np.ndarray:
    """The stripped cells of ``column`` as str; an empty one is a ``DataError`` naming its line."""
    values = column.str.strip()
    empty = values == ""
    if empty.any():
        raise DataError(f"{source} line {values.index[empty.argmax()]}, column {column.name!r}: the {what} is empty")
    return values.to_numpy(dtype=str)


def _locate_images(
    frame: pd.DataFrame, column: str, root: Path, source: Path, missing: Missing, search_below: bool = False
) -> tuple[pd.DataFrame, list[Path]]:
    """The rows whose image exists and their paths; relative paths resolve against ``root``.

    An empty or duplicated path is an error; so is a missing image unless ``missing="skip"``. With
    ``search_below``, an image not at ``root/<name>`` is looked up by its file name anywhere below ``root``.
    """
    names = _filled(frame[column], source, "path")
    paths = [Path(os.path.normpath(root / name)) for name in names]  # root / absolute = absolute
    _check_unique(pd.Series([str(path) for path in paths], index=frame.index), column, source)
    exists = np.fromiter((path.is_file() for path in paths), dtype=bool, count=len(paths))
    if search_below and not exists.all():
        found = _find_by_name(root, {paths[row].name for row in np.flatnonzero(~exists)})
        paths = [found.get(path.name, path) if not ok else path for path, ok in zip(paths, exists, strict=True)]
        exists = np.fromiter((path.is_file() for path in paths), dtype=bool, count=len(paths))
    if not exists.any():
        raise DataError(
            f"none of the {len(paths)} images listed in {source} exists under {root}: is the image folder right?"
        )
    if not exists.all():
        first = int(np.flatnonzero(~exists)[0])
        if missing == "error":
            raise DataError(
                f"{source} line {frame.index[first]}, column {column!r}: image {paths[first]} does not exist "
                f"({int((~exists).sum())} of {len(paths)} images are missing; missing='skip' drops their rows)"
            )
        _logger.warning("Skipping %d of %d rows of %s whose image is missing (first: line %d, %s)",
                        (~exists).sum(), len(paths), source, frame.index[first], paths[first])  # fmt: skip
    return frame[exists], [path for path, ok in zip(paths, exists, strict=True) if ok]


def _find_by_name(root: Path, names: set[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        found.update({name: Path(folder) / name for name in names.intersection(files) if name not in found})
    return found


def _check_unique(values: pd.Series, column: str, source: Path) -> None:
    duplicated = values[values.duplicated(keep=False)]
    if len(duplicated):
        value = duplicated.iloc[0]
        lines = list(duplicated.index[duplicated == value])
        raise DataError(
            f"{source} lines {lines}, column {column!r}: {value!r} is listed {len(lines)} times "
            f"({duplicated.nunique()} duplicated path(s) in all); each image must appear once"
        )


def _read_splits(column: pd.Series, source: Path) -> np.ndarray:
    splits = column.str.strip().str.lower()
    unknown = ~splits.isin(SPLITS)
    if unknown.any():
        line = splits.index[unknown.argmax()]
        raise DataError(
            f"{source} line {line}, column {column.name!r}: unknown split {column[line]!r}; "
            f"expected one of {list(SPLITS)}"
        )
    return splits.to_numpy(dtype=str)


def _read_boxes(frame: pd.DataFrame, columns: Sequence[str], source: Path) -> np.ndarray:
    """``(N, 4)`` float32 boxes; a row with all four cells empty has no box (NaN)."""
    if len(columns) != 4:
        raise ValueError(
            f"Expected argument `box_columns` to name 4 columns (x_min, y_min, x_max, y_max), but got {list(columns)}"
        )
    text = frame[list(columns)].apply(lambda column: column.str.strip())
    values = text.apply(pd.to_numeric, errors="coerce")
    blank = text == ""
    bad = (values.isna() | ~np.isfinite(values)) & ~blank
    if bad.to_numpy().any():
        rows, cols = np.nonzero(bad.to_numpy())
        line, column = bad.index[rows[0]], bad.columns[cols[0]]
        raise DataError(
            f"{source} line {line}, column {column!r}: box coordinate {text.at[line, column]!r} is not a number"
        )
    partial = blank.any(axis=1) & ~blank.all(axis=1)
    if partial.any():
        line = partial.index[partial.argmax()]
        empty = [name for name in columns if blank.at[line, name]]
        raise DataError(f"{source} line {line}: the box lacks {empty}; give all four of {list(columns)} or none")
    boxes = values.to_numpy(dtype=np.float32)
    inverted = ~blank.all(axis=1).to_numpy() & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if inverted.any():
        line = frame.index[inverted.argmax()]
        raise DataError(
            f"{source} line {line}: box {dict(zip(columns, boxes[inverted.argmax()].tolist(), strict=True))} is "
            f"empty or inverted; expected {columns[2]} > {columns[0]} and {columns[3]} > {columns[1]}"
        )
    return boxes


def _read_targets(
    frame: pd.DataFrame,
    label_columns: Sequence[str],
    task: Task | None,
    class_names: Sequence[str] | None,
    source: Path,
) -> tuple[np.ndarray, tuple[str, ...], Task]:
    """Targets, class names and task from one label column (a class per row) or several 0/1 columns."""
    label_columns = list(label_columns)
    if task not in (None, "binary", "multiclass", "multilabel"):
        raise ValueError(f"Expected argument `task` to be binary, multiclass, multilabel or None, but got {task!r}")
    several = len(label_columns) > 1
    if not label_columns or (task is not None and several != (task == "multilabel")):
        raise ValueError(
            "Expected argument `label_columns` to name one column (binary, multiclass) or several (multilabel), "
            f"but got {label_columns} for task {task!r}"
        )
    if several:
        return _multilabel_targets(frame, label_columns, class_names, source)
    return _single_label_targets(frame[label_columns[0]], task, class_names, source)


def _multilabel_targets(
    frame: pd.DataFrame, label_columns: list[str], class_names: Sequence[str] | None, source: Path
) -> tuple[np.ndarray, tuple[str, ...], Task]:
    if class_names is not None and len(class_names) != len(label_columns):
        raise ValueError(
            f"Expected argument `class_names` to name the {len(label_columns)} label columns in order, "
            f"but got {list(class_names)}"
        )
    targets = np.column_stack([parse_binary_column(frame[name], source) for name in label_columns])
    return targets.astype(np.float32), tuple(class_names or label_columns), "multilabel"


def _single_label_targets(
    column: pd.Series, task: Task | None, class_names: Sequence[str] | None, source: Path
) -> tuple[np.ndarray, tuple[str, ...], Task]:
    _filled(column, source, "label")
    names = _infer_class_names(column, source) if class_names is None else tuple(class_names)
    if len(names) < 2:
        raise ValueError(f"Expected argument `class_names` to name at least 2 classes, but got {list(names)}")
    if task == "binary" and len(names) != 2:
        raise DataError(
            f"{source}, column {column.name!r}: task 'binary' needs 2 classes, "
            f"but there are {len(names)}: {list(names)}"
        )
    task = task or ("binary" if len(names) == 2 else "multiclass")
    return parse_class_labels(column, list(names), source), names, task


def _infer_class_names(column: pd.Series, source: Path) -> tuple[str, ...]:
    """``0..max`` when every label is an integer, else the sorted distinct labels."""
    values = sorted(set(column.str.strip()))
    if all(value.isdigit() for value in values):
        names = tuple(str(index) for index in range(max(int(value) for value in values) + 1))
        if len(names) > len(values):
            _logger.warning(
                "%s, column %r: the integer labels run to %s but only %d of them occur; classes %s have no image.\n"
                "HINT: labels are 0-based class indices; pass class_names to name the classes.",
                source, column.name, names[-1], len(values), sorted(set(names) - set(values), key=int),
            )  # fmt: skip
        values = list(names)
    if len(values) < 2:
        raise DataError(
            f"{source}, column {column.name!r}: every row has the label {values[0]!r}; a classifier needs at least "
            "2 classes (pass class_names to declare the others)"
        )
    return tuple(values)
