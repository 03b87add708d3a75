"""``OptunaPruning``: the class path trial configs logged by older ``medtransfer search`` runs name
(``config/fit.yaml``); Optuna's own ``PyTorchLightningPruningCallback`` built from plain values."""

from __future__ import annotations

import optuna
from optuna_integration import PyTorchLightningPruningCallback

__all__ = ["OptunaPruning"]


class OptunaPruning(PyTorchLightningPruningCallback):
    """Report ``monitor`` to trial ``trial_number`` of the study ``study_name`` in ``storage`` each epoch; prune
    as ``pruner`` says (``None``: report only)."""

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str = "val/auroc",
                 pruner: optuna.pruners.BasePruner | None = None) -> None:  # fmt: skip
        rdb = optuna.storages.RDBStorage(storage)
        study = optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner or optuna.pruners.NopPruner())
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study_name), trial_number)
        super().__init__(optuna.Trial(study, trial_id), monitor)
