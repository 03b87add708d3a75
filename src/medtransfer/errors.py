"""Errors caused by the user's input, which the commands report as one line instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BackboneError", "DataError", "MedtransferError", "WeightsError", "exit_on_user_error", "user_error"]


class MedtransferError(Exception):
    """Base class: bad input or configuration that the user can fix; the message says what and where."""


class DataError(MedtransferError, ValueError):
    """A data file is missing, unreadable, fails its checksum or lacks the expected keys/columns."""


class WeightsError(MedtransferError, RuntimeError):
    """Pretrained weights cannot be found or do not fit the model they are loaded into."""


class BackboneError(MedtransferError, ValueError):
    """The requested backbone does not exist in timm."""


def user_error(err: BaseException | None) -> MedtransferError | None:
    """The user-facing error behind ``err``: jsonargparse wraps errors raised while instantiating classes, and
    PyTorch re-raises a loader worker's error with the worker's traceback as its message (keep the last line).
    """
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, MedtransferError):
            message = str(err)
            if "Original Traceback" in message:
                last = message.strip().splitlines()[-1]
                err = type(err)(last.split(f"{type(err).__name__}: ", 1)[-1])
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a user-facing error into ``medtransfer: error: ...`` on stderr and exit status 2; let bugs raise."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"medtransfer: error: {found}", file=sys.stderr)
        sys.exit(2)
