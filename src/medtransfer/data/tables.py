"""Reading label tables (for ``evaluate`` and the manifests): CSV cells with line numbers, ChestX-ray14 findings,
class-name and 0/1 labels. Every problem is a ``DataError`` naming the file, the line (header = 1) and the column.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.errors import DataError

__all__ = [
    "CHESTXRAY14_FINDINGS",
    "did_you_mean",
    "parse_binary_column",
    "parse_chestxray14_findings",
    "parse_class_labels",
    "read_csv_table",
    "require_columns",
]

#: The 14 findings of ChestX-ray14 (Wang et al. 2017), in the order of the CheXNet papers.
CHESTXRAY14_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
_NO_FINDING = "No Finding"
_FIRST_DATA_LINE = 2  # the header is line 1


def read_csv_table(path: Path, what: str, min_columns: int = 1) -> pd.DataFrame:
    """Every cell as a string, indexed by the 1-based line number of the row in the file; blank lines dropped.
    A file read as one column is an error when it looks separated otherwise, or when ``min_columns`` > 1."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise DataError(f"{what} file {path} is not a file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} file {path} is empty: expected a CSV file with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise DataError(f"{what} file {path} cannot be read as CSV: {_line_numbered(str(err).strip())}") from None
    frame.columns = [str(name).strip() for name in frame.columns]
    _check_header(frame, path, what, min_columns)
    frame.index = pd.RangeIndex(_FIRST_DATA_LINE, _FIRST_DATA_LINE + len(frame), name="line")
    frame = frame[(frame != "").any(axis=1)]
    _check_rows(frame, path)
    if frame.empty:
        raise DataError(f"{what} file {path} has a header but no data rows")
    return frame


_DELIMITERS = ((";", "';'"), ("\t", "tabs"), ("|", "'|'"))
_MANGLED = re.compile(r"(.+)\.\d+$")  # pandas renames a repeated column 'label' to 'label.1'


def _line_numbered(message: str) -> str:
    """pandas' parser counts an unterminated quote's "row" from 0 (the header); say the file's line instead."""
    return re.sub(r"starting at row (\d+)", lambda match: f"starting at line {int(match[1]) + 1}", message)


def _check_header(frame: pd.DataFrame, path: Path, what: str, min_columns: int) -> None:
    """A DataError for a file of another delimiter (read as one column) or a header naming a column twice."""
    if len(frame.columns) == 1:
        header = frame.columns[0]
        guess = next((name for sep, name in _DELIMITERS if sep in header), None)
        if guess is not None or min_columns > 1:
            why = f"it looks separated by {guess}" if guess else "it has no ',' in its header"
            raise DataError(
                f"{what} file {path} was read as a single column {header!r} (line 1): {why}; "
                "medtransfer reads comma-separated files (save it with ',' as the delimiter)"
            )
    if any(_MANGLED.fullmatch(name) for name in frame.columns):  # only then read the raw header again
        raw = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
        names = raw.str.strip()
        repeated = names[names.duplicated()]
        if len(repeated):
            name = repeated.iloc[0]
            raise DataError(
                f"{what} file {path} line 1: column {name!r} appears {int((names == name).sum())} times in the "
                "header; every column needs its own name"
            )


def _check_rows(frame: pd.DataFrame, path: Path) -> None:
    """A DataError for a row written with another delimiter: one filled first cell holding it, the rest empty."""
    if len(frame.columns) < 2 or frame.empty:
        return
    first = frame.iloc[:, 0]
    lone = (frame.iloc[:, 1:] == "").all(axis=1)
    for sep, name in _DELIMITERS[:2]:  # not '|': ChestX-ray14 joins findings with it inside a cell
        odd = lone & first.str.contains(sep, regex=False, na=False)
        if odd.any():
            line = odd.index[odd.argmax()]
            raise DataError(
                f"{path} line {line}: {first[line]!r} looks separated by {name}, but the header uses ','; "
                "medtransfer reads comma-separated files (save it with ',' as the delimiter)"
            )


