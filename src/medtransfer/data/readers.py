"""Decode one medical image file (PNG, JPEG, BMP, TIFF or DICOM) into a ``uint8`` gray or RGB array.

Everything downstream sees one format, ``(H, W)`` uint8 (high = bright) or ``(H, W, 3)`` RGB for colour sources;
the format is detected from the file's magic bytes, so a misnamed file still reads. An image larger than
``PIL.Image.MAX_IMAGE_PIXELS`` is refused from its header (more likely a decompression bomb than an X-ray, and one
per loader worker would exhaust memory); :func:`check_image` runs the header checks alone, to vet a dataset cheaply.
An upload (``bytes``) goes through the same checks and decoders from memory: no path is ever taken from it.
"""

from __future__ import annotations

import io
import logging
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from medtransfer.errors import DataError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Color",
    "Frame",
    "as_color",
    "check_image",
    "dicom_frame_count",
    "is_color",
    "read_image",
    "to_gray",
]

#: ``gray``: one channel (colour sources through ITU-R 601 luma); ``rgb``: three channels (gray replicated);
#: ``auto``: RGB where the source holds colour (unequal channels), else gray.
Color = Literal["gray", "rgb", "auto"]
#: Which frame of a multi-frame DICOM to read; ``error`` refuses multi-frame files.
Frame = Literal["first", "middle", "error"]

_logger = logging.getLogger(__name__)

#: Extensions a folder scan should pick up; the format itself is detected from the content.
SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
#: Whatever decoding an untrusted file raises is that file's fault: Pillow and pydicom raise far more than their
#: documented errors on damaged input (``TypeError`` for a TIFF of width 0, ``struct.error`` ...).
_DECODE_ERRORS = (Exception,)


@dataclass(frozen=True)
class _Upload:
    """An image's bytes received over the network: decoded from memory, never from a path; ``name`` in errors."""

    data: bytes
    name: str = "request body"
    suffix: str = ""

    def __str__(self) -> str:
        return self.name


def _source(path: str | Path | bytes) -> Path | _Upload:
    return _Upload(bytes(path)) if isinstance(path, bytes | bytearray | memoryview) else Path(path)


def _stream(source: Path | _Upload) -> Path | io.BytesIO:
    """What Pillow and pydicom open: the path, or a fresh in-memory stream of the upload."""
    return io.BytesIO(source.data) if isinstance(source, _Upload) else source


def read_image(path: str | Path | bytes, *, color: Color = "gray", frame: Frame | int = "error") -> np.ndarray:
    """Read one image file as a ``uint8`` array, high values bright: ``(H, W)`` gray or ``(H, W, 3)`` RGB.

    Scaling: 8-bit gray is kept; colour modes go through Pillow's ITU-R 601 luma (alpha dropped, not composited:
    exports use a constant 255). 16-bit and float images are stretched by their own min/max (16-bit exports often
    hold 10-14 significant bits, which dividing by 257 would leave nearly black); a constant image reads as zeros.
    DICOM: modality LUT, then the file's VOI LUT or first ``WindowCenter``/``WindowWidth``, else min/max;
    ``MONOCHROME1`` inverted; colour DICOM (RGB, YBR, PALETTE COLOR) converted to RGB by pydicom.

    Args:
        path: The image file, or its content as ``bytes`` (an upload: read from memory, called "request body"
            in errors); the format is detected from the content, not the extension.
        color: ``gray``: always ``(H, W)``; ``rgb``: always ``(H, W, 3)``, gray replicated; ``auto``: ``(H, W, 3)``
            where the source holds colour (unequal channels), else ``(H, W)``.
        frame: multi-frame DICOM: the ``first`` or ``middle`` frame, an index (0-based), or ``error`` to refuse.

    Raises:
        DataError: The file is missing, empty, a directory, unreadable, truncated, of an unknown format, or a
            multi-frame DICOM with ``frame="error"``.
    """
    if color not in ("gray", "rgb", "auto"):
        raise ValueError(f"Expected argument `color` to be gray, rgb or auto, but got {color!r}")
    if not isinstance(frame, int) and frame not in ("first", "middle", "error"):
        raise ValueError(f"Expected argument `frame` to be first, middle or error, but got {frame!r}")
    path = _source(path)
    fmt = _detect(path)
    if fmt == "DICOM":
        return as_color(_read_dicom(path, frame), color)
    gray = _require_finite(path, _read_pillow(path, fmt, keep_color=color != "gray"))
    return as_color(gray if gray.dtype == np.uint8 or gray.ndim == 3 else _to_uint8(gray), color)


