"""Errors caused by the user's input, which the CLI reports as one line instead of a traceback."""

__all__ = ["BackboneError", "DataError", "MedtransferError", "WeightsError"]


class MedtransferError(Exception):
    """Base class: bad input or configuration that the user can fix; the message says what and where."""


class DataError(MedtransferError, ValueError):
    """A data file is missing, unreadable, fails its checksum or lacks the expected keys/columns."""


class WeightsError(MedtransferError, RuntimeError):
    """Pretrained weights cannot be found or do not fit the model they are loaded into."""


class BackboneError(MedtransferError, ValueError):
    """The requested backbone does not exist in timm."""
