"""ChestX-ray14 from its official label file and split lists: :func:`chestxray14_manifest`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.data.sources.csv_table import _filled, _locate_images
from medtransfer.data.sources.manifest import Manifest, Missing, _carve, _check_fractions, _checked
from medtransfer.data.tables import CHESTXRAY14_FINDINGS, parse_chestxray14_findings, read_csv_table, require_columns
from medtransfer.errors import DataError

__all__ = ["chestxray14_manifest"]

_logger = logging.getLogger(__name__)

_IMAGE_COLUMN = "Image Index"
_FINDINGS_COLUMN = "Finding Labels"
_PATIENT_COLUMN = "Patient ID"


def chestxray14_manifest(
    labels_csv: str | Path,
    image_root: str | Path,
    train_val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    findings: Sequence[str] = CHESTXRAY14_FINDINGS,
    missing: Missing = "error",
) -> Manifest:
    """A multilabel manifest of ChestX-ray14 from its official label file.

    Rows in neither official list are left out (logged); listed names without a row are ignored.

    Args:
        labels_csv: ``Data_Entry_2017.csv`` or its v2020 revision (may be ``.gz``).
        image_root: Folder of the PNGs: ``image_root/<Image Index>``, or anywhere below it.
        train_val_list: The official ``train_val_list.txt``; given alone, every other row is test.
        test_list: The official ``test_list.txt``; given alone, every other row is train/val.
        val_fraction: Share of the train/val patients held out for validation.
        test_fraction: Share of the patients held out for test when no list is given.
        seed: Seed of the patient shuffle.
        findings: The findings to predict, in target-column order: all 14 by default, or a subset of them.
        missing: ``"error"``: a listed image missing on disk is an error; ``"skip"``: its row is dropped (logged).

    Raises:
        DataError: A missing or malformed file, finding or image, an image listed twice or in both lists, a
            patient in two splits, or an empty split (naming file and line).
    """
    labels_csv, image_root = Path(labels_csv), Path(image_root)
    findings = _check_findings(findings)
    official = train_val_list is not None or test_list is not None
    fractions = _check_fractions(val_fraction, test_fraction, given=("test",) if official else ())
    frame = read_csv_table(labels_csv, "ChestX-ray14 label", min_columns=2)
    require_columns(frame, [_IMAGE_COLUMN, _FINDINGS_COLUMN, _PATIENT_COLUMN], labels_csv)
    if official:
        frame = frame.assign(_pool=_official_pools(frame[_IMAGE_COLUMN], train_val_list, test_list, labels_csv))
        frame = frame[frame["_pool"] != ""]
    frame, paths = _locate_images(frame, _IMAGE_COLUMN, image_root, labels_csv, missing, search_below=True)
    targets = parse_chestxray14_findings(frame[_FINDINGS_COLUMN], list(findings), labels_csv).astype(np.float32)
    patients = _filled(frame[_PATIENT_COLUMN], labels_csv, "patient id")
    pools = frame["_pool"].to_numpy() if official else np.full(len(frame), "train")
    splits = _carve(pools, fractions, seed, groups=patients)
    manifest = Manifest(tuple(paths), targets, splits, findings, "multilabel", patients)
    return _checked(manifest, labels_csv, frame.index, required=("train", "test") if official else ("train",))


def _check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    findings = tuple(findings)
    unknown = [name for name in findings if name not in CHESTXRAY14_FINDINGS]
    if unknown or not findings or len(set(findings)) != len(findings):
        raise ValueError(
            f"Expected argument `findings` to be distinct ChestX-ray14 findings {list(CHESTXRAY14_FINDINGS)}, "
            f"but got {list(findings)}"
        )
    return findings


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
    _logger.info("%s: %d rows in the split lists, %d in neither (left out); %d listed names have no row",
                 source, (pools != "").sum(), (pools == "").sum(), len(listed) - names.isin(listed).sum())  # fmt: skip
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