def check_image(path: str | Path) -> None:
    """Raise the ``DataError`` that :func:`read_image` would for a file that fails before decoding its pixels
    (missing, unreadable, unknown format, bad header, too many pixels; DICOM without pixel data). A body corrupted
    after a good header passes here: finding it means decoding it."""
    path = Path(path)
    fmt = _detect(path)
    if fmt == "DICOM":
        import pydicom

        try:
            found = "PixelData" in pydicom.dcmread(path, force=True, defer_size=1024)
        except _DECODE_ERRORS as err:
            raise DataError(f"{path}: cannot decode as DICOM ({_reason(err)})") from err
        if not found:
            raise DataError(f"{path}: DICOM file has no pixel data")
        return
    with _pillow_image(path, fmt):
        pass


def _detect(path: Path | _Upload) -> str:
    """``DICOM`` (its ``DICM`` preamble, or a ``.dcm`` file of no other known format), else the Pillow format."""
    head = _read_head(path)
    fmt = next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)
    if head[128:132] == b"DICM" or (path.suffix.lower() == ".dcm" and fmt is None):
        return "DICOM"
    if fmt is None:
        raise DataError(f"{path}: unknown image format (expected PNG, JPEG, BMP, TIFF or DICOM content)")
    return fmt


def _read_head(path: Path | _Upload) -> bytes:
    if isinstance(path, _Upload):
        if not path.data:
            raise DataError(f"{path}: empty (0 bytes)")
        return path.data[:132]
    try:  # stat fails with PermissionError, not "not found", inside a folder the user may not search
        if not path.exists():
            broken = f" (a broken symbolic link to {path.readlink()})" if path.is_symlink() else ""
            raise DataError(f"{path}: file not found{broken}")
        if path.is_dir():
            raise DataError(f"{path}: is a directory, not an image file")
        _require_regular_file(path)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    if not head:
        raise DataError(f"{path}: empty file (0 bytes)")
    return head


@contextmanager
def _pillow_image(path: Path | _Upload, fmt: str) -> Iterator[Image.Image]:
    """The opened (not yet decoded) image; Pillow's errors, inside the block too, become one ``DataError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't decode and warn
            with Image.open(_stream(path), formats=[fmt]) as img:
                yield img
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: refused before decoding: {err} Raise PIL.Image.MAX_IMAGE_PIXELS to read larger images."
        ) from err
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode as {fmt} ({_reason(err)})") from err


def _read_pillow(path: Path | _Upload, fmt: str, keep_color: bool = False) -> np.ndarray:
    """Decode with Pillow: 8-bit modes become ``L`` (with ``keep_color``, colour modes ``(H, W, 3)`` RGB), deeper
    ones come back as their raw numeric array."""
    with _pillow_image(path, fmt) as img:
        img.load()
        if getattr(img, "n_frames", 1) > 1:
            raise DataError(f"{path}: {img.n_frames}-frame {fmt} is not supported yet")
        if img.mode.startswith("I") or img.mode == "F":
            return np.asarray(img)
        if keep_color and img.mode not in ("L", "1", "LA"):
            return _pillow_rgb(img)
        if img.mode != "L":
            _logger.debug("Converting %s from mode %s to L", path, img.mode)
            img = img.convert("L")
        return np.asarray(img).copy()


def _read_dicom(path: Path | _Upload, frame: Frame | int = "error") -> np.ndarray:
    """Stored values -> modality LUT -> VOI (the file's, or min/max) -> uint8; MONOCHROME1 inverted.

    pydicom maps the file's window onto the stored bit depth; that output range is found by pushing -inf/+inf
    through the same call. A VOI LUT Sequence has no such range: min/max.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(_stream(path), force=True)
        if "PixelData" not in ds:
            raise DataError(f"{path}: DICOM file has no pixel data")
        pixels = _dicom_frame(ds, path, frame)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return _dicom_colour(ds, pixels, photometric, path)
        values = _require_finite(path, apply_modality_lut(pixels, ds))
        if ds.get("VOILUTSequence"):
            gray = _to_uint8(apply_voi_lut(values, ds, index=0))
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0)
            gray = _to_uint8(apply_voi_lut(values, ds, index=0), lo, hi)
        else:
            gray = _to_uint8(values)
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot decode as DICOM ({_reason(err)})") from err
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


