"""Checksummed, atomic file downloads and fetching of official MedMNIST files.

The target appears only once its length and MD5 are checked. torchvision's ``download_url`` writes the target in
place and has no timeout, so only its ``calculate_md5`` is used here.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.request
from pathlib import Path

from torchvision.datasets.utils import calculate_md5
from tqdm.auto import tqdm

from medtransfer.data.medmnist_info import get_medmnist_info
from medtransfer.errors import DataError
from medtransfer.files import atomic_open

__all__ = ["download_url", "fetch_medmnist", "md5sum"]

_logger = logging.getLogger(__name__)

_CHUNK_SIZE = 1 << 20
_USER_AGENT = "medtransfer-downloader"


def md5sum(path: str | Path, chunk_size: int = _CHUNK_SIZE) -> str:
    """The hex MD5 digest of a file (torchvision's ``calculate_md5``); a file that cannot be read is a
    ``DataError`` naming it."""
    try:
        return calculate_md5(path, chunk_size)
    except OSError as exc:
        raise DataError(f"Cannot read {path} to compute its md5: {exc}") from exc


def download_url(url: str, path: str | Path, md5: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path`` atomically and return ``path``; a file already there with ``md5`` is kept.

    ``timeout`` (seconds) bounds connecting and each read. Any network or I/O error, an incomplete transfer or an
    MD5 mismatch is a ``DataError`` naming the URL and the path, and leaves no file behind.
    """
    path = Path(path)
    expected = md5.strip().lower()
    if path.is_file():
        actual = md5sum(path)
        if actual == expected:
            _logger.info("%s already exists with the expected md5, not downloading it again", path)
            return path
        _logger.warning("%s exists but its md5 is %s, not %s; downloading it again", path, actual, expected)

    _logger.info("Downloading %s to %s", url, path)
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    try:  # the target appears only when every byte is in and checked (files.atomic_open)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with atomic_open(path, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length_header = response.headers.get("Content-Length")
            total = int(length_header) if length_header and length_header.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                      disable=not progress) as bar:  # fmt: skip
                while chunk := response.read(_CHUNK_SIZE):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                reason = f"incomplete transfer, got {received} of {total} bytes"
                raise DataError(f"Cannot download {url} to {path}: {reason}")
            actual = digest.hexdigest()
            if actual != expected:
                raise DataError(f"Checksum mismatch downloading {url} to {path}: expected md5 {expected}, got {actual}")
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"Cannot download {url} to {path}: {reason}") from exc
    _logger.info("Saved %s (%d bytes, md5 %s)", path, received, actual)
    return path


def fetch_medmnist(
    flag: str, size: int, root: str | Path, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Download the official MedMNIST ``.npz`` of ``flag`` and ``size`` to ``root/<official name>``, checked against
    the official MD5, and return its path; ``base_url`` names a mirror holding the files under their official
    names. An unknown flag or size is a ``DataError`` before anything is downloaded."""
    info = get_medmnist_info(flag)
    url, md5 = info.resource(size)
    filename = info.filename(size)
    if base_url is not None:
        url = f"{base_url.rstrip('/')}/{filename}"
    return download_url(url, Path(root) / filename, md5, progress=progress)
