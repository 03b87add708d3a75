"""The test report's figures: drawn from the module's last test epoch, saved as PNG and logged to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_calibration_error,
    binary_roc,
    multiclass_confusion_matrix,
)
from typing_extensions import override

from medtransfer import plots
from medtransfer.decisions.report import evaluation_table
from medtransfer.decisions.rule import DecisionRule
from medtransfer.files import write_text_atomic
from medtransfer.metrics import functional as F
from medtransfer.tracking.callbacks import log_artifacts, run_folder

__all__ = ["TestReportPlots"]

_logger = logging.getLogger(__name__)


class TestReportPlots(Callback):
    """After ``test``: ROC (binary), risk-coverage, reliability diagram and confusion matrix with an ``abstain``
    column, as PNG files in ``dirpath`` and MLflow artifacts under ``plots/``. Multi-label tasks get
    ``per_label.csv`` and the figures per label or pooled over all (case, label) decisions; binary and
    multi-label tasks also get ``evaluation.csv``, ``medtransfer evaluate``'s table at the model's thresholds.

    Args:
        dirpath: where to write the PNG files; ``None``: ``<root>/<experiment>/<run>/plots``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.paths: list[Path] = []

    @override
    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outputs = getattr(pl_module, "test_outputs", None)
        if not outputs or trainer.sanity_checking:
            return
        folder, rule = run_folder(trainer, self.dirpath, "plots"), pl_module.decision_rule
        probs, targets = outputs["probs"], outputs["targets"]
        names = getattr(trainer.datamodule, "class_names", None)
        names = [str(n) for n in names] if names else [str(i) for i in range(pl_module.hparams.num_classes)]
        tables = []
        if rule.task != "multiclass":  # evaluate's table of the test predictions, at the model's thresholds
            threshold = rule.threshold.detach().cpu().double().reshape(-1).numpy()
            table = evaluation_table(probs.double(), targets, names[-1:] if rule.task == "binary" else names,
                                     rule.task, threshold, rule.confidence_score)  # fmt: skip
            tables = [write_text_atomic(folder / "evaluation.csv", table.to_csv())]
        if outputs.get("per_label"):  # multi-label: the table per label and the figures per label or pooled
            figures = self.multilabel_figures(rule, probs, targets, outputs["per_label"])
            per_label = pd.DataFrame(outputs["per_label"]).to_csv(index=False, float_format="%.6f")
            self.paths = [write_text_atomic(folder / "per_label.csv", per_label), *tables]
            self.paths += [plots.save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()]
        else:
            calibration = getattr(pl_module, "calibration", None)
            figures = self.figures(rule, probs, targets, outputs["report"], names, calibration)
            self.paths = [plots.save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()]
            self.paths += tables
        log_artifacts(trainer, self.paths, "plots")
        _logger.info("Test report plots in %s", folder)

    @staticmethod
    def multilabel_figures(rule: DecisionRule, probs: torch.Tensor, targets: torch.Tensor,
                           per_label: dict[str, list]) -> dict:  # fmt: skip
        """Multi-label report figures: ROC per label (labels with positives and negatives), risk-coverage and
        reliability of all (case, label) decisions pooled (micro), and decision counts per label."""
        names = per_label["label"]
        curves = {}
        for j, name in enumerate(names):
            if 0 < int(targets[:, j].sum()) < len(targets):
                fpr, tpr, _ = binary_roc(probs[:, j], targets[:, j])
                curves[name] = (fpr, tpr, per_label["auroc"][j])
        mean = sum(c[2] for c in curves.values()) / len(curves) if curves else float("nan")
        figures = {"roc": plots.plot_roc_per_label(curves, mean)}
        decisions, abstain = rule.decide(probs), rule.abstains(probs)
        correct = decisions == targets
        confidence = rule.confidence(probs).flatten()
        coverage, risk, _ = F.risk_coverage_curve(confidence, correct.flatten())
        decided = ~abstain.flatten()
        band = (float(decided.float().mean()), float(1 - correct.flatten()[decided].float().mean()))
        aurc = float(F.aurc(confidence, correct.flatten()))
        figures["risk_coverage"] = plots.plot_risk_coverage(coverage, risk, aurc, marks={"abstention bands": band})
        pooled_probs, pooled_targets = probs.flatten(), targets.flatten()
        ece = float(binary_calibration_error(pooled_probs, pooled_targets, n_bins=15))
        figures["reliability"] = plots.plot_reliability(*F.reliability_bins(pooled_probs, pooled_targets), ece)
        kept, positive, truth = ~abstain, decisions.bool(), targets.bool()
        counts = torch.stack([(kept & positive & truth).sum(0), (kept & ~positive & truth).sum(0),
                              (kept & positive & ~truth).sum(0), (kept & ~positive & ~truth).sum(0),
                              abstain.sum(0)], 1)  # fmt: skip
        columns = ["true pos", "false neg", "false pos", "true neg", "abstain"]
        figures["confusion"] = plots.plot_label_counts(counts.numpy(), names, columns)
        return figures

    @staticmethod
    def figures(rule: DecisionRule, probs: torch.Tensor, targets: torch.Tensor, report: dict,
                class_names: list[str] | None = None, calibration: dict | None = None) -> dict:  # fmt: skip
        """The figures of a binary or multi-class test report by name, from the test probabilities and targets,
        ``rule`` and its :func:`~medtransfer.decisions.report.selective_report`; with the model's ``calibration``
        record the certified risk bound is drawn."""
        binary = rule.task == "binary"
        decisions = rule.decide(probs)
        correct = decisions == targets
        coverage, risk, _ = F.risk_coverage_curve(rule.confidence(probs), correct)
        control = (calibration or {}).get("risk_control")
        guarantee = None
        if control is not None:  # one binary problem: draw the certified bound on the test curve
            guarantee = (control["target_risk"], control["delta"], control["per_label"][0]["coverage"])
        band = {"abstention band": (report["coverage"], 1 - report["selective_acc"])}
        curve = plots.plot_risk_coverage(coverage, risk, report["aurc"], marks=band, guarantee=guarantee)
        figures = {"risk_coverage": curve}
        reliability_inputs = (probs, targets) if binary else (probs.max(dim=1).values, correct)
        figures["reliability"] = plots.plot_reliability(*F.reliability_bins(*reliability_inputs), report["ece"])
        if binary:
            fpr, tpr, _ = binary_roc(probs, targets)
            sensitivity = float(decisions[targets == 1].float().mean())
            specificity = float(1 - decisions[targets == 0].float().mean())
            figures["roc"] = plots.plot_roc(
                fpr, tpr, float(binary_auroc(probs, targets)), (1 - specificity, sensitivity), report["threshold"]
            )
        n = 2 if binary else probs.shape[1]
        names = class_names or [str(i) for i in range(n)]
        abstain = rule.abstains(probs)
        kept = ~abstain
        matrix = multiclass_confusion_matrix(decisions[kept].long(), targets[kept].long(), n, validate_args=False)
        referred = torch.bincount(targets[abstain], minlength=n)
        figures["confusion"] = plots.plot_confusion(matrix.numpy(), names, referred.tolist())
        return figures
