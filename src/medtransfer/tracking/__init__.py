"""Experiment tracking with MLflow: the logger, config logging and run bookkeeping callbacks."""

from medtransfer.tracking.callbacks import LogConfigToMLflow, MLflowRunTracking
from medtransfer.tracking.mlflow import DEFAULT_TRACKING_URI, MLflowLogger, open_run

__all__ = ["DEFAULT_TRACKING_URI", "LogConfigToMLflow", "MLflowLogger", "MLflowRunTracking", "open_run"]
