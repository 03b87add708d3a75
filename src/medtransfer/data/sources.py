"""Turn a dataset on disk into a :class:`Manifest`: every image's path, target and split (plus patients and boxes).

Four layouts are read:

* :func:`chestxray14_manifest`: the official ChestX-ray14 label file (``Data_Entry_2017.csv`` or its 2020
  revision) and, optionally, the official ``train_val_list.txt`` / ``test_list.txt``; multilabel over 14 findings.
* :func:`csv_manifest`: any CSV with a path column and one label column (binary/multiclass) or several 0/1
  columns (multilabel), optionally a split, a patient and four box columns.
* :func:`folder_manifest`: ``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>``.
* :func:`mura_manifest`: MURA's ``.../patientXXXXX/studyN_positive/imageK.png``.

Split rules, shared by all builders. Splits made here are deterministic for a seed: with a patient column the
*patients* are shuffled and the first ``round(test_fraction * P)`` go to test, the next ``round(val_fraction * P)``
to val and the rest to train (at least one each when its fraction is positive); without patients the images are
ordered so that each class is spread evenly (stratified) and cut the same way. A fraction is a share of the rows
being split: of all rows when nothing is given, of the train/val pool when the test set is given (official lists,
a ``test`` folder). Every manifest is checked before it is returned: no patient in two splits and no empty split
that the caller asked for.

Every problem with the input is a :class:`~medtransfer.errors.DataError` whose message names the file, the line
(the header is line 1) or the path, and the problem.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medtransfer.data.tables import (
    CHESTXRAY14_FINDINGS,
    parse_binary_column,
    parse_chestxray14_findings,
    parse_class_labels,
    read_csv_table,
    require_columns,
)
from medtransfer.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "Manifest",
    "chestxray14_manifest",
    "csv_manifest",
    "folder_manifest",
    "mura_manifest",
]

_logger = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "multilabel"]
Split = Literal["train", "val", "test"]
Missing = Literal["error", "skip"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: File name endings :func:`folder_manifest` and :func:`mura_manifest` take for images (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")
_IMAGE_COLUMN = "Image Index"
_FINDINGS_COLUMN = "Finding Labels"
_PATIENT_COLUMN = "Patient ID"
_MURA_STUDY = re.compile(r"study\d+_(positive|negative)")
_SHOW = 5  # how many offending lines an error message lists


# --------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True, eq=False, repr=False)
class Manifest:
    """The images of a dataset with their targets and splits: what a generic image ``Dataset`` needs.

    The arrays are read-only copies; :meth:`subset` and :func:`dataclasses.replace` make new manifests.

    Attributes:
        paths: The image files, shape (N,).
        targets: Class indices, int64 of shape (N,), for ``binary``/``multiclass``; 0/1 float32 of shape
            (N, L) for ``multilabel``.
        splits: ``"train"``, ``"val"`` or ``"test"`` per image, shape (N,).
        class_names: The class (or label) names, index = class index (column for multilabel).
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        patients: Patient id per image (str, shape (N,)), or ``None`` when unknown.
        boxes: Region of interest per image, float32 ``(N, 4)`` as ``x_min, y_min, x_max, y_max`` in pixels;
            a row of NaN means no box. ``None`` when the source has no boxes.
    """

    paths: tuple[Path, ...]
    targets: np.ndarray
    splits: np.ndarray
    class_names: tuple[str, ...]
    task: Task
    patients: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.task not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"Expected argument `task` to be binary, multiclass or multilabel, but got {self.task!r}")
        if self.task == "multilabel":
            target_dtype, target_shape = np.float32, (n, len(self.class_names))
        else:
            target_dtype, target_shape = np.int64, (n,)
        arrays = {
            "targets": (self.targets, target_dtype, target_shape),
            "splits": (self.splits, np.str_, (n,)),
            "patients": (self.patients, np.str_, (n,)),
            "boxes": (self.boxes, np.float32, (n, 4)),
        }
        for name, (value, dtype, shape) in arrays.items():
            if value is None:
                continue
            array = np.array(value, dtype=dtype)  # a copy, so that freezing it leaves the caller's array alone
            if array.shape != shape:
                raise ValueError(f"Expected argument `{name}` to have shape {shape}, but got {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        unknown = set(np.unique(self.splits)) - set(SPLITS)
        if unknown:
            raise ValueError(f"Expected argument `splits` to hold only {SPLITS}, but got {sorted(unknown)}")
        object.__setattr__(self, "paths", tuple(Path(path) for path in self.paths))
        object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={int((self.splits == split).sum())}" for split in SPLITS)
        return f"Manifest(task={self.task!r}, classes={len(self.class_names)}, n={len(self)}, {sizes})"

    @property
    def num_classes(self) -> int:
        """The number of classes (labels for ``multilabel``)."""
        return len(self.class_names)

    def subset(self, split: Split) -> Manifest:
        """The images of one split, in their order here."""
        if split not in SPLITS:
            raise ValueError(f"Expected argument `split` to be one of {SPLITS}, but got {split!r}")
        return self.take(np.flatnonzero(self.splits == split))

    def take(self, rows: Sequence[int] | np.ndarray) -> Manifest:
        """The images at ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return replace(
            self,
            paths=tuple(self.paths[row] for row in rows),
            targets=self.targets[rows],
            splits=self.splits[rows],
            patients=None if self.patients is None else self.patients[rows],
            boxes=None if self.boxes is None else self.boxes[rows],
        )


