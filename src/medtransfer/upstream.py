"""The one module that touches other libraries' private attributes (Lightning, MLflow, Optuna, timm).

Each function names what it reads or writes and why no public API serves; ``tests/test_upstream.py`` fails
loudly when an upstream release renames or removes one of them, so an upgrade breaks here and nowhere else.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "attached_trainer",
    "batches_that_stepped",
    "mlflow_logger_run",
    "mlflow_logger_settings",
    "mlflow_logger_started",
    "rewrap_ddp",
    "set_mlflow_logger_run",
]


def mlflow_logger_settings(logger: Any) -> tuple[str, str, str | None]:
    """``(tracking URI, experiment name, artifact location)`` of a Lightning ``MLFlowLogger``.

    Lightning 2.6's ``MLFlowLogger`` keeps its constructor's ``tracking_uri``, ``experiment_name`` and
    ``artifact_location`` as ``_tracking_uri``, ``_experiment_name``, ``_artifact_location`` and offers no public
    accessor (Lightning-AI/pytorch-lightning#19983 asks for one).
    """
    return logger._tracking_uri, logger._experiment_name, logger._artifact_location


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None``: its private ``_trainer``.

    The public ``module.trainer`` raises when no Trainer is attached (a module used on its own, in tests or
    ``predict``); asking first needs the private attribute.
    """
    return module._trainer


def mlflow_logger_started(logger: Any) -> bool:
    """Whether a Lightning ``MLFlowLogger`` has created (or resumed) its run yet: its private ``_initialized``.

    The public ``run_id``/``experiment`` properties would create the run as a side effect of asking.
    """
    return logger._initialized


def mlflow_logger_run(logger: Any) -> tuple[str | None, str | None]:
    """``(run id, run name)`` a Lightning ``MLFlowLogger`` will use, without creating the run (``run_id`` would)."""
    return logger._run_id, logger._run_name


def set_mlflow_logger_run(logger: Any, run_id: str | None = None, run_name: str | None = None) -> None:
    """Point a not-yet-started ``MLFlowLogger`` at an existing run, or name the run it will create.

    Both are constructor arguments only; medtransfer learns them after the CLI built the logger (the run id from
    the checkpoint being resumed, the default run name from the config), before the run starts.
    """
    if run_id is not None:
        logger._run_id = run_id
    if run_name is not None:
        logger._run_name = run_name


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
