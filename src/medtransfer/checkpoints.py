"""Reading checkpoints safely: tensors and plain values only (``weights_only=True``), never pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from medtransfer.errors import DataError

__all__ = ["load_checkpoint"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``path`` loaded with ``weights_only=True``.

    A file that carries other pickled objects (code that unpickling would run) is one ``DataError`` naming it, and
    nothing in it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "not a plain checkpoint")
        raise DataError(
            f"{path}: refused to load: it holds pickled objects beyond tensors and plain values ({reason}); "
            "medtransfer loads checkpoints with weights_only=True"
        ) from None