# --------------------------------------------------------------------------------------------------- builders
def chestxray14_manifest(
    labels_csv: Path | str,
    image_root: Path | str,
    train_val_list: Path | str | None = None,
    test_list: Path | str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    findings: Sequence[str] = CHESTXRAY14_FINDINGS,
    missing: Missing = "error",
) -> Manifest:
    """A multilabel manifest of ChestX-ray14 from its official label file.

    Args:
        labels_csv: ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` (may be ``.gz``); needs the columns
            ``Image Index``, ``Finding Labels`` (findings joined by ``|``, ``No Finding`` = none) and ``Patient ID``.
        image_root: Folder of the PNGs: ``image_root/<Image Index>``, or anywhere below it (the
            ``images_001/images/...`` layout of some mirrors).
        train_val_list: The official ``train_val_list.txt`` (one image name per line). Given alone, every other
            row is test.
        test_list: The official ``test_list.txt``. Given alone, every other row is train/val. Rows in neither
            list are left out (logged); names without a row are ignored (the lists cover the full release).
        val_fraction: Share of the train/val patients held out for validation (of all patients without lists).
        test_fraction: Share of the patients held out for test when no list is given.
        seed: Seed of the patient shuffle.
        findings: The findings to predict, in target-column order: all 14 by default, or a subset of them.
        missing: ``"error"``: a listed image missing on disk is an error; ``"skip"``: such rows are dropped and
            counted in a warning.

    Raises:
        DataError: A file is missing or malformed, an unknown finding, a missing image, a duplicated image, an
            image in both lists, a patient in two splits, or an empty split (the message names file and line).
    """
    labels_csv, image_root = Path(labels_csv), Path(image_root)
    findings = _check_findings(findings)
    official = train_val_list is not None or test_list is not None
    fractions = _check_fractions({"val": val_fraction} if official else {"val": val_fraction, "test": test_fraction})
    frame = _read_table(labels_csv, "ChestX-ray14 label")
    require_columns(frame, [_IMAGE_COLUMN, _FINDINGS_COLUMN, _PATIENT_COLUMN], labels_csv)
    if official:
        frame = frame.assign(_pool=_official_pools(frame[_IMAGE_COLUMN], train_val_list, test_list, labels_csv))
        frame = frame[frame["_pool"] != ""]
    frame, paths = _locate_images(frame, _IMAGE_COLUMN, image_root, labels_csv, missing, search_below=True)
    targets = parse_chestxray14_findings(frame[_FINDINGS_COLUMN], list(findings), labels_csv).astype(np.float32)
    patients = _read_patients(frame[_PATIENT_COLUMN], labels_csv)
    pools = frame["_pool"].to_numpy() if official else np.full(len(frame), "train")
    splits = _carve(pools, fractions, seed, groups=patients)
    manifest = Manifest(tuple(paths), targets, splits, findings, "multilabel", patients)
    return _checked(manifest, labels_csv, frame.index, required=("train", "test") if official else ("train",))


