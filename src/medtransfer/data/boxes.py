"""Boxes around findings, to score where a model's heatmaps point: a CSV of your own, or ChestX-ray14's.

Both readers return one row per box: ``path``, ``finding`` (may be empty), ``x_min``, ``y_min``, ``x_max``,
``y_max`` (float pixels of the image the box was drawn on). ChestX-ray14's ``BBox_List_2017.csv`` ships inside the
``torchxrayvision`` wheel; :func:`chestxray14_boxes` reads that copy when no path is given.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.data.sources.csv_table import _read_boxes
from medtransfer.data.tables import read_csv_table, require_columns
from medtransfer.errors import DataError

__all__ = ["BOX_COLUMNS", "CHESTXRAY14_BOX_SIZE", "chestxray14_boxes", "read_box_table"]

BOX_COLUMNS: tuple[str, ...] = ("x_min", "y_min", "x_max", "y_max")
#: Side of the images ChestX-ray14's boxes were drawn on (the released PNGs are 1024x1024).
CHESTXRAY14_BOX_SIZE = 1024
_XRV_FILE = "data/BBox_List_2017.csv.gz"
#: The box list's finding names that differ from the label file's (``Data_Entry_2017.csv``).
_FINDING_NAMES = {"Infiltrate": "Infiltration"}


def read_box_table(
    csv_path: Path | str,
    path_column: str = "path",
    box_columns: Sequence[str] = BOX_COLUMNS,
    finding_column: str | None = None,
) -> pd.DataFrame:
    """The boxes of a CSV with a path column and four ROI columns (rows whose four cells are empty are dropped);
    a missing column, a coordinate that is not a number or a partial or inverted box is a ``DataError``."""
    csv_path = Path(csv_path)
    frame = read_csv_table(csv_path, "box CSV")
    require_columns(frame, [path_column, *box_columns, *([finding_column] if finding_column else [])], csv_path)
    boxes = _read_boxes(frame, list(box_columns), csv_path)
    table = pd.DataFrame(boxes, columns=list(BOX_COLUMNS), index=frame.index)
    table.insert(0, "finding", frame[finding_column].str.strip() if finding_column else "")
    table.insert(0, "path", frame[path_column].str.strip())
    return table[~np.isnan(boxes).any(axis=1)].reset_index(drop=True)


def _bundled_chestxray14() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "ChestX-ray14's BBox_List_2017.csv ships in the torchxrayvision package, which is not installed; "
            "give the file's path instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _XRV_FILE
    if not path.is_file():
        raise DataError(f"torchxrayvision is installed but has no {_XRV_FILE}; give BBox_List_2017.csv's path")
    return path


def chestxray14_boxes(path: Path | str | None = None) -> pd.DataFrame:
    """ChestX-ray14's official boxes (``BBox_List_2017.csv``, may be ``.gz``; default: torchxrayvision's copy), its
    ``x, y, w, h`` (spanning the last four columns) as ``x_min, y_min, x_max, y_max`` on the 1024 px images."""
    path = _bundled_chestxray14() if path is None else Path(path)
    frame = read_csv_table(path, "ChestX-ray14 box list")
    if frame.shape[1] < 6 or list(frame.columns[:2]) != ["Image Index", "Finding Label"]:
        raise DataError(
            f"{path}: expected ChestX-ray14's header 'Image Index,Finding Label,Bbox [x,y,w,h],,,', "
            f"but got {','.join(frame.columns[:6])}"
        )
    numbers = frame.iloc[:, 2:6].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1) | (numbers.iloc[:, 2] <= 0) | (numbers.iloc[:, 3] <= 0)
    if bad.any():
        line = bad.idxmax()  # the frame is indexed by line number
        raise DataError(f"{path} line {line}: box {frame.loc[line].iloc[2:6].tolist()} is not x, y, w, h > 0")
    x, y, w, h = (numbers.iloc[:, i].to_numpy(np.float32) for i in range(4))
    path, finding = frame["Image Index"].str.strip(), frame["Finding Label"].str.strip().replace(_FINDING_NAMES)
    table = {"path": path, "finding": finding, "x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h}
    return pd.DataFrame(table).reset_index(drop=True)
