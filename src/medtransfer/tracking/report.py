"""The test report's figures: drawn from the module's last test epoch, saved as PNG and logged to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.functional.classification import binary_auroc, binary_roc
from typing_extensions import override

from medtransfer import plots
from medtransfer.files import write_text_atomic
from medtransfer.metrics import functional as F
from medtransfer.tracking.callbacks import find_mlflow_logger

__all__ = ["TestReportPlots"]

_logger = logging.getLogger(__name__)


def _write_csv(columns: dict[str, list], path: Path) -> Path:
    """Write a column dict as CSV via a temporary file and rename (never half a file)."""
    return write_text_atomic(path, pd.DataFrame(columns).to_csv(index=False, float_format="%.6f"))


class TestReportPlots(Callback):
    """After ``test``: ROC (binary), risk-coverage, reliability diagram and confusion matrix with an
    ``abstain`` column, as PNG files (in ``dirpath``, default ``<root>/<experiment>/<run>/plots``) and as
    MLflow artifacts under ``plots/``. A multi-label task gets ``per_label.csv`` (AUROC, AURC, ECE,
    selective accuracy, threshold, band per label) there instead.

    Args:
        dirpath: where to write the PNG files; ``None`` puts them beside the run's checkpoints.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.paths: list[Path] = []

    def _folder(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        logger = find_mlflow_logger(trainer)
        if logger is not None:
            return Path(trainer.default_root_dir) / str(logger.experiment_id) / str(logger.run_id) / "plots"
        return Path(trainer.default_root_dir) / "plots"

    @override
    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outputs = getattr(pl_module, "test_outputs", None)
        if not outputs or trainer.sanity_checking:
            return
        folder = self._folder(trainer)
        if outputs.get("per_label"):  # multi-label: one row per label instead of single-task figures
            self.paths = [_write_csv(outputs["per_label"], folder / "per_label.csv")]
        else:
            names = getattr(trainer.datamodule, "class_names", None)
            figures = self.figures(pl_module, outputs["probs"], outputs["targets"], outputs["report"], names)
            self.paths = [plots.save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()]
        logger = find_mlflow_logger(trainer)
        if logger is not None:
            for path in self.paths:
                logger.experiment.log_artifact(logger.run_id, str(path), "plots")
        _logger.info("Test report plots in %s", folder)

    @staticmethod
    def figures(
        pl_module: LightningModule,
        probs: torch.Tensor,
        targets: torch.Tensor,
        report: dict,
        class_names: list[str] | None = None,
    ) -> dict:
        """The report's figures by name, from test probabilities and targets."""
        binary = pl_module.hparams.task == "binary"
        confidence = pl_module.confidence(probs)
        decisions = pl_module.decide(probs)
        correct = decisions == targets
        coverage, risk, _ = F.risk_coverage_curve(confidence, correct)
        control = (getattr(pl_module, "calibration", None) or {}).get("risk_control")
        guarantee = None
        if control is not None:  # one binary problem: draw the certified bound on the test curve
            guarantee = (control["target_risk"], control["delta"], control["per_label"][0]["coverage"])
        figures = {
            "risk_coverage": plots.plot_risk_coverage(
                coverage,
                risk,
                report["aurc"],
                marks={"abstention band": (report["coverage"], 1 - report["selective_acc"])},
                guarantee=guarantee,
            )
        }
        reliability_inputs = (probs, targets) if binary else (probs.max(dim=1).values, correct)
        figures["reliability"] = plots.plot_reliability(*F.reliability_bins(*reliability_inputs), report["ece"])
        if binary:
            fpr, tpr, _ = binary_roc(probs, targets)
            sensitivity = float(decisions[targets == 1].float().mean())
            specificity = float(1 - decisions[targets == 0].float().mean())
            figures["roc"] = plots.plot_roc(
                fpr, tpr, float(binary_auroc(probs, targets)), (1 - specificity, sensitivity), report["threshold"]
            )
        names = class_names or [str(i) for i in range(pl_module.hparams.num_classes)]
        abstain = pl_module.abstains(probs)
        n = pl_module.hparams.num_classes
        matrix = torch.zeros(n, n, dtype=torch.long)
        for truth, decision in zip(targets[~abstain].tolist(), decisions[~abstain].tolist(), strict=True):
            matrix[truth, decision] += 1
        referred = torch.bincount(targets[abstain], minlength=n)
        figures["confusion"] = plots.plot_confusion(matrix.numpy(), names, referred.tolist())
        return figures
