"""``last.ckpt`` rewritten at the end of every epoch, so a stopped fit resumes from its latest state.

Lightning 2.6's ``save_last=True`` rewrites ``last.ckpt`` only when its monitored top-k checkpoint was saved, so
a fit killed after epochs without improvement would redo them; a ``ModelCheckpoint`` without a monitor does not.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Keep ``<checkpoint dir>/last.ckpt`` at the end of the latest epoch (the resume point of ``fit``)."""

    def __init__(self) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
