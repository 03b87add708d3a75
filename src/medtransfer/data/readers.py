"""Decode one medical image file (PNG, JPEG, BMP, TIFF or DICOM) into a 2-D ``uint8`` grayscale array.

Medical images come as 8-bit and 16-bit PNGs, RGB(A) or palette PNGs that hold gray pixels, JPEGs and DICOM
files whose stored values still need their rescale, window and photometric conventions applied. Everything
downstream (albumentations, resize, normalise) sees one canonical format instead: ``(H, W) uint8``, where
high means bright. The format is detected from the file's magic bytes, so a misnamed file still reads.

An image larger than Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels, about 9,459 x 9,459) is refused
from its header, before any pixel is decoded: past that size a file is more likely a decompression bomb than an
X-ray, and one such image per loader worker would exhaust memory. Raise the limit to read larger images.
:func:`check_image` runs the header-level checks alone, so a whole dataset can be vetted up front cheaply.
"""

from __future__ import annotations

import logging
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from medtransfer.errors import DataError

__all__ = ["SUPPORTED_SUFFIXES", "check_image", "read_image"]

_logger = logging.getLogger(__name__)

#: Extensions a folder scan should pick up; the format itself is detected from the content.
SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
#: Whatever decoding an untrusted file raises is that file's fault: Pillow and pydicom raise far more than their
#: documented errors on damaged input (``TypeError: Missing dimensions`` for a TIFF of width 0, ``IndexError``,
#: ``struct.error``, ``ZeroDivisionError`` ...), and one such file must be a row with its reason, not a crash.
_PIL_ERRORS = (Exception,)
_DICOM_ERRORS = (Exception,)


def read_image(path: str | Path, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """Read one image file as a 2-D ``uint8`` grayscale array, high values bright.

    Scaling rules (every source must land in 0-255 without clipping away the anatomy):

    - 8-bit gray is kept as is; RGB/RGBA/LA/palette/CMYK go through Pillow's ITU-R 601 luma (alpha dropped),
      so gray stored as colour reads back unchanged.
    - 16-bit (and 32-bit/float) images are stretched by their own min/max: 16-bit exports often hold only
      10-14 significant bits, which dividing by 257 would leave nearly black. Contrast is thus per image,
      unlike 8-bit input; pass ``window`` for a fixed range. A constant image reads as zeros.
    - DICOM: ``RescaleSlope``/``RescaleIntercept`` (modality LUT), then ``window`` if given, else the file's
      VOI LUT or ``WindowCenter``/``WindowWidth`` (first value), else min/max. ``MONOCHROME1`` is inverted.

    Args:
        path: The image file; its format is detected from the content, not the extension.
        window: ``(center, width)`` in raw pixel units (DICOM: after rescale, e.g. Hounsfield units), with
            DICOM's LINEAR meaning for every format: ``(128, 256)`` keeps 8-bit values, ``(40, 400)`` is a
            soft-tissue CT window. It replaces a DICOM file's own window.

    Returns:
        The ``(H, W)`` ``uint8`` image.

    Raises:
        DataError: The file is missing, empty, a directory, unreadable, truncated, of an unknown format, or a
            multi-frame or colour DICOM.
        ValueError: ``window`` has a width below 1.
    """
    if window is not None and not window[1] >= 1:
        raise ValueError(f"Expected argument `window` to be (center, width) with width >= 1, but got {window}")
    path = Path(path)
    head = _read_head(path)
    if head[128:132] == b"DICM" or (path.suffix.lower() == ".dcm" and not _sniff(head)):
        return _read_dicom(path, window)
    fmt = _sniff(head)
    if fmt is None:
        raise DataError(f"{path}: unknown image format (expected PNG, JPEG, BMP, TIFF or DICOM content)")
    gray = _require_finite(path, _read_pillow(path, fmt))
    if window is not None:
        return _to_uint8(gray, *_window_bounds(window))
    return gray if gray.dtype == np.uint8 else _to_uint8(gray)


def check_image(path: str | Path) -> None:
    """Raise the ``DataError`` that :func:`read_image` would for a file that fails before decoding its pixels.

    Reads only the header: missing, empty, unreadable, a directory or a broken link, an unknown format, a
    header Pillow cannot parse, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``. A body truncated or
    corrupted after the header passes here and fails in :func:`read_image` (finding it means decoding it).
    DICOM files must parse and hold pixel data (not read: large values are deferred).
    """
    path = Path(path)
    head = _read_head(path)
    if head[128:132] == b"DICM" or (path.suffix.lower() == ".dcm" and not _sniff(head)):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            found = "PixelData" in pydicom.dcmread(path, force=True, defer_size=1024)
        except (InvalidDicomError, *_DICOM_ERRORS) as err:
            raise DataError(f"{path}: cannot decode as DICOM ({err})") from err
        if not found:
            raise DataError(f"{path}: DICOM file has no pixel data")
        return
    fmt = _sniff(head)
    if fmt is None:
        raise DataError(f"{path}: unknown image format (expected PNG, JPEG, BMP, TIFF or DICOM content)")
    with _pillow_image(path, fmt):
        pass


def _sniff(head: bytes) -> str | None:
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)