def csv_manifest(
    csv_path: Path | str,
    image_root: Path | str | None = None,
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
        label_columns: One column holding a class name or a 0-based class index per row (binary/multiclass),
            or several 0/1 columns, one per label (multilabel; the column names are the class names).
        split_column: A column holding ``train``, ``val`` or ``test`` per row; default: the column named
            ``split`` when there is one (logged), else the split is made here (grouped by patient with
            ``patient_column``, else stratified by class).
        patient_column: A column holding the patient id; no patient may be in two splits.
        box_columns: Four columns ``x_min, y_min, x_max, y_max`` (pixels); all four empty = no box.
        task: ``binary``, ``multiclass`` or ``multilabel``; default: multilabel for several label columns,
            else binary for 2 classes and multiclass for more.
        class_names: The classes of a single label column, in index order; default: the integers ``0..max``
            when every label is an integer, else the sorted distinct labels. For multilabel: display names of the
            label columns, in their order.
        val_fraction: Share of the rows (patients) split here that goes to val.
        test_fraction: Share of the rows (patients) split here that goes to test.
        seed: Seed of the split.
        missing: ``"error"``: an image missing on disk is an error; ``"skip"``: its row is dropped (logged).

    Raises:
        DataError: The file is missing, not comma-separated, lacks a column; or a row has an empty or duplicated
            path, a missing image, an unknown label or split, an invalid box; or a patient is in two splits, or a
            split is empty (the message names the file, the line and the column).
    """
    csv_path = Path(csv_path)
    image_root = csv_path.parent if image_root is None else Path(image_root)
    fractions = _check_fractions({"val": val_fraction, "test": test_fraction})
    frame = _read_table(csv_path, "manifest CSV")
    split_column = _split_column_or_default(frame, split_column, label_columns, csv_path)
    optional = [name for name in (split_column, patient_column) if name is not None]
    require_columns(frame, [path_column, *label_columns, *optional, *(box_columns or ())], csv_path)
    frame, paths = _locate_images(frame, path_column, image_root, csv_path, missing)
    targets, class_names, task = _read_targets(frame, label_columns, task, class_names, csv_path)
    patients = None if patient_column is None else _read_patients(frame[patient_column], csv_path)
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


def folder_manifest(
    root: Path | str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> Manifest:
    """A manifest from class folders: ``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>``.

    The class of an image is its first folder below ``root`` (below the split folder), classes sorted by name;
    two classes make a binary task, more a multiclass one. Split folders are honoured; a split without a folder
    is carved from ``train``, stratified by class.

    Args:
        root: The dataset folder.
        val_fraction: Share of the images split here that goes to val (of ``train`` when split folders exist).
        test_fraction: Share of the images split here that goes to test (ignored when ``root/test`` exists).
        seed: Seed of the split.
        suffixes: File name endings that count as images (case-insensitive); hidden files are ignored.

    Raises:
        DataError: ``root`` is missing, mixes split folders with class folders, holds fewer than two classes, or
            a split is empty.
    """
    root = _existing_dir(root)
    split_dirs = _split_folders(root)
    wanted = {"val": val_fraction, "test": test_fraction}
    fractions = _check_fractions({name: value for name, value in wanted.items() if name not in split_dirs})
    found = {split: _class_images(folder, suffixes) for split, folder in split_dirs.items()}
    paths = [path for images in found.values() for path, _ in images]
    labels = [label for images in found.values() for _, label in images]
    given = np.asarray([split for split, images in found.items() for _ in images], dtype="<U5")
    class_names = tuple(sorted(set(labels)))
    if len(class_names) < 2:
        raise DataError(
            f"{root}: found {len(paths)} image(s) in {len(class_names)} class folder(s) {list(class_names)}; "
            f"expected root/<class>/... with at least 2 classes and images ending in {tuple(suffixes)}"
        )
    targets = np.searchsorted(class_names, labels).astype(np.int64)
    splits = _carve(given, fractions, seed, strata=targets)
    task: Task = "binary" if len(class_names) == 2 else "multiclass"
    return _checked(Manifest(tuple(paths), targets, splits, class_names, task), root, required=tuple(split_dirs))


def mura_manifest(
    root: Path | str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> Manifest:
    """A binary manifest of a MURA-style tree: ``.../patientXXXXX/studyN_positive/imageK.png``.

    The label is the study folder's suffix (``negative`` = 0, ``positive`` = 1), the patient the study's parent
    folder. With MURA's official ``root/train`` and ``root/valid`` folders, ``valid`` (the public evaluation set)
    becomes test and val is carved from train; otherwise all images are split here. Splits are by patient.

    Args:
        root: The dataset folder (e.g. ``MURA-v1.1``, or one body part such as ``MURA-v1.1/train/XR_ELBOW``).
        val_fraction: Share of the patients split here that goes to val.
        test_fraction: Share of the patients that goes to test (ignored with the official folders).
        seed: Seed of the patient shuffle.
        suffixes: File name endings that count as images (case-insensitive); hidden files are ignored.

    Raises:
        DataError: ``root`` is missing or holds no image, an image is not in a ``studyN_positive|negative`` folder,
            a patient is in both official folders, or a split is empty.
    """
    root = _existing_dir(root)
    paths = _list_images(root, suffixes)
    if not paths:
        raise DataError(f"{root} holds no image ending in {tuple(suffixes)}")
    labels, patients = (np.asarray(values) for values in zip(*map(_parse_mura_path, paths), strict=True))
    targets = (labels == "positive").astype(np.int64)
    official = (root / "train").is_dir() and (root / "valid").is_dir()
    if official:
        given = np.asarray(["test" if path.is_relative_to(root / "valid") else "train" for path in paths])
        fractions = _check_fractions({"val": val_fraction})
    else:
        given, fractions = np.full(len(paths), "train"), _check_fractions({"val": val_fraction, "test": test_fraction})
    splits = _carve(given, fractions, seed, groups=patients)
    manifest = Manifest(tuple(paths), targets, splits, ("negative", "positive"), "binary", patients)
    return _checked(manifest, root, required=("train", "test") if official else ("train",))


# --------------------------------------------------------------------------------------------------- arguments
def _check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """The split fractions, each in [0, 1) and summing to less than 1 (train needs images)."""
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Expected argument `{name}_fraction` to be in [0, 1), but got {value}")
    if sum(fractions.values()) >= 1.0:
        raise ValueError(
            "Expected arguments `val_fraction` + `test_fraction` to be below 1 (train needs images), "
            f"but got {' + '.join(map(str, fractions.values()))}"
        )
    return fractions


def _check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    findings = tuple(findings)
    unknown = [name for name in findings if name not in CHESTXRAY14_FINDINGS]
    if unknown or not findings or len(set(findings)) != len(findings):
        raise ValueError(
            f"Expected argument `findings` to be distinct ChestX-ray14 findings {list(CHESTXRAY14_FINDINGS)}, "
            f"but got {list(findings)}"
        )
    return findings


def _existing_dir(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} {'is not a folder' if path.exists() else 'does not exist'}")
    return path


# --------------------------------------------------------------------------------------------------- tables
def _read_table(path: Path, what: str) -> pd.DataFrame:
    """Every cell as a string, indexed by line number (header = 1); a file read as one column is an error.

    ``read_csv_table`` already names a ';', tab or '|' delimiter; a manifest needs two columns even without one.
    """
    frame = read_csv_table(path, what)
    if len(frame.columns) == 1:
        raise DataError(
            f"{path} was read as a single column {frame.columns[0]!r} (line 1): it has no ',' in its header; "
            "medtransfer reads comma-separated files (save it with ',' as the delimiter)"
        )
    return frame


def _locate_images(
    frame: pd.DataFrame, column: str, root: Path, source: Path, missing: Missing, search_below: bool = False
) -> tuple[pd.DataFrame, list[Path]]:
    """The rows whose image exists and their paths; relative paths resolve against ``root``.

    An empty or duplicated path is an error; so is a missing image unless ``missing="skip"``. With
    ``search_below``, an image not at ``root/<name>`` is looked up by its file name anywhere below ``root``.
    """
    names = frame[column].str.strip()
    if (names == "").any():
        raise DataError(f"{source} line {names.index[(names == '').argmax()]}, column {column!r}: the path is empty")
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
        _logger.warning(
            "Skipping %d of %d rows of %s whose image is missing (first: line %d, %s)",
            (~exists).sum(),
            len(paths),
            source,
            frame.index[first],
            paths[first],
        )
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


def _read_patients(column: pd.Series, source: Path) -> np.ndarray:
    patients = column.str.strip()
    if (patients == "").any():
        line = patients.index[(patients == "").argmax()]
        raise DataError(f"{source} line {line}, column {column.name!r}: the patient id is empty")
    return patients.to_numpy(dtype=str)


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


# --------------------------------------------------------------------------------------------------- labels
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
    empty = column.str.strip() == ""
    if empty.any():
        raise DataError(f"{source} line {column.index[empty.argmax()]}, column {column.name!r}: the label is empty")
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
                source,
                column.name,
                names[-1],
                len(values),
                sorted(set(names) - set(values), key=int),
            )
        values = list(names)
    if len(values) < 2:
        raise DataError(
            f"{source}, column {column.name!r}: every row has the label {values[0]!r}; a classifier needs at least "
            "2 classes (pass class_names to declare the others)"
        )
    return tuple(values)


def _official_pools(
    names: pd.Series, train_val_list: Path | str | None, test_list: Path | str | None, source: Path
) -> np.ndarray:
    """``"train"`` (train/val), ``"test"`` or ``""`` (in neither list) per row, from the official split lists."""
    test = None if test_list is None else _read_name_list(Path(test_list))
    train_val = None if train_val_list is None else _read_name_list(Path(train_val_list))
    if test is not None and train_val is not None:
        both = test.keys() & train_val.keys()
        if both:
            name = min(both, key=test.__getitem__)
            raise DataError(
                f"{test_list} line {test[name]}: image {name!r} is also in {train_val_list} "
                f"(line {train_val[name]}); the lists must not share images"
            )
    names = names.str.strip()
    listed = [*(test or {}), *(train_val or {})]
    in_test = names.isin(list(test)) if test is not None else ~names.isin(listed)
    in_train_val = names.isin(list(train_val)) if train_val is not None else ~in_test
    pools = np.select([in_test.to_numpy(), in_train_val.to_numpy()], ["test", "train"], "")
    _logger.info(
        "%s: %d rows in the split lists, %d in neither (left out); %d listed names have no row",
        source,
        (pools != "").sum(),
        (pools == "").sum(),
        len(listed) - names.isin(listed).sum(),
    )
    return pools


def _read_name_list(path: Path) -> dict[str, int]:
    """Image name -> line number of a list file with one name per line (blank lines ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"split list {path} cannot be read: {err}") from None
    names: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if name in names:
            raise DataError(f"{path} line {number}: image {name!r} is listed again (first on line {names[name]})")
        if name:
            names[name] = number
    if not names:
        raise DataError(f"split list {path} is empty: expected one image name per line")
    return names


# --------------------------------------------------------------------------------------------------- folders
def _list_images(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Image files below ``folder`` (any depth), sorted; hidden files and folders are skipped."""
    endings = tuple(suffix.lower() for suffix in suffixes)
    return sorted(
        path
        for path in folder.rglob("*")
        if path.name.lower().endswith(endings)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and (path.is_file() or path.is_symlink())  # a broken link is reported, not dropped
    )


def _split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` for ``root/{train,val,test}``, or ``{"train": root}`` for plain class folders."""
    folders = {path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")}
    present = [split for split in SPLITS if split in folders]
    if not present:
        return {"train": root}
    others = sorted(folders - set(SPLITS))
    if others or "train" not in present:
        raise DataError(
            f"{root} holds split folders {present} "
            + (f"beside other folders {others}" if others else "but no 'train' folder")
            + ": expected either root/<class>/... or root/train/<class>/... (with optional val/ and test/)"
        )
    return {split: root / split for split in present}


def _class_images(folder: Path, suffixes: Sequence[str]) -> list[tuple[Path, str]]:
    """``(path, class)`` of the images below ``folder/<class>/``: the class is the first folder level."""
    found: list[tuple[Path, str]] = []
    for class_dir in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        images = _list_images(class_dir, suffixes)
        if not images:
            _logger.warning("Ignoring %s: it holds no image ending in %s", class_dir, tuple(suffixes))
        found += [(path, class_dir.name) for path in images]
    loose = [path for path in folder.iterdir() if path.is_file() and path.name.lower().endswith(tuple(suffixes))]
    if loose:
        _logger.warning(
            "Ignoring %d image(s) directly in %s, not in a class folder (e.g. %s)", len(loose), folder, loose[0]
        )
    return found


def _parse_mura_path(path: Path) -> tuple[str, str]:
    """``(label, patient)`` of ``.../<patient>/studyN_<positive|negative>/<image>``."""
    match = _MURA_STUDY.fullmatch(path.parent.name)
    if match is None:
        raise DataError(
            f"{path}: expected a MURA layout .../patientXXXXX/studyN_positive/imageK.png (or studyN_negative), "
            f"but the image is in folder {path.parent.name!r}"
        )
    return match.group(1), path.parent.parent.name


# --------------------------------------------------------------------------------------------------- splits
def _split(
    n: int,
    fractions: Mapping[str, float],
    seed: int,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Split ``n`` rows into train and the ``fractions`` (``{"val": 0.1, "test": 0.2}``), deterministic for a seed.

    With ``groups`` the groups (patients) are shuffled and cut, so a group never straddles two splits; with
    ``strata`` (class indices) each class is spread evenly over the order before it is cut; else rows are shuffled.
    """
    rng = np.random.default_rng(seed)
    if groups is not None:
        units, unit_of_row = np.unique(groups, return_inverse=True)
        order = rng.permutation(len(units))
    else:
        unit_of_row = np.arange(n)
        order = rng.permutation(n) if strata is None else _stratified_order(strata, rng)
    unit_splits = np.full(len(order), "train", dtype="<U5")
    start = 0
    for name in ("test", "val"):
        fraction = fractions.get(name, 0.0)
        count = max(1, round(fraction * len(order))) if fraction > 0 else 0
        unit_splits[order[start : start + count]] = name
        start += count
    return unit_splits[unit_of_row]


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the rows in which every class is spread evenly, so any prefix holds each class's share."""
    key = np.empty(len(strata))
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        key[rows] = (rng.permutation(len(rows)) + rng.random()) / len(rows)
    return np.argsort(key, kind="stable")


def _carve(
    given: np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """``given`` with its ``"train"`` rows split again into train and ``fractions`` by :func:`_split`.

    Every builder goes through here: with nothing given, all rows are ``"train"`` and are split three ways; with
    a given test set (official list, ``test`` folder), val is carved from the train/val rows.
    """
    splits = np.array(given, dtype="<U5")
    pool = splits == "train"
    if fractions and pool.any():
        groups = None if groups is None else groups[pool]
        strata = None if strata is None else strata[pool]
        splits[pool] = _split(int(pool.sum()), fractions, seed, groups=groups, strata=strata)
    return splits


def _checked(
    manifest: Manifest, source: Path, lines: pd.Index | None = None, required: Sequence[str] = ("train",)
) -> Manifest:
    """``manifest`` once its splits are checked (no ``required`` split empty, no patient in two); logs a summary.

    ``lines`` are the line numbers of the rows in ``source`` (for the error message), else paths are named.
    """
    for split in required:
        if not (manifest.splits == split).any():
            raise DataError(f"{source}: the {split!r} split is empty ({len(manifest)} images in all)")
    if manifest.patients is not None:
        _check_patients(manifest, source, None if lines is None else lines.to_numpy())
    _logger.info("%s: %r", source, manifest)
    return manifest


def _check_patients(manifest: Manifest, source: Path, lines: np.ndarray | None) -> None:
    splits, patients = manifest.splits, manifest.patients
    per_patient = pd.Series(splits).groupby(patients).nunique()
    shared = per_patient.index[per_patient.to_numpy() > 1]
    if len(shared):
        rows = np.flatnonzero(patients == shared[0])
        if lines is not None:
            where = f"lines {lines[rows][:_SHOW].tolist()}"
        else:
            where = f"images {[str(manifest.paths[row]) for row in rows[:_SHOW]]}"
        raise DataError(
            f"{source}: patient {shared[0]!r} is in splits {sorted(set(splits[rows].tolist()))} ({where}; "
            f"{len(shared)} patient(s) in several splits); a patient's images must share one split"
        )
