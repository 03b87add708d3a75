"""The one module that touches other libraries' internals (private attributes, undocumented classes, state only
their constructors set). Each function says why no public API serves; ``tests/test_upstream.py`` fails when an
upstream release renames or removes one, so an upgrade breaks here and nowhere else.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "attached_trainer",
    "batches_that_stepped",
    "extend_scheduler",
    "mlflow_logger_run",
    "mlflow_logger_settings",
    "mlflow_logger_started",
    "rewrap_ddp",
    "set_mlflow_logger_run",
    "start_system_metrics",
    "stop_system_metrics",
]


def mlflow_logger_settings(logger: Any) -> tuple[str, str, str | None]:
    """``(tracking URI, experiment name, artifact location)`` of a Lightning ``MLFlowLogger``: private attributes
    without a public accessor (Lightning-AI/pytorch-lightning#19983 asks for one)."""
    return logger._tracking_uri, logger._experiment_name, logger._artifact_location


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (the public ``module.trainer`` raises then)."""
    return module._trainer


def mlflow_logger_started(logger: Any) -> bool:
    """Whether a Lightning ``MLFlowLogger`` has created (or resumed) its run yet; the public ``run_id`` and
    ``experiment`` would create it as a side effect of asking."""
    return logger._initialized


def mlflow_logger_run(logger: Any) -> tuple[str | None, str | None]:
    """``(run id, run name)`` a Lightning ``MLFlowLogger`` will use, without creating the run (``run_id`` would)."""
    return logger._run_id, logger._run_name


def set_mlflow_logger_run(logger: Any, run_id: str | None = None, run_name: str | None = None) -> None:
    """Point a not-yet-started ``MLFlowLogger`` at an existing run, or name the run it will create: constructor
    arguments only, which medtransfer learns after the CLI built the logger."""
    if run_id is not None:
        logger._run_id = run_id
    if run_name is not None:
        logger._run_name = run_name


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning logs epoch-end metrics at: the epoch loop's private counter, which differs from
    ``global_step`` with several optimizers or manual optimization."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def rewrap_ddp(trainer: Any, pl_module: Any) -> None:
    """Wrap the module in DDP again after an unfreeze: DDP all-reduces only the parameters that required grad when
    it wrapped the module (Lightning-AI/pytorch-lightning#20340), and Lightning has no public re-wrap."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()


def extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Make a torch scheduler schedule ``group``, added to its optimizer later (an unfreeze's backbone group), with
    the first group's values scaled to its learning rate.

    Schedulers take one value per group at construction only (pytorch/pytorch#53712, open): ``base_lrs``,
    ``LambdaLR.lr_lambdas``, ``ReduceLROnPlateau.min_lrs`` and ``OneCycleLR``'s per-group ``initial_lr``/``max_lr``/
    ``min_lr`` (and momentum) keys.
    """
    first = scheduler.optimizer.param_groups[0]
    scale = group["lr"] / first.get("max_lr", first.get("initial_lr", first["lr"]))
    for key, value in first.items():
        if key in ("initial_lr", "max_lr", "min_lr"):  # OneCycleLR's peak becomes the group's lr
            group[key] = value * scale
        elif key not in group:  # e.g. OneCycleLR's momentum bounds
            group[key] = value
    if "max_lr" in first:
        group["lr"] = group["initial_lr"]
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(group["initial_lr"])
    if hasattr(scheduler, "lr_lambdas"):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    if hasattr(scheduler, "min_lrs"):
        scheduler.min_lrs.append(scheduler.min_lrs[0])


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float, samples_before_logging: int) -> Any:
    """Start MLflow's undocumented ``SystemMetricsMonitor`` on an existing run, continuing its ``system/*`` steps:
    MLflow starts it only from the fluent ``start_run``, whose ``end_run`` would end the ``MLFlowLogger``'s run,
    and the logger has no switch for it (Lightning-AI/pytorch-lightning#20563, open)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, samples_before_logging=samples_before_logging,
        resume_logging=True, tracking_uri=tracking_uri,
    )  # fmt: skip
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop a sampler from :func:`start_system_metrics` and log one last sample, as its sampling loop does:
    ``finish()`` alone logs nothing for a run shorter than the sampling interval."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
