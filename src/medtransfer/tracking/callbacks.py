"""Callbacks that keep an MLflow run complete: the resolved config, run bookkeeping, the best checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from medtransfer.checkpoints import load_checkpoint
from medtransfer.tracking.datasets import log_dataset_inputs
from medtransfer.tracking.mlflow import MLflowLogger
from medtransfer.tracking.redaction import redact, redact_yaml
from medtransfer.tracking.tags import resolved_data_params, run_tags
from medtransfer.upstream import batches_that_stepped, mlflow_logger_settings

__all__ = [
    "LogConfigToMLflow",
    "MLflowRunTracking",
    "find_mlflow_logger",
    "flatten_config",
    "log_artifacts",
    "read_run_info",
    "redacted",
    "run_folder",
]

_logger = logging.getLogger(__name__)

#: Keys of the resolved config that describe one invocation, not the experiment.
_NOT_PARAMS = ("config", "ckpt_path", "test_after_fit")


def find_mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    """The trainer's first MLflow logger, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def run_folder(trainer: Trainer, dirpath: str | None, name: str) -> Path:
    """``dirpath``, else ``<root>/<experiment>/<run>/<name>`` (``<root>/<name>`` without an MLflow run)."""
    if dirpath is not None:
        return Path(dirpath)
    logger = find_mlflow_logger(trainer)
    if logger is not None and logger.run_id is not None:
        return Path(trainer.default_root_dir) / str(logger.experiment_id) / str(logger.run_id) / name
    return Path(trainer.default_root_dir) / name


def log_artifacts(trainer: Trainer, paths: list[Path], artifact_path: str) -> None:
    """Log ``paths`` to the trainer's MLflow run under ``artifact_path``, if it has one."""
    logger = find_mlflow_logger(trainer)
    if logger is not None and logger.run_id is not None:
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def redacted(key: str, value: str) -> str:
    """``value`` as text with :func:`~medtransfer.tracking.redaction.redact` applied (``key`` names it)."""
    return str(redact(str(value), key))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a LightningCLI config into ``a.b.c`` keys; ``init_args`` levels are dropped and
    ``class_path`` becomes the value of its parent key, so ``model.optimizer`` reads ``torch.optim.Adam``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key == "class_path":
            flat[prefix.rstrip(".")] = str(value)
            continue
        name = prefix if key == "init_args" else f"{prefix}{key}."
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name))
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                item = item if isinstance(item, Mapping) else {"value": item}
                flat.update(flatten_config(item, f"{name}{index}."))
        else:
            flat[name.rstrip(".")] = redacted(key, str(value))
    return flat


def read_run_info(checkpoint_path: str | Path) -> dict[str, str] | None:
    """The MLflow run a checkpoint was written in (``run_id``, ``experiment_id``, ``tracking_uri``), if any."""
    checkpoint = load_checkpoint(checkpoint_path)
    return checkpoint.get("mlflow")


class LogConfigToMLflow(SaveConfigCallback):
    """Log the resolved config to MLflow as ``config/<stage>.yaml`` and, on ``fit``, as flattened params (a
    resumed run keeps its params, as MLflow cannot overwrite one: changed values are warned about)."""

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = find_mlflow_logger(trainer)
        if logger is None:
            return
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        text = redact_yaml(self.parser.dump(self.config, skip_none=False))  # secret keys and URI credentials
        logger.experiment.log_text(logger.run_id, text, f"config/{stage}.yaml")
        if stage != "fit":
            return
        params = {k: v for k, v in flatten_config(yaml.safe_load(text)).items() if k.split(".")[0] not in _NOT_PARAMS}
        existing = logger.experiment.get_run(logger.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:250])
        if changed:
            _logger.warning("Resumed run keeps its original params; changed since: %s", ", ".join(changed))
        logger.log_hyperparams({k: v for k, v in params.items() if k not in existing})


class MLflowRunTracking(Callback):
    """Store the MLflow run in every checkpoint (so ``test``/resume continue it), tag the run at fit start
    (:func:`~medtransfer.tracking.tags.run_tags`, resolved input params; a resumed run keeps those it has) and
    log the best checkpoint."""

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = find_mlflow_logger(trainer)
        if logger is None or logger.run_id is None:
            return
        from mlflow.entities import Param, RunTag

        existing = logger.experiment.get_run(logger.run_id).data
        tags = [RunTag(k, v) for k, v in run_tags(trainer, trainer.datamodule).items() if k not in existing.tags]
        resolved = resolved_data_params(trainer.datamodule).items()
        params = [Param(k, v[:6000]) for k, v in resolved if k not in existing.params]  # MLflow's longest value
        logger.experiment.log_batch(logger.run_id, params=params, tags=tags)
        log_dataset_inputs(logger.experiment, logger.run_id, trainer.datamodule)  # the UI's Dataset column
        if isinstance(logger, MLflowLogger) and trainer.checkpoint_callbacks:
            logger.hold_until_checkpoint()  # an epoch's metrics reach the run with its checkpoint: see there

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = find_mlflow_logger(trainer)
        if logger is not None and logger.run_id is not None:
            uri = redact(mlflow_logger_settings(logger)[0])
            checkpoint["mlflow"] = {"run_id": logger.run_id, "experiment_id": logger.experiment_id, "tracking_uri": uri}
            if self._epoch_ending:
                checkpoint["mlflow"]["epoch_end_metrics"] = self._epoch_end_metrics(trainer)
            if isinstance(logger, MLflowLogger):
                logger.checkpoint_covers(batches_that_stepped(trainer) - 1)  # the epoch-end step Lightning logs at

    _epoch_ending = False
    _unlogged: dict[str, Any] | None = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A fit or test stopped by SIGTERM or SIGINT ends its run ``KILLED`` (a stop, not a failure)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        logger = find_mlflow_logger(trainer)
        if isinstance(logger, MLflowLogger) and isinstance(exception, SIGTERMException | KeyboardInterrupt):
            logger.mark_killed()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ending = False

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ending = True  # ModelCheckpoint saves after this hook, before Lightning logs train metrics

    @staticmethod
    def _epoch_end_metrics(trainer: Trainer) -> dict[str, Any]:
        """The epoch's metrics and the step Lightning logs them at (``batches_that_stepped - 1``)."""
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        return {"step": batches_that_stepped(trainer) - 1, "values": values}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._unlogged = (checkpoint.get("mlflow") or {}).get("epoch_end_metrics")

    @override
    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """On resume, log the checkpointed epoch's training metrics: the checkpoint is saved before Lightning logs
        them and Lightning does not log them after resuming (the logger drops those the run already has)."""
        logger = find_mlflow_logger(trainer)
        pending, self._unlogged = self._unlogged, None
        if pending and isinstance(logger, MLflowLogger) and logger.skips_logged_steps:
            logger.log_metrics(pending["values"], step=pending["step"])

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = find_mlflow_logger(trainer)
        if isinstance(logger, MLflowLogger):
            logger.release_held()
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if logger is None or not best or not Path(best).is_file():
            return
        logger.experiment.log_artifact(logger.run_id, best, "checkpoints")
        logger.experiment.set_tag(logger.run_id, "best_checkpoint", str(Path(best).resolve()))
        score = trainer.checkpoint_callback.best_model_score
        if score is not None:
            monitor = trainer.checkpoint_callback.monitor
            logger.experiment.set_tag(logger.run_id, f"best_{monitor}", f"{float(score):.6f}")
        _logger.info("Logged best checkpoint %s to MLflow run %s", best, logger.run_id)
