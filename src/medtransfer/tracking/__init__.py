"""Experiment tracking with MLflow: the logger, config logging and run bookkeeping callbacks (imported on first
use: ``ui`` and ``redaction`` import neither Lightning nor MLflow)."""

from importlib import import_module
from typing import Any

__all__ = ["DEFAULT_TRACKING_URI", "LogConfigToMLflow", "MLflowLogger", "MLflowRunTracking", "open_run"]

_HOMES = {"LogConfigToMLflow": "callbacks", "MLflowRunTracking": "callbacks", "DEFAULT_TRACKING_URI": "mlflow",
          "MLflowLogger": "mlflow", "open_run": "mlflow"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
