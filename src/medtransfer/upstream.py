"""The one module that touches other libraries' internals (Lightning, MLflow, Optuna, timm, torch): private
attributes, undocumented classes, and state that only their constructors are meant to set.

Each function names what it reads or writes, why no public API serves and, where there is one, the upstream issue
it waits for; ``tests/test_upstream.py`` fails loudly when an upstream release renames or removes one of them (or
makes one unneeded), so an upgrade breaks here and nowhere else.
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


def extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Make a torch learning-rate scheduler schedule ``group``, a parameter group added to its optimizer after the
    scheduler was built (the backbone group of an unfreeze): the new group gets the first group's values, scaled
    to its own learning rate.

    torch's schedulers take one value per group at construction and skip or fail on a group added later
    (pytorch/pytorch#53712, open): ``base_lrs`` (every ``LRScheduler``), ``LambdaLR.lr_lambdas``,
    ``ReduceLROnPlateau.min_lrs``, and the ``initial_lr``/``max_lr``/``min_lr`` (and momentum) keys that
    ``OneCycleLR`` writes into each group. Only their constructors set them; there is no public way to extend them.
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
    """Start MLflow's system-metrics sampler (``SystemMetricsMonitor``, not part of MLflow's documented API) on an
    existing run, continuing the run's ``system/*`` steps.

    MLflow starts it only from the fluent ``mlflow.start_run(log_system_metrics=True)``, whose ``end_run`` would
    also end the run that Lightning's ``MLFlowLogger`` owns; the logger itself has no switch for it
    (Lightning-AI/pytorch-lightning#20563, open).
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, samples_before_logging=samples_before_logging,
        resume_logging=True, tracking_uri=tracking_uri,
    )  # fmt: skip
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop a sampler from :func:`start_system_metrics` and log one last sample: ``finish()`` alone logs nothing
    for a run shorter than the sampling interval. The sample goes through the monitor's own ``collect_metrics``,
    ``aggregate_metrics``, ``publish_metrics`` and ``mlflow_logger.flush``, as its sampling loop does."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
