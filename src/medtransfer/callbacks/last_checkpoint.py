"""``last.ckpt`` rewritten at the end of every epoch, so a stopped fit resumes from its latest state.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only in an epoch where its monitored
top-k checkpoint was saved, that is when validation improved; a fit killed after epochs without improvement
would resume from the best epoch and redo the rest. This callback saves the latest state unconditionally (a
``ModelCheckpoint`` without a monitor keeps its single newest file), next to the best checkpoints.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Keep ``<checkpoint dir>/last.ckpt`` at the end of the latest epoch (the resume point of ``fit``)."""

    def __init__(self) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