def _require_finite(path: Path | _Upload, values: np.ndarray) -> np.ndarray:
    """``values`` if every pixel is finite; NaN or infinity (float TIFF, float DICOM) is an error, not black."""
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise DataError(f"{path}: {bad} of {values.size} pixels are not finite (NaN or infinity)")
    return values


def _to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``[lo, hi]`` (default: the data's min/max) onto 0-255, clipping outside values."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(values.min()) if lo is None else float(lo)
    hi = float(values.max()) if hi is None else float(hi)
    if hi <= lo:  # a width-1 window thresholds; a constant image reads as zeros
        return np.where(values > hi, 255, 0).astype(np.uint8)
    return np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _reason(err: BaseException) -> str:
    """An exception's whole message on one line (pydicom lists its plugins' reasons on lines of their own)."""
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------------------------------- colour
def is_color(image: np.ndarray) -> bool:
    """Whether ``image`` is ``(H, W, 3)`` with channels that differ somewhere (gray stored as RGB is not)."""
    return image.ndim == 3 and not (
        np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
    )


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``(..., 3)`` ``uint8`` RGB, rounded exactly as Pillow's ``convert("L")``: gray stored as
    RGB comes back unchanged, and a colour file read gray equals the same file read RGB, then grayed."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def as_color(image: np.ndarray, color: Color) -> np.ndarray:
    """``image`` (gray ``(H, W)`` or RGB ``(H, W, 3)`` ``uint8``) in the ``color`` layout of :func:`read_image`."""
    if color == "gray":
        return to_gray(image) if image.ndim == 3 else image
    if color == "rgb":
        return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and not is_color(image):
        return np.ascontiguousarray(image[..., 0])
    return image


def _pillow_rgb(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` ``uint8`` RGB of a Pillow colour image; an alpha channel is dropped, not composited."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return np.asarray(img)[..., :3].copy()
    return np.asarray(img.convert("RGB")).copy()


def dicom_frame_count(path: str | Path) -> int:
    """The number of frames of a DICOM file, from its header; 1 for any other file or one that cannot be read
    (:func:`read_image` reports why)."""
    import pydicom

    try:
        if _detect(Path(path)) != "DICOM":
            return 1
        return max(1, int(pydicom.dcmread(path, force=True, stop_before_pixels=True).get("NumberOfFrames") or 1))
    except Exception:  # any failure is read_image's to report, with its reason
        return 1


def _dicom_frame(ds, path: Path | _Upload, frame: Frame | int) -> np.ndarray:
    """The pixel array of one frame: the only one, the ``first``/``middle`` one, or frame number ``frame``."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if isinstance(frame, int) and not 0 <= frame < frames:
        raise DataError(f"{path}: has {frames} frame(s); there is no frame {frame}")
    if frames <= 1:
        return ds.pixel_array
    if frame == "error":
        raise DataError(
            f"{path}: multi-frame DICOM ({frames} frames); set frame: first or frame: middle to read one of them"
        )
    index = frame if isinstance(frame, int) else 0 if frame == "first" else frames // 2
    ds.pixel_array_options(index=index)
    return ds.pixel_array


def _dicom_colour(ds, pixels: np.ndarray, photometric: str, path: Path | _Upload) -> np.ndarray:
    """``(H, W, 3)`` ``uint8`` RGB of a colour DICOM frame (pydicom has already turned YBR into RGB); ``PALETTE
    COLOR`` goes through the file's LUT, and values wider than 8 bits are scaled by their bit depth."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        pixels, bits = apply_color_lut(pixels, ds), None
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        bits = int(ds.get("BitsStored") or 8)
    else:
        raise DataError(
            f"{path}: DICOM PhotometricInterpretation {photometric!r} is not supported "
            "(MONOCHROME1/2, RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT and PALETTE COLOR are)"
        )
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DataError(f"{path}: {photometric} DICOM pixel data has shape {pixels.shape}, expected (rows, columns, 3)")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if bits is None:  # the LUT descriptor's third value: 8- or 16-bit entries
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None and int(descriptor[2]) in (8, 16) else 16
    return _to_uint8(pixels, 0, 2**bits - 1)
