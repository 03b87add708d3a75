"""Pure metric functions for medical decisions: selective prediction (risk-coverage curves, AURC, coverage at a
risk), per-label means over defined labels, and reliability bins.

Running metrics are torchmetrics' own (``defined.stage_metrics``: the module's collection per stage); for
the expected calibration error use torchmetrics' ``CalibrationError``, and :func:`reliability_bins` for the
matching per-bin values of a reliability diagram. Fitting thresholds, temperature and abstention lives in
:mod:`medtransfer.decisions`.
"""

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

__all__ = [
    "augrc",
    "aurc",
    "confidence_scores",
    "coverage_at_accuracy",
    "coverage_at_risk",
    "eaurc",
    "predictions",
    "reliability_bins",
    "risk_coverage_curve",
    "selective_metrics_at_coverage",
    "selective_risk_at_coverage",
]
