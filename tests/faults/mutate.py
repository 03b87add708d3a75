"""Mutation fuzzing of real image files: seeds encoded from real X-rays, mutated by a seeded random generator.

``seeds(images)`` encodes real gray images as PNG (8/16-bit), JPEG, BMP, TIFF (8-bit, 16-bit, float) and DICOM
(MONOCHROME1/2, 8/16-bit); ``mutants(seeds, n, seed)`` yields ``n`` files made from them by the mutations a
damaged disk, a bad transfer or a hostile sender produce: flipped bits, overwritten bytes, numeric fields set to
0 / -1 / a power of two, cut or duplicated spans, a truncated tail. The same ``seed`` always gives the same
files, so a failure found once is found again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Mutant", "mutants", "seeds"]

#: Values written over 1, 2 or 4 bytes: zero, all ones, sign bits, powers of two near sizes.
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000)


@dataclass(frozen=True)
class Mutant:
    """One mutated file: its bytes, the format and suffix of its seed, and what was done to it."""

    data: bytes
    kind: str
    suffix: str
    mutation: str


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _dicom(gray: np.ndarray, photometric: str, bits: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medtransfer", photometric, str(bits)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "FUZZ"
    pixels = gray.astype(np.uint16) * 16 if bits == 16 else gray
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if bits == 16:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seeds(images: np.ndarray) -> list[tuple[str, str, bytes]]:
    """``(kind, suffix, bytes)`` valid files of every format the reader accepts, from real gray ``images``."""
    found = []
    for i, gray in enumerate(images):
        image = Image.fromarray(gray)
        found += [
            ("png", ".png", _encoded(image, "PNG")),
            ("png16", ".png", _encoded(Image.fromarray(gray.astype(np.uint16) * 200), "PNG")),
            ("jpeg", ".jpg", _encoded(image, "JPEG", quality=90)),
            ("bmp", ".bmp", _encoded(image, "BMP")),
            ("tiff", ".tif", _encoded(image, "TIFF")),
            ("tiff16", ".tif", _encoded(Image.fromarray(gray.astype(np.uint16) * 200), "TIFF")),
            ("tiff_float", ".tif", _encoded(Image.fromarray(gray.astype(np.float32) / 255), "TIFF")),
            ("dicom", ".dcm", _dicom(gray, ("MONOCHROME2", "MONOCHROME1")[i % 2], (8, 16)[i % 2])),
        ]
    return found


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buffer = bytearray(data)
    if not buffer:  # deleted or cut to nothing by an earlier step: an empty file is a mutant too
        return data, "nothing left"
    operation = int(rng.integers(6))
    at = int(rng.integers(len(buffer)))
    if operation == 0:
        bit = int(rng.integers(8))
        buffer[at] ^= 1 << bit
        return bytes(buffer), f"flip bit {bit} at {at}"
    if operation == 1:
        count = int(rng.integers(1, 9))
        buffer[at : at + count] = rng.bytes(count)[: len(buffer) - at]
        return bytes(buffer), f"overwrite {count} bytes at {at}"
    if operation == 2:
        width = int(rng.choice([1, 2, 4]))
        value = int(rng.choice(_INTERESTING)) & ((1 << (8 * width)) - 1)
        order = "little" if rng.integers(2) else "big"
        buffer[at : at + width] = value.to_bytes(width, order)[: len(buffer) - at]
        return bytes(buffer), f"set {width} bytes at {at} to {value:#x} ({order})"
    if operation == 3:
        count = int(rng.integers(1, 64))
        del buffer[at : at + count]
        return bytes(buffer), f"delete {count} bytes at {at}"
    if operation == 4:
        count = int(rng.integers(1, 64))
        buffer[at:at] = buffer[at : at + count]
        return bytes(buffer), f"duplicate {count} bytes at {at}"
    return bytes(buffer[: max(1, at)]), f"truncate to {max(1, at)} bytes"


def mutants(seed_files: list[tuple[str, str, bytes]], n: int, seed: int = 0) -> Iterator[Mutant]:
    """``n`` mutated files, each 1-3 mutations of a seed file chosen in turn; the same ``seed``, the same files."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        kind, suffix, data = seed_files[i % len(seed_files)]
        steps = []
        for _ in range(int(rng.integers(1, 4))):
            data, step = _mutate(data, rng)
            steps.append(step)
        yield Mutant(data, kind, suffix, "; ".join(steps))
