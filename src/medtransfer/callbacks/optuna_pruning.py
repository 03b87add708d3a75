"""Report a validation metric to an Optuna trial every epoch and stop the fit when the pruner says so.

Optuna's own ``PyTorchLightningPruningCallback`` lives in the separate ``optuna-integration`` package, which
medtransfer does not depend on; its core is the ten lines of ``on_validation_end`` below. Unlike that callback,
this one is built from plain values (storage URL, study name, trial number, pruner class path), so it can be
given on the ``medtransfer fit`` command line and works in any process that can reach the study's storage.
"""

from __future__ import annotations

import logging

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from medtransfer.errors import MedtransferError
from medtransfer.tracking.callbacks import find_mlflow_logger

__all__ = ["OptunaPruning"]

_logger = logging.getLogger(__name__)


class OptunaPruning(Callback):
    """Report ``monitor`` to trial ``trial_number`` of an Optuna study after each validation epoch; raise
    ``optuna.TrialPruned`` when the pruner prunes it.

    Lightning handles the exception like any other: callbacks' ``on_exception`` run, the logger is finalized
    and the exception leaves ``trainer.fit``; ``medtransfer search`` then marks the trial ``PRUNED`` and its
    MLflow run ``KILLED``. The trial's user attribute ``mlflow_run_id`` names the fit's MLflow run.

    Args:
        storage: the study's storage URL (``sqlite:///mlruns/optuna.db``, ``postgresql://...``).
        study_name: the Optuna study.
        trial_number: the trial this fit evaluates (``trial.number``).
        monitor: the logged metric to report, e.g. ``val/auroc``.
        pruner: the study's pruner (Optuna does not store pruners); ``None`` reports without pruning.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        monitor: str = "val/auroc",
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.monitor = monitor
        self.pruner = pruner
        self._trial: optuna.Trial | None = None

    def _open_trial(self) -> optuna.Trial:
        from medtransfer.commands.search import open_storage  # the search module owns the storage settings

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),  # never asked: the trial's parameters are already drawn
            pruner=self.pruner or optuna.pruners.NopPruner(),
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        return optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trial = self._open_trial()
        logger = find_mlflow_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            self._trial.set_user_attr("mlflow_run_id", logger.run_id)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._trial is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise MedtransferError(f"The search metric {self.monitor!r} was not logged; logged metrics: {logged}")
        epoch = trainer.current_epoch
        self._trial.report(float(value), step=epoch)
        if self._trial.should_prune():
            _logger.info("Trial %d pruned at epoch %d (%s=%.4f)", self.trial_number, epoch, self.monitor, value)
            raise optuna.TrialPruned(f"Trial {self.trial_number} pruned at epoch {epoch}.")
