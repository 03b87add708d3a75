"""read_image on real pixels (PneumoniaMNIST, ChestX-ray14) written as PNG/JPEG/BMP/TIFF/DICOM, and bad files."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from conftest import data_file, require_file
from helpers import read_image_unprivileged, world_readable_dir
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medtransfer.data.readers import SUPPORTED_SUFFIXES, read_image
from medtransfer.errors import DataError

RGBA_PNGS = ("00000100_000.png", "00001369_000.png", "00005224_000.png")  # the 3 RGBA files of the sample
GRAY_PNG = "00000075_000.png"
_WINDOW_TAGS = {"WindowCenter": [120, 40], "WindowWidth": [100, 400]}  # two windows: the first one counts


@pytest.fixture(scope="module")
def grays(pneumonia_npz) -> np.ndarray:
    """Four real 28x28 uint8 chest X-rays; none spans the full 0-255 range."""
    return np.load(pneumonia_npz)["test_images"][:4]


def _stretch(gray: np.ndarray) -> np.ndarray:
    gray = gray.astype(np.float64)
    return np.rint((gray - gray.min()) / (gray.max() - gray.min()) * 255)


def _dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window onto 0-255, written out independently of pydicom."""
    return np.rint(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)


def _mode(path) -> str:
    with Image.open(path) as img:
        return img.mode


def _write_dicom(path, stored: np.ndarray, *, photometric="MONOCHROME2", preamble=True, **tags):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype("<i2" if stored.dtype.kind == "i" else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return path


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_8bit_reads_back_exactly(grays, tmp_path, suffix):
    for i, gray in enumerate(grays):
        Image.fromarray(gray).save(tmp_path / f"x{i}{suffix}")
        out = read_image(tmp_path / f"x{i}{suffix}")
        assert out.dtype == np.uint8 and out.shape == (28, 28) and out.flags.writeable
        np.testing.assert_array_equal(out, gray)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_reads_back_within_compression_error(grays, tmp_path, suffix):
    for i, gray in enumerate(grays):
        Image.fromarray(gray).save(tmp_path / f"x{i}{suffix}", quality=95)
        diff = np.abs(read_image(str(tmp_path / f"x{i}{suffix}")).astype(int) - gray)
        assert diff.mean() < 2 and diff.max() < 16


def test_16bit_png_is_stretched_by_min_max(grays, tmp_path):
    for i, gray in enumerate(grays):
        path = tmp_path / f"x{i}.png"
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
        assert _mode(path).startswith("I")
        stretched = read_image(path)
        assert stretched.dtype == np.uint8 and (stretched.min(), stretched.max()) == (0, 255)
        np.testing.assert_allclose(stretched, _stretch(gray), atol=1)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "CMYK"])
def test_gray_stored_as_colour_reads_back_unchanged(grays, tmp_path, mode):
    gray = grays[0]
    channels = {
        "RGB": [gray] * 3,
        "RGBA": [gray] * 3 + [np.full_like(gray, 128)],  # alpha dropped, not composited
        "LA": [gray, np.full_like(gray, 7)],
        "CMYK": [np.zeros_like(gray)] * 3 + [255 - gray],
    }[mode]
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")  # PNG has no CMYK
    Image.frombytes(mode, gray.shape[::-1], np.stack(channels, -1).tobytes()).save(path)
    assert _mode(path) == mode
    np.testing.assert_array_equal(read_image(path), gray)


def test_palette_png_reads_through_its_palette(grays, tmp_path):
    palette = Image.new("P", (28, 28))
    palette.putdata(grays[1].ravel().tolist())
    palette.putpalette(np.repeat(255 - np.arange(256), 3).astype(np.uint8).tobytes())  # index i shows 255 - i
    palette.save(tmp_path / "p.png")
    assert _mode(tmp_path / "p.png") == "P"
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), 255 - grays[1])


