"""read_image in colour: real colour images (scikit-image's retina and IHC slide, pydicom's colour DICOMs)."""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut
from skimage import data as skdata

from medtransfer.data.readers import as_color, is_color, read_image, to_gray
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    """A 64x64 crop of a real fundus photograph (RGB, unequal channels)."""
    return np.ascontiguousarray(skdata.retina()[600:664, 600:664])


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A 64x64 tile of a real immunohistochemistry slide (RGB)."""
    return np.ascontiguousarray(skdata.immunohistochemistry()[100:164, 200:264])


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_rgb_files_keep_their_colour_in_auto_and_rgb(retina, tmp_path, suffix):
    path = tmp_path / f"fundus{suffix}"
    Image.fromarray(retina).save(path)
    for color in ("auto", "rgb"):
        out = read_image(path, color=color)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and is_color(out)
        np.testing.assert_array_equal(out, retina)
    with Image.open(path) as img:
        luma = np.asarray(img.convert("L"))
    np.testing.assert_array_equal(read_image(path), luma)  # the default stays gray, through Pillow's luma
    np.testing.assert_array_equal(to_gray(retina), luma)  # and to_gray rounds exactly as Pillow does


def test_gray_files_and_gray_stored_as_rgb_read_as_gray_in_auto(tissue, tmp_path):
    gray = to_gray(tissue)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "gray_rgb.png")
    for name in ("gray.png", "gray_rgb.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name, color="auto"), gray)
        np.testing.assert_array_equal(read_image(tmp_path / name, color="rgb"), np.repeat(gray[..., None], 3, 2))
    assert not is_color(read_image(tmp_path / "gray.png", color="rgb"))


def test_rgba_drops_alpha_instead_of_compositing(tissue, tmp_path):
    alpha = np.full(tissue.shape[:2], 90, np.uint8)  # a composite on black would darken every pixel
    Image.fromarray(np.dstack([tissue, alpha]), mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", color="auto"), tissue)


def test_palette_and_cmyk_go_through_pillow(tissue, tmp_path):
    palette = Image.fromarray(tissue).quantize(colors=64)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", color="auto"), np.asarray(palette.convert("RGB")))
    cmyk = Image.fromarray(tissue).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif", color="auto"), np.asarray(cmyk.convert("RGB")))


def test_16bit_rgb_tiff_is_scaled_to_8_bits(retina, tmp_path):
    deep = retina.astype(np.uint16) * 257  # 0-255 onto 0-65535
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb")
    out = read_image(tmp_path / "deep.tif", color="auto")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, retina, atol=1)  # Pillow's 16-to-8-bit rounding


def test_as_color_converts_between_layouts(retina):
    gray = to_gray(retina)
    assert as_color(retina, "gray").shape == (64, 64) and as_color(gray, "rgb").shape == (64, 64, 3)
    assert as_color(retina, "auto") is retina and as_color(gray, "auto") is gray


# ---------------------------------------------------------------------------------------------------- DICOM
def _dicom(name: str) -> str:
    """One of the DICOMs installed with pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return path


def test_dicom_rgb_and_ybr_read_as_the_same_colours():
    """dcmtk wrote the same colour bars as RGB (+cr) and as YBR_FULL JPEGs: both read as one RGB image."""
    rgb = read_image(_dicom("SC_rgb_dcmtk_+eb+cr.dcm"), color="auto").astype(int)
    assert rgb.shape == (100, 100, 3) and is_color(rgb.astype(np.uint8))
    for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        ybr = read_image(_dicom(name), color="auto").astype(int)
        assert np.abs(ybr - rgb).mean() < 3, name  # lossy JPEG and 4:2:2 subsampling, same colours
    bars = read_image(_dicom("SC_rgb_rle.dcm"), color="auto")
    assert tuple(bars[5, 5]) == (255, 0, 0)  # the first bar is red


def test_dicom_palette_colour_goes_through_its_lut():
    path = _dicom("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    expected = np.rint(apply_color_lut(ds.pixel_array, ds) / 65535 * 255).astype(np.uint8)
    out = read_image(path, color="auto")
    assert out.shape == (*ds.pixel_array.shape, 3)
    np.testing.assert_array_equal(out, expected)


def test_dicom_multiframe_reads_the_chosen_frame_or_refuses():
    path = _dicom("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(read_image(path, color="auto", frame="first"), frames[0])
    np.testing.assert_array_equal(read_image(path, color="auto", frame="middle"), frames[1])
    with pytest.raises(DataError, match=re.escape("SC_rgb_rle_2frame.dcm") + r".*2 frames.*frame: first"):
        read_image(path, color="auto")


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "SC_rgb_jpeg.dcm"]
)
def test_compressed_dicom_decodes_through_the_installed_plugins(name):
    """The pixels are pydicom's own ``pixel_array`` after read_image's documented mapping, written out here:
    colour kept as is; gray through Rescale Slope/Intercept, then the first window (PS3.3 C.11.2.1.2 LINEAR)
    or else min/max onto 0-255, MONOCHROME1 inverted."""
    ds = pydicom.dcmread(_dicom(name))
    assert "VOILUTSequence" not in ds  # a LUT sequence is mapped otherwise; none of these files holds one
    pixels = ds.pixel_array.astype(np.float64)
    out = read_image(_dicom(name), color="auto")
    assert out.dtype == np.uint8 and out.shape == pixels.shape and out.std() > 0
    if ds.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2"):
        np.testing.assert_array_equal(out, pixels)
        return
    values = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])  # the first of several windows
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        expected = np.rint(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)
        tolerance = 1  # the reader maps pydicom's windowed values onto 0-255: one level of rounding apart
    else:
        expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255)
        tolerance = 0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_allclose(out, expected, atol=tolerance)


def test_a_gray_read_of_a_colour_dicom_is_its_luma():
    path = _dicom("examples_rgb_color.dcm")
    np.testing.assert_array_equal(read_image(path), to_gray(read_image(path, color="rgb")))


def test_dicom_decode_errors_keep_the_whole_reason():
    """pydicom lists every plugin's reason on lines of their own; the message keeps them all, on one line."""
    with pytest.raises(DataError) as info:
        read_image(_dicom("JPEG-lossy.dcm"))
    message = str(info.value)
    assert "\n" not in message and "pylibjpeg:" in message and not message.rstrip(")").endswith(":")
