"""MLflow system metrics (CPU, memory, disk, network; GPU through ``pynvml``) logged into the fit's run.

MLflow's switches for them apply to runs its fluent API starts; ``MLFlowLogger`` creates its run through the
client and ignores them (Lightning issue #20563). This runs MLflow's own sampler on the logger's run, on rank 0.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from medtransfer.tracking.callbacks import find_mlflow_logger
from medtransfer.upstream import mlflow_logger_settings, start_system_metrics, stop_system_metrics

__all__ = ["LogSystemMetrics"]

_logger = logging.getLogger(__name__)


class LogSystemMetrics(Callback):
    """Sample system metrics into the MLflow run while the trainer runs (rank 0 only).

    Args:
        enabled: ``True``/``False``; ``None`` follows MLflow's own switch (``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``).
        interval_s: seconds between samples (MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins if set).
        samples_before_logging: samples averaged into one logged point.
    """

    def __init__(self, enabled: bool | None = None, interval_s: float = 10.0, samples_before_logging: int = 1) -> None:
        if interval_s <= 0:
            raise ValueError(f"Expected argument `interval_s` to be > 0, but got {interval_s}")
        if samples_before_logging < 1:
            raise ValueError(f"Expected argument `samples_before_logging` to be >= 1, but got {samples_before_logging}")
        self.enabled, self.interval_s, self.samples_before_logging = enabled, interval_s, samples_before_logging
        self._monitor: Any = None

    @property
    def active(self) -> bool:
        """``enabled``, else MLflow's own switch (``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``)."""
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

        return bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()) if self.enabled is None else self.enabled

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = find_mlflow_logger(trainer)
        if not self.active or not trainer.is_global_zero or logger is None or self._monitor is not None:
            return
        # logger.run_id creates the run if it does not exist yet (rank 0 only)
        self._monitor = start_system_metrics(
            logger.run_id, mlflow_logger_settings(logger)[0], self.interval_s, self.samples_before_logging
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop sampling and log one last sample, so that even a run shorter than ``interval_s`` has one."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            stop_system_metrics(monitor)
        except Exception as err:  # a failed sample must not fail the training that ran
            _logger.warning("Could not log the last system metrics sample: %s", err)

    on_test_start, on_test_end = on_fit_start, on_fit_end  # a test after fit continues the fit's steps

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)