def test_format_comes_from_content_not_extension(grays, tmp_path):
    Image.fromarray(grays[2]).save(tmp_path / "png.jpg", format="PNG")
    Image.fromarray(grays[2]).save(tmp_path / "png.dcm", format="PNG")
    _write_dicom(tmp_path / "dicom.png", grays[2].astype(np.uint16), WindowCenter=128, WindowWidth=256)
    for name in ("png.jpg", "png.dcm", "dicom.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name), grays[2])


def test_dicom_rescale_slope_and_intercept_are_applied(grays, tmp_path):
    gray = grays[3]
    stored = gray.astype(np.uint16) * 2 + 2048  # modality values: 0.5 * stored - 1024 = gray
    rescale = {"RescaleSlope": 0.5, "RescaleIntercept": -1024}
    path = _write_dicom(tmp_path / "ct.dcm", stored, **rescale)
    windowed = _write_dicom(tmp_path / "ctw.dcm", stored, **rescale, WindowCenter=128, WindowWidth=256)
    np.testing.assert_array_equal(read_image(windowed), gray)
    np.testing.assert_allclose(read_image(path), _stretch(gray), atol=1)  # no window tags: min/max
    signed = gray.astype(np.int16) - 1024  # signed values, no rescale
    signed = _write_dicom(tmp_path / "signed.dcm", signed, WindowCenter=-896, WindowWidth=256)
    np.testing.assert_array_equal(read_image(signed), gray)


def test_dicom_window_from_tags(grays, tmp_path):
    gray = grays[3]
    stored = gray.astype(np.uint16) + 1024
    tagged = _write_dicom(tmp_path / "w.dcm", stored, RescaleIntercept=-1024, RescaleSlope=1, **_WINDOW_TAGS)
    from_tags = read_image(tagged)
    np.testing.assert_allclose(from_tags, _dicom_window(gray, 120, 100), atol=1)  # first of the two windows
    assert (from_tags == 0).any() and (from_tags == 255).any()


@pytest.mark.parametrize("tags", [{}, _WINDOW_TAGS])
def test_dicom_monochrome1_is_inverted(grays, tmp_path, tags):
    stored = grays[2].astype(np.uint16)
    mono2 = read_image(_write_dicom(tmp_path / "m2.dcm", stored, **tags))
    mono1 = read_image(_write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", **tags))
    assert mono2.std() > 10
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_without_preamble_reads_by_suffix(grays, tmp_path):
    path = _write_dicom(tmp_path / "bare.dcm", grays[0].astype(np.uint16), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(path), _stretch(grays[0]), atol=1)


def test_every_supported_suffix_reads(grays, tmp_path):
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)
    for suffix in SUPPORTED_SUFFIXES:
        path = tmp_path / f"x{suffix}"
        if suffix == ".dcm":
            _write_dicom(path, grays[0].astype(np.uint16), WindowCenter=128, WindowWidth=256)
        else:
            Image.fromarray(grays[0]).save(path)
        assert read_image(path).shape == (28, 28)


def test_real_chestxray14_rgba_and_gray_pngs():
    folder = data_file("chestxray14_sample") / "images"
    for name in (*RGBA_PNGS, GRAY_PNG):
        path = require_file(folder / name)
        with Image.open(path) as img:
            assert img.mode == ("L" if name == GRAY_PNG else "RGBA")
            first_channel = np.asarray(img)[..., 0] if img.mode == "RGBA" else np.asarray(img)
        out = read_image(path)
        assert out.shape == (256, 256) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, first_channel)  # RGB channels are equal gray in these files


def _bad_files(tmp_path, gray) -> dict[str, object]:
    Image.fromarray(gray).save(tmp_path / "good.png")
    Image.fromarray(gray).save(tmp_path / "good.jpg")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("patient_id,label\n1,0\n")
    (tmp_path / "folder.png").mkdir()
    stored = gray.astype(np.uint16)
    _write_dicom(tmp_path / "cine.dcm", np.stack([stored, stored]), NumberOfFrames=2)
    _write_dicom(tmp_path / "colour.dcm", stored, photometric="RGB")
    truncated = _write_dicom(tmp_path / "truncated.dcm", stored).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(truncated[: len(truncated) - 600])
    return {
        "missing.png": "not found",
        "empty.png": "empty",
        "truncated.png": "cannot decode as PNG",
        "truncated.jpg": "cannot decode as JPEG",
        "notes.png": "unknown image format",
        "folder.png": "directory",
        "cine.dcm": "multi-frame",
        "colour.dcm": "expected (rows, columns, 3)",  # RGB with one sample per pixel
        "truncated.dcm": "cannot decode as DICOM",
    }


