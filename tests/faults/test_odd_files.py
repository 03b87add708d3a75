"""Files that used to escape the reader or get a decision they should not: each becomes one ``predict`` row with
its reason.

- A TIFF whose second page lacks ImageWidth makes Pillow raise ``TypeError: Missing dimensions``, outside its documented
  errors; it used to crash ``predict`` with no CSV.
- A float TIFF with an infinite pixel or a NaN row used to become an all-black image with a decision.
- A FIFO (bare, behind a symlink, or named by a glob) used to hang ``predict`` forever when opened, or be dropped.
"""

from __future__ import annotations

import csv
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from untrained import write_untrained_checkpoint

from medtransfer.commands.predict import collect_images, run_predict
from medtransfer.data.readers import check_image, read_image
from medtransfer.errors import DataError


def tiff_with_a_second_page_of_no_width(gray: np.ndarray) -> bytes:
    """A valid 8-bit TIFF of ``gray`` whose first IFD links to a second one without ImageWidth (a damaged
    multi-page TIFF): Pillow raises ``TypeError: Missing dimensions`` when it counts the pages."""
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    first = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[first : first + 2])[0]
    link = first + 2 + 12 * entries
    second = len(data) + len(data) % 2
    data[link : link + 4] = struct.pack("<I", second)
    data += b"\0" * (second - len(data))
    data += struct.pack("<HHHIII", 1, 262, 3, 1, 1, 0)  # one entry (PhotometricInterpretation), no next IFD
    return bytes(data)


def float_tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32)).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gray(pneumonia_npz) -> np.ndarray:
    with np.load(pneumonia_npz) as data:
        return data["test_images"][0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A medtransfer checkpoint of EfficientNet-Lite0 for 32 px input, without a fit."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("model") / "model.ckpt")


def _rows(output: Path) -> dict[str, dict[str, str]]:
    with output.open(newline="", encoding="utf-8") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_a_tiff_page_without_width_is_one_error_naming_the_file(tmp_path, gray):
    path = tmp_path / "no_width.tif"
    path.write_bytes(tiff_with_a_second_page_of_no_width(gray))
    with pytest.raises(DataError, match=rf"^{path}: cannot decode as TIFF \(Missing dimensions\)"):
        read_image(path)


def test_a_tiff_page_without_width_is_a_row_not_a_crash_of_predict(tmp_path, gray, checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "good.png")
    (folder / "no_width.tif").write_bytes(tiff_with_a_second_page_of_no_width(gray))
    result = run_predict(str(folder), str(checkpoint), output=tmp_path / "p.csv")
    rows = _rows(tmp_path / "p.csv")
    assert rows[str(folder / "good.png")]["error"] == ""
    assert "Missing dimensions" in rows[str(folder / "no_width.tif")]["error"]
    assert result.unreadable == 1 and result.predicted == 1


@pytest.mark.parametrize("damage", ["one_inf", "minus_inf", "nan_row"])
def test_non_finite_pixels_are_an_error_naming_the_file_not_a_black_image(tmp_path, gray, damage):
    values = gray.astype(np.float32) / 255
    if damage == "one_inf":
        values[3, 4] = np.inf
    elif damage == "minus_inf":
        values[0, 0] = -np.inf
    else:
        values[5, :] = np.nan
    path = tmp_path / f"{damage}.tif"
    path.write_bytes(float_tiff(values))
    bad = 28 if damage == "nan_row" else 1
    with pytest.raises(DataError, match=rf"^{path}: {bad} of {values.size} pixels are not finite"):
        read_image(path)
    finite = tmp_path / "finite.tif"  # the same float image without the damage reads
    finite.write_bytes(float_tiff(gray.astype(np.float32) / 255))
    stretched = (gray - gray.min()) / (gray.max() - gray.min()) * 255  # float images: stretched by min/max
    assert np.abs(read_image(finite) - stretched).max() <= 1


def test_non_finite_pixels_get_an_error_row_in_predict(tmp_path, gray, checkpoint):
    values = gray.astype(np.float32)
    values[0, 0] = np.inf
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "inf.tif").write_bytes(float_tiff(values))
    run_predict(str(folder), str(checkpoint), output=tmp_path / "p.csv")
    row = _rows(tmp_path / "p.csv")[str(folder / "inf.tif")]
    assert row["decision"] == "error" and "not finite" in row["error"]


@pytest.fixture
def fifos(tmp_path, gray) -> tuple[Path, Path, Path]:
    """``(folder, bare FIFO, symlink to a FIFO)``, beside one good PNG; nobody ever writes to the FIFOs."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "good.png")
    bare = folder / "pipe.png"
    os.mkfifo(bare)
    hidden = tmp_path / "elsewhere.fifo"
    os.mkfifo(hidden)
    link = folder / "link.dcm"
    link.symlink_to(hidden)
    return folder, bare, link


def test_a_fifo_is_refused_without_being_opened(fifos):
    _, bare, link = fifos
    for path in (bare, link):  # opening one would block forever: the test would hang, not fail
        with pytest.raises(DataError, match=rf"^{path}: is a named pipe \(FIFO\), not a regular image file"):
            read_image(path)
        with pytest.raises(DataError, match="named pipe"):
            check_image(path)


@pytest.mark.parametrize("source", ["folder", "glob"])
def test_predict_gives_every_fifo_a_row_and_leaves_no_temporary_file(fifos, tmp_path, checkpoint, source):
    folder, bare, link = fifos
    images = str(folder) if source == "folder" else str(folder / "*")
    assert set(collect_images(images)) == {folder / "good.png", bare, link}
    output = tmp_path / "out" / "p.csv"
    result = run_predict(images, str(checkpoint), output=output)
    rows = _rows(output)
    assert rows[str(folder / "good.png")]["error"] == ""
    for path in (bare, link):
        assert rows[str(path)]["decision"] == "error" and "named pipe" in rows[str(path)]["error"]
    assert result.unreadable == 2
    assert sorted(p.name for p in output.parent.iterdir()) == ["p.csv"]