def require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """Raise a DataError naming every column of ``columns`` that ``frame`` (read from ``path``) lacks."""
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        hints = [did_you_mean(name, frame.columns) for name in missing]
        raise DataError(
            f"{path} line 1 (the header) has no column {', '.join(map(repr, missing))}{''.join(hints)}; "
            f"its columns are {list(frame.columns)}"
        )


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``value``, or ``""`` when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_chestxray14_findings(column: pd.Series, class_names: list[str], path: Path) -> np.ndarray:
    """0/1 int64 targets of shape (N, C) for ``class_names`` from a ``Finding Labels`` column (``|``-joined).

    Every class name must be a ChestX-ray14 finding; an unknown or empty finding, or one listed with
    ``"No Finding"``, is a DataError naming the line and column.
    """
    unknown_classes = [name for name in class_names if name not in CHESTXRAY14_FINDINGS]
    if unknown_classes:
        name = unknown_classes[0]
        raise DataError(
            f"class {name!r} (from the predictions) is not a ChestX-ray14 finding"
            f"{did_you_mean(name, CHESTXRAY14_FINDINGS)}, "
            f"so {path} cannot label it; the findings are {list(CHESTXRAY14_FINDINGS)} "
            "(use label_format='columns' for other label sets)"
        )
    findings = column.str.split("|").explode().str.strip()
    known = {*CHESTXRAY14_FINDINGS, _NO_FINDING}
    unknown = findings[~findings.isin(known)]
    if len(unknown):
        line, value = unknown.index[0], unknown.iloc[0]
        problem = "empty finding (write 'No Finding' for none)" if value == "" else f"unknown finding {value!r}"
        raise DataError(
            f"{path} line {line}, column {column.name!r}: {problem}{did_you_mean(value, sorted(known))} "
            f"in {column[line]!r}; the findings are {list(CHESTXRAY14_FINDINGS)} or {_NO_FINDING!r}"
        )
    is_none = (findings == _NO_FINDING).groupby(level=0, sort=False)
    contradicting = is_none.any() & (is_none.size() > 1)
    if contradicting.any():
        line = contradicting.index[contradicting.to_numpy()][0]
        raise DataError(f"{path} line {line}, column {column.name!r}: {column[line]!r} lists findings and 'No Finding'")
    targets = np.zeros((len(column), len(class_names)), dtype=np.int64)
    wanted = findings[findings.isin(class_names)]
    rows = column.index.get_indexer(wanted.index)
    targets[rows, [class_names.index(name) for name in wanted]] = 1
    return targets


def parse_binary_column(column: pd.Series, path: Path) -> np.ndarray:
    """A column of 0/1 labels as int64 of shape (N,); any other value is a DataError naming its line."""
    text = column.str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path} line {column.index[position]}, column {column.name!r}: expected a label 0 or 1, "
            f"but got {text.iloc[position]!r}"
        )
    return values.astype(np.int64)


def parse_class_labels(column: pd.Series, class_names: list[str], path: Path) -> np.ndarray:
    """Class indices (int64, shape (N,)) from a column of class names or 0-based indices.

    With a single class name the column is binary: ``0``, ``1`` or that name (meaning 1). An unknown label is a
    DataError naming its line and column.
    """
    text = column.str.strip()
    if len(class_names) == 1:  # binary with one probability column: 1 (or the class's name) is positive
        mapping = {"0": 0, "1": 1, class_names[0]: 1}
        expected = f"0, 1 or {class_names[0]!r}"
    else:
        mapping = {str(index): index for index in range(len(class_names))}
        mapping.update({name: index for index, name in enumerate(class_names)})
        expected = f"a class name {class_names} or an index 0..{len(class_names) - 1}"
    targets = text.map(mapping)
    unknown = targets.isna().to_numpy()
    if unknown.any():
        position = int(np.flatnonzero(unknown)[0])
        value = text.iloc[position]
        raise DataError(
            f"{path} line {column.index[position]}, column {column.name!r}: unknown label {value!r}"
            f"{did_you_mean(value, class_names)}; expected {expected}"
        )
    return targets.to_numpy(dtype=np.int64)
