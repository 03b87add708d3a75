"""The one module that touches other libraries' private attributes (Lightning, MLflow, Optuna, timm).

Each function names what it reads or writes and why no public API serves; ``tests/test_upstream.py`` fails
loudly when an upstream release renames or removes one of them, so an upgrade breaks here and nowhere else.
"""

from __future__ import annotations

from typing import Any

__all__ = ["batches_that_stepped", "mlflow_logger_settings", "rewrap_ddp"]


def mlflow_logger_settings(logger: Any) -> tuple[str, str, str | None]:
    """``(tracking URI, experiment name, artifact location)`` of a Lightning ``MLFlowLogger``.

    Lightning 2.6's ``MLFlowLogger`` keeps its constructor's ``tracking_uri``, ``experiment_name`` and
    ``artifact_location`` as ``_tracking_uri``, ``_experiment_name``, ``_artifact_location`` and offers no public
    accessor (Lightning-AI/pytorch-lightning#19983 asks for one).
    """
    return logger._tracking_uri, logger._experiment_name, logger._artifact_location


def batches_that_stepped(trainer: Any) -> int:
    """The optimizer steps so far: the step Lightning logs epoch-end metrics at (``_batches_that_stepped``).

    ``trainer.global_step`` counts optimizer steps too, but Lightning's loggers key epoch-end metrics on the
    epoch loop's private counter (it differs from ``global_step`` with several optimizers or manual
    optimization); reproducing Lightning's own step needs it.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def rewrap_ddp(trainer: Any, pl_module: Any) -> None:
    """Wrap the module in DDP again (after an unfreeze).

    DDP all-reduces only the parameters that required grad when it wrapped the module, so a backbone unfrozen
    later would train on each rank's gradients alone (Lightning-AI/pytorch-lightning#20340). Lightning has no
    public re-wrap: this resets the strategy's wrapped model and calls its ``configure_ddp``.
    """
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()
