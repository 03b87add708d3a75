"""A generated corpus of bad and awkward image files, each classified as "must be read" or "must be reported".

``build_corpus(folder, images)`` writes, beside good PNGs of the real images given, over 1,000 files that a
reader must refuse with a clear error (zero bytes, truncated PNG/JPEG, non-image bytes under image names, a PNG
signature over garbage, 10,000 x 10,000 pixels, broken symbolic links, unreadable permissions when not root,
non-UTF-8 names over bad bytes) and valid images in awkward encodings that must read back as the right gray
pixels (16-bit, RGBA, LA, palette, CMYK JPEG/TIFF, RGB JPEG, BMP, wrong extension, 1x1, non-UTF-8 names).
Everything is small except the 10,000 x 10,000 PNG, a constant image that compresses to about 100 kB and is
written once, then hard-linked; the whole corpus takes about a second to write.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["BAD_KINDS", "GOOD_KINDS", "HUGE_SIDE", "Case", "build_corpus", "counts"]

#: Side of the decompression-bomb case: 10^8 pixels, above Pillow's MAX_IMAGE_PIXELS (89,478,485).
HUGE_SIDE = 10_000

#: Bad kinds and how many files of each (``unreadable`` only where permissions bind, i.e. not as root).
BAD_KINDS: dict[str, int] = {
    "zero_bytes": 150,
    "truncated_png": 200,
    "truncated_jpeg": 200,
    "non_image_bytes": 200,
    "png_signature_then_garbage": 100,
    "huge_10000x10000": 5,
    "broken_symlink": 100,
    "non_utf8_name_bad_bytes": 50,
    "unreadable_permissions": 50,
}
#: Valid images in awkward encodings, how many of each: they must read back as the source's gray pixels.
GOOD_KINDS: dict[str, int] = {
    "png_8bit": 60,
    "png_16bit": 15,
    "png_rgba": 15,
    "png_la": 10,
    "png_palette": 15,
    "jpeg_cmyk": 10,
    "tiff_cmyk": 10,
    "jpeg_rgb": 10,
    "bmp": 10,
    "png_named_jpg": 10,
    "jpeg_named_png": 10,
    "png_1x1": 10,
    "non_utf8_name_png": 10,
}
_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".dcm")
_JUNK = (b"hello, not an image\n", b"<html><body>404</body></html>", b"%PDF-1.4\n", b"PK\x03\x04", b"a,b\n1,2\n")


@dataclass(frozen=True)
class Case:
    """One file of the corpus: what it is, whether a reader must read it, and the gray pixels it must give.

    ``expected`` is set for ``read`` cases; ``tolerance`` is the largest mean absolute difference allowed
    (0 for lossless encodings, a few gray levels for JPEG).
    """

    path: Path
    kind: str
    expect: Literal["read", "report"]
    expected: np.ndarray | None = None
    tolerance: float = 0.0


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _good_writers() -> dict[str, tuple[Callable[[np.ndarray], bytes], str, Callable[[np.ndarray], np.ndarray], float]]:
    """kind -> (encode gray uint8 to bytes, suffix, expected gray from the source, tolerance)."""
    same = lambda gray: gray  # noqa: E731

    def sixteen(gray: np.ndarray) -> bytes:
        return _encoded(Image.fromarray(gray.astype(np.uint16) * 64 + 7), "PNG")  # 14 significant bits

    def stretched(gray: np.ndarray) -> np.ndarray:  # 16-bit is stretched by its own min/max
        values = gray.astype(np.float64)
        return np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)

    def rgba(gray: np.ndarray) -> bytes:
        pixels = np.dstack([gray, gray, gray, np.full_like(gray, 128)])
        return _encoded(Image.fromarray(pixels, "RGBA"), "PNG")

    def palette(gray: np.ndarray) -> bytes:
        image = Image.fromarray(gray).convert("P")  # a gray palette: exact
        return _encoded(image, "PNG")

    return {
        "png_8bit": (lambda g: _encoded(Image.fromarray(g), "PNG"), ".png", same, 0.0),
        "png_16bit": (sixteen, ".png", stretched, 0.0),
        "png_rgba": (rgba, ".png", same, 0.0),
        "png_la": (lambda g: _encoded(Image.fromarray(g).convert("LA"), "PNG"), ".png", same, 0.0),
        "png_palette": (palette, ".png", same, 0.0),
        "jpeg_cmyk": (lambda g: _encoded(Image.fromarray(g).convert("CMYK"), "JPEG", quality=95), ".jpg", same, 3.0),
        "tiff_cmyk": (lambda g: _encoded(Image.fromarray(g).convert("CMYK"), "TIFF"), ".tif", same, 0.0),
        "jpeg_rgb": (lambda g: _encoded(Image.fromarray(g).convert("RGB"), "JPEG", quality=95), ".jpg", same, 3.0),
        "bmp": (lambda g: _encoded(Image.fromarray(g), "BMP"), ".bmp", same, 0.0),
        "png_named_jpg": (lambda g: _encoded(Image.fromarray(g), "PNG"), ".jpg", same, 0.0),
        "jpeg_named_png": (lambda g: _encoded(Image.fromarray(g), "JPEG", quality=95), ".png", same, 3.0),
        "png_1x1": (lambda g: _encoded(Image.fromarray(g[:1, :1]), "PNG"), ".png", lambda g: g[:1, :1], 0.0),
        "non_utf8_name_png": (lambda g: _encoded(Image.fromarray(g), "PNG"), ".png", same, 0.0),
    }


def _non_utf8(folder: Path, stem: str, suffix: str) -> Path:
    """A path whose name holds the byte 0xE9 (Latin-1 'e acute'), invalid as UTF-8: Python sees a surrogate."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + stem.encode() + b"_caf\xe9" + suffix.encode()))