def _read_head(path: Path) -> bytes:
    if not path.exists():
        broken = f" (a broken symbolic link to {path.readlink()})" if path.is_symlink() else ""
        raise DataError(f"{path}: file not found{broken}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    _require_regular_file(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    if not head:
        raise DataError(f"{path}: empty file (0 bytes)")
    return head


@contextmanager
def _pillow_image(path: Path, fmt: str) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image; Pillow's errors, inside the block too, become one ``DataError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't decode and warn
            with Image.open(path, formats=[fmt]) as img:
                yield img
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: refused before decoding: {err} Raise PIL.Image.MAX_IMAGE_PIXELS to read larger images."
        ) from err
    except _PIL_ERRORS as err:
        raise DataError(f"{path}: cannot decode as {fmt} ({err})") from err


def _read_pillow(path: Path, fmt: str) -> np.ndarray:
    """Decode with Pillow; 8-bit modes become ``L``, deeper ones come back as their raw numeric array."""
    with _pillow_image(path, fmt) as img:
        img.load()
        if getattr(img, "n_frames", 1) > 1:
            raise DataError(f"{path}: {img.n_frames}-frame {fmt} is not supported yet")
        if img.mode.startswith("I") or img.mode == "F":
            return np.asarray(img)
        if img.mode != "L":
            _logger.debug("Converting %s from mode %s to L", path, img.mode)
            img = img.convert("L")
        return np.asarray(img).copy()


def _read_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    """Stored values -> modality LUT -> VOI (``window``, the file's, or min/max) -> uint8; MONOCHROME1 inverted.

    The file's window is applied by pydicom, which maps it onto the stored bit depth; that output range is
    found by pushing -inf/+inf through the same call. A VOI LUT Sequence has no such range: min/max.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds:
            raise DataError(f"{path}: DICOM file has no pixel data")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise DataError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported yet")
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DataError(f"{path}: DICOM PhotometricInterpretation {photometric!r} is not supported (gray only)")
        values = _require_finite(path, apply_modality_lut(ds.pixel_array, ds))
        if window is not None:  # the argument replaces the file's own VOI settings
            for keyword in ("VOILUTSequence", "VOILUTFunction"):
                ds.pop(keyword, None)
            ds.WindowCenter, ds.WindowWidth = window
        if ds.get("VOILUTSequence"):
            gray = _to_uint8(apply_voi_lut(values, ds, index=0))
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0)
            gray = _to_uint8(apply_voi_lut(values, ds, index=0), lo, hi)
        else:
            gray = _to_uint8(values)
    except DataError:
        raise
    except (InvalidDicomError, *_DICOM_ERRORS) as err:
        raise DataError(f"{path}: cannot decode as DICOM ({err})") from err
    return 255 - gray if photometric == "MONOCHROME1" else gray


_SPECIAL_FILES = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _require_regular_file(path: Path) -> None:
    """Refuse a FIFO, socket or device (also behind a symlink) without opening it: opening a FIFO blocks until
    a writer comes, which would hang a whole ``predict`` run on one odd directory entry."""
    kind = _SPECIAL_FILES.get(stat.S_IFMT(path.stat().st_mode))
    if kind is not None:
        raise DataError(f"{path}: is {kind}, not a regular image file; not opened")


def _require_finite(path: Path, values: np.ndarray) -> np.ndarray:
    """``values`` if every pixel is finite; NaN or infinity (float TIFF, float DICOM) is an error, not black."""
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataError(f"{path}: {bad} of {values.size} pixels are not finite (NaN or infinity)")
    return values


def _window_bounds(window: tuple[float, float]) -> tuple[float, float]:
    """The values mapped to 0 and 255 by a DICOM LINEAR window (PS3.3 C.11.2.1.2)."""
    center, width = window[0] - 0.5, window[1] - 1
    return center - width / 2, center + width / 2


def _to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``[lo, hi]`` (default: the data's min/max) onto 0-255, clipping outside values."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(values.min()) if lo is None else float(lo)
    hi = float(values.max()) if hi is None else float(hi)
    if hi <= lo:  # a width-1 window thresholds; a constant image reads as zeros
        return np.where(values > hi, 255, 0).astype(np.uint8)
    return np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
