"""A callback for fault tests, named by class path on a ``fit`` command line (``attempts.KillBeforeSave``).

It logs which attempt of a fit is running (``$MEDTRANSFER_TEST_ATTEMPT``) as ``probe/attempt`` with the
validation metrics, and in attempt 1 SIGKILLs its own process at the end of one validation epoch: after that
epoch's metrics are logged, before ``ModelCheckpoint`` saves it (Lightning calls checkpoint callbacks last).
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback, LightningModule, Trainer


class KillBeforeSave(Callback):
    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch
        self.attempt = int(os.environ.get("MEDTRANSFER_TEST_ATTEMPT", "1"))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("probe/attempt", float(self.attempt))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.attempt == 1 and trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)
