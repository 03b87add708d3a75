"""Metrics for medical decisions: selective prediction (risk-coverage) as torchmetrics metrics and pure functions,
thresholds fitted on validation data by a named policy, and temperature scaling.

For the expected calibration error use torchmetrics' ``CalibrationError``; :func:`reliability_bins` gives the
matching per-bin values for a reliability diagram.
"""

from medtransfer.metrics.calibration import fit_temperature
from medtransfer.metrics.functional import (
    augrc,
    aurc,
    confidence_scores,
    coverage_at_accuracy,
    coverage_at_risk,
    eaurc,
    predictions,
    reliability_bins,
    risk_coverage_curve,
    selective_metrics_at_coverage,
    selective_risk_at_coverage,
)
from medtransfer.metrics.selective import (
    AUGRC,
    AURC,
    EAURC,
    CoverageAtAccuracy,
    CoverageAtRisk,
    RiskCoverageCurve,
    SelectiveAccuracy,
    SelectiveMetricsAtCoverage,
)
from medtransfer.metrics.thresholds import ThresholdPolicy, fit_threshold, fit_thresholds

__all__ = [
    "AUGRC",
    "AURC",
    "EAURC",
    "CoverageAtAccuracy",
    "CoverageAtRisk",
    "RiskCoverageCurve",
    "SelectiveAccuracy",
    "SelectiveMetricsAtCoverage",
    "ThresholdPolicy",
    "augrc",
    "aurc",
    "confidence_scores",
    "coverage_at_accuracy",
    "coverage_at_risk",
    "eaurc",
    "fit_temperature",
    "fit_threshold",
    "fit_thresholds",
    "predictions",
    "reliability_bins",
    "risk_coverage_curve",
    "selective_metrics_at_coverage",
    "selective_risk_at_coverage",
]