def test_bad_files_raise_data_error_naming_the_file(grays, tmp_path):
    for name, problem in _bad_files(tmp_path, grays[0]).items():
        with pytest.raises(DataError, match=re.escape(name)) as info:
            read_image(tmp_path / name)
        assert problem in str(info.value) and "\n" not in str(info.value), name


def test_uploaded_bytes_read_as_their_file_does_and_fail_for_the_same_reason(grays, tmp_path):
    """``bytes`` (an upload) go through the same detection and decoders as the file, from memory."""
    Image.fromarray(grays[1].astype(np.uint16) * 200).save(tmp_path / "deep.png")
    _write_dicom(tmp_path / "window.dcm", grays[2].astype(np.uint16) * 4, **_WINDOW_TAGS)
    cine = np.stack([g.astype(np.uint16) for g in grays[:3]])
    _write_dicom(tmp_path / "cine3.dcm", cine, NumberOfFrames=3)
    bad = _bad_files(tmp_path, grays[0])
    for name in ("good.png", "good.jpg", "deep.png", "window.dcm"):
        for color in ("gray", "rgb"):
            expected = read_image(tmp_path / name, color=color)
            np.testing.assert_array_equal(read_image((tmp_path / name).read_bytes(), color=color), expected)
    middle = read_image((tmp_path / "cine3.dcm").read_bytes(), frame="middle")
    np.testing.assert_array_equal(middle, read_image(tmp_path / "cine3.dcm", frame=1))
    for name, problem in bad.items():
        if name in ("missing.png", "folder.png"):  # no bytes to send
            continue
        with pytest.raises(DataError, match=r"^request body: ") as info:
            read_image((tmp_path / name).read_bytes())
        assert problem in str(info.value), name


@pytest.fixture
def open_dir():
    """A folder the unprivileged reader can reach; removed afterwards, locked entries included."""
    folder = world_readable_dir("readers-")
    yield folder
    for entry in folder.rglob("*"):
        entry.chmod(0o700)
    shutil.rmtree(folder)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_unreadable_file_raises_data_error_naming_it(grays, open_dir):
    path = open_dir / "locked.png"
    Image.fromarray(grays[0]).save(path)
    path.chmod(0o644)
    assert read_image_unprivileged(path) == ("ok", "(28, 28)")  # the user can read it while it is readable
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: why the read drops to an ordinary user
        assert read_image(path).shape == (28, 28)
    kind, message = read_image_unprivileged(path)
    assert kind == "DataError" and "\n" not in message, (kind, message)
    assert message.startswith(f"{path}: ") and "Permission denied" in message, message


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_image_in_an_unreadable_folder_raises_data_error_naming_it(grays, open_dir):
    folder = open_dir / "locked"
    folder.mkdir()
    path = folder / "inside.png"
    Image.fromarray(grays[0]).save(path)
    folder.chmod(0o755)
    assert read_image_unprivileged(path) == ("ok", "(28, 28)")
    folder.chmod(0)
    kind, message = read_image_unprivileged(path)
    assert kind == "DataError" and "\n" not in message, (kind, message)
    assert message.startswith(f"{path}: ") and "Permission denied" in message, message


def test_permission_error_becomes_data_error_even_as_root(grays, tmp_path, monkeypatch):
    path = tmp_path / "denied.png"
    Image.fromarray(grays[0]).save(path)

    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", deny)
    with pytest.raises(DataError, match=re.escape(path.name) + ".*Permission denied"):
        read_image(path)
