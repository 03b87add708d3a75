"""Log the best model of a fit as an MLflow model, and register it, so ``models:/<name>/<version>`` works.

The ``ProbabilityModel`` is exported in ``mlflow.pytorch``'s ``pt2`` format (no pickle: loading runs no stored
code); the decision rule, class names and input settings go in its metadata, for ``medtransfer predict``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

import medtransfer
from medtransfer.checkpoints import load_checkpoint
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.inference import ProbabilityModel, example_input, input_settings
from medtransfer.tracking.callbacks import find_mlflow_logger
from medtransfer.upstream import mlflow_logger_settings

__all__ = ["LogModelToMLflow", "model_metadata", "tracking_at"]

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def tracking_at(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` for a while; also restores ``$MLFLOW_TRACKING_URI``, which
    ``mlflow.set_tracking_uri`` sets and later fits in the process would inherit."""
    previous_uri, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def model_metadata(classifier: ClassifierModule, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``predict`` needs beside the network: task, class names, input settings and the decision rule."""
    names = checkpoint.get("class_names") or [str(i) for i in range(classifier.hparams.num_classes)]
    return {
        "medtransfer_version": getattr(medtransfer, "__version__", "unknown"),
        "backbone": classifier.hparams.backbone,
        "task": classifier.hparams.task,
        "class_names": [str(n) for n in names],
        "input": input_settings(classifier, checkpoint).to_dict(),
        "decision": classifier.decision_rule.to_dict(),
        "calibration": classifier.calibration,  # the guarantee and the scores for the exchangeability check
    }


class LogModelToMLflow(Callback):
    """At the end of ``fit``, log the best checkpoint's model to the run as ``model`` and register it.

    Once per run and best checkpoint (tag ``model_checkpoint``, set last): a resumed fit exports again only if
    it found a better checkpoint. A ``PENDING`` model left by a killed export is deleted and exported again.

    Args:
        enabled: log the model at all (exporting takes a few seconds).
        registered_model_name: name in the MLflow model registry; ``None``: ``<backbone>-<dataset>``; ``""``: none.
    """

    def __init__(self, enabled: bool = True, registered_model_name: str | None = None) -> None:
        self.enabled, self.registered_model_name = enabled, registered_model_name

    def _registry_name(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        if self.registered_model_name is not None:
            return self.registered_model_name or None
        dataset = getattr(trainer.datamodule, "name", None) or "data"
        return f"{pl_module.hparams.backbone}-{dataset}"

    @staticmethod
    def _remove_unfinished_exports(client: Any, experiment_id: str, run_id: str) -> list[str]:
        """Delete the run's logged models still ``PENDING`` (their export was killed); their ids."""
        from mlflow.entities import LoggedModelStatus

        pending = [
            model.model_id
            for model in client.search_logged_models([experiment_id])
            if model.source_run_id == run_id and model.status == LoggedModelStatus.PENDING
        ]
        for model_id in pending:
            client.delete_logged_model(model_id)
        if pending:
            _logger.info("Deleted %d unfinished model export(s) of run %s", len(pending), run_id)
        return pending

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = find_mlflow_logger(trainer)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not self.enabled or logger is None or trainer.interrupted or not best or not Path(best).is_file():
            return
        client, source = logger.experiment, Path(best).name
        self._remove_unfinished_exports(client, logger.experiment_id, logger.run_id)
        if client.get_run(logger.run_id).data.tags.get("model_checkpoint") == source:
            _logger.info("Run %s already logged and registered the model of %s: not again", logger.run_id, source)
            return
        checkpoint = load_checkpoint(best)
        classifier = ClassifierModule.load_from_checkpoint(
            best, pretrained="none", map_location="cpu", weights_only=True
        )
        network = ProbabilityModel(classifier).eval()
        metadata = model_metadata(classifier, checkpoint)
        name = self._registry_name(trainer, pl_module)
        example = example_input(input_settings(classifier, checkpoint)).numpy()
        # mlflow.pytorch logs into the fluent API's active run: make it the logger's run for this call.
        with (
            torch.no_grad(),
            tracking_at(mlflow_logger_settings(logger)[0]),
            mlflow.start_run(run_id=logger.run_id, nested=True),
        ):
            info = mlflow.pytorch.log_model(
                network,
                name="model",
                input_example=example,
                metadata=metadata,
                registered_model_name=name,
                serialization_format="pt2",
            )
        version = getattr(info, "registered_model_version", None)
        logger.experiment.set_tag(logger.run_id, "model_uri", f"runs:/{logger.run_id}/model")
        if name and version is not None:
            logger.experiment.set_tag(logger.run_id, "registered_model", f"models:/{name}/{version}")
        logger.experiment.set_tag(logger.run_id, "model_checkpoint", source)  # last: set once all above is done
        _logger.info("Logged the best model of run %s to MLflow%s", logger.run_id, f" as {name}" if name else "")