def build_corpus(folder: Path, images: np.ndarray, seed: int = 0) -> list[Case]:
    """Write the corpus under ``folder`` (``good/`` and ``bad/``) from real gray ``images`` (N, H, W) uint8.

    The kinds and counts are ``GOOD_KINDS`` and ``BAD_KINDS``; ``unreadable_permissions`` is left out when
    running as root, where ``chmod 000`` does not stop reads (``tests/data/test_readers.py`` reads such files as
    an ordinary user instead). Returns every case, good ones first.
    """
    rng = np.random.default_rng(seed)
    good_dir, bad_dir = folder / "good", folder / "bad"
    good_dir.mkdir(parents=True)
    bad_dir.mkdir()
    cases: list[Case] = []
    n = 0
    for kind, (encode, suffix, expected, tolerance) in _good_writers().items():
        for i in range(GOOD_KINDS[kind]):
            gray = images[n % len(images)]
            n += 1
            stem = f"{kind}_{i:03d}"
            path = _non_utf8(good_dir, stem, suffix) if kind.startswith("non_utf8") else good_dir / f"{stem}{suffix}"
            path.write_bytes(encode(gray))
            cases.append(Case(path, kind, "read", expected(gray), tolerance))
    png = [_encoded(Image.fromarray(images[i % len(images)]), "PNG") for i in range(20)]
    jpeg = [_encoded(Image.fromarray(images[i % len(images)]), "JPEG", quality=90) for i in range(20)]

    def bad(kind: str, i: int, data: bytes, suffix: str = ".png") -> None:
        path = bad_dir / f"{kind}_{i:04d}{suffix}"
        path.write_bytes(data)
        cases.append(Case(path, kind, "report"))

    for i in range(BAD_KINDS["zero_bytes"]):
        bad("zero_bytes", i, b"", _SUFFIXES[i % len(_SUFFIXES)])
    for i in range(BAD_KINDS["truncated_png"]):  # cut inside the pixel data (a PNG cut only in its checksums
        data = png[i % len(png)]  # and 12-byte IEND trailer still holds every pixel, and reads)
        bad("truncated_png", i, data[: int(rng.integers(1, len(data) - 24))])
    for i in range(BAD_KINDS["truncated_jpeg"]):  # any cut loses the end-of-image marker
        data = jpeg[i % len(jpeg)]
        bad("truncated_jpeg", i, data[: int(rng.integers(1, len(data) - 1))], ".jpg")
    for i in range(BAD_KINDS["non_image_bytes"]):
        junk = _JUNK[i % len(_JUNK)] if i % 2 else rng.bytes(int(rng.integers(1, 4096)))
        bad("non_image_bytes", i, junk, _SUFFIXES[i % len(_SUFFIXES)])
    for i in range(BAD_KINDS["png_signature_then_garbage"]):
        bad("png_signature_then_garbage", i, b"\x89PNG\r\n\x1a\n" + rng.bytes(int(rng.integers(0, 512))))
    first = bad_dir / "huge_10000x10000_0000.png"
    Image.new("L", (HUGE_SIDE, HUGE_SIDE), 128).save(first)
    cases.append(Case(first, "huge_10000x10000", "report"))
    for i in range(1, BAD_KINDS["huge_10000x10000"]):
        link = bad_dir / f"huge_10000x10000_{i:04d}.png"
        os.link(first, link)
        cases.append(Case(link, "huge_10000x10000", "report"))
    for i in range(BAD_KINDS["broken_symlink"]):
        link = bad_dir / f"broken_symlink_{i:04d}.png"
        link.symlink_to(bad_dir / f"missing_{i:04d}.png")
        cases.append(Case(link, "broken_symlink", "report"))
    for i in range(BAD_KINDS["non_utf8_name_bad_bytes"]):
        path = _non_utf8(bad_dir, f"non_utf8_name_bad_bytes_{i:04d}", ".png")
        path.write_bytes(rng.bytes(64))
        cases.append(Case(path, "non_utf8_name_bad_bytes", "report"))
    if os.geteuid() != 0:
        for i in range(BAD_KINDS["unreadable_permissions"]):
            bad("unreadable_permissions", i, png[i % len(png)])
            cases[-1].path.chmod(0)
    return cases


def counts(cases: list[Case]) -> Counter[tuple[str, str]]:
    """How many cases of each ``(kind, expect)``: the rows of the reliability table in docs/reliability.md."""
    return Counter((case.kind, case.expect) for case in cases)
