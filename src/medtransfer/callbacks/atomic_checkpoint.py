"""Checkpoints that appear whole or not at all, so a fit killed while saving resumes from the previous one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from medtransfer.files import atomic_open

__all__ = ["AtomicCheckpointIO"]

_logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint beside its target and renames it into place.

    Lightning's ``_atomic_save`` stages the file in the system temp folder; where that is another filesystem
    (a tmpfs ``/tmp``), the final move is a copy into ``last.ckpt`` itself, which a kill truncates. Here it is
    written as ``.<name>.<random>.tmp`` beside the target and ``os.replace``d over it; the next save removes
    the partial files of killed ones. Remote paths keep Lightning's save: object stores publish whole objects.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        self.remove_partial_files(path)
        with atomic_open(path, "wb") as stream:
            torch.save(checkpoint, stream)

    @staticmethod
    def remove_partial_files(path: Path) -> list[Path]:
        """Delete the ``.<name>.<random>.tmp`` files beside ``path``: saves killed before their rename."""
        removed = list(path.parent.glob(f".*{path.suffix}.*.tmp")) if path.parent.is_dir() else []
        for partial in removed:
            partial.unlink(missing_ok=True)
        if removed:
            _logger.info("Removed %d partial checkpoint file(s) of interrupted saves in %s", len(removed), path.parent)
        return removed


def _is_local_path(path: Any) -> bool:
    """A plain local path (``file://`` URLs and remote stores go through Lightning's own save)."""
    return "://" not in os.fspath(path) and isinstance(get_filesystem(path), LocalFileSystem)
