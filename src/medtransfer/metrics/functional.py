"""The metric functions under one name (``medtransfer.metrics.functional``, as tests and notebooks import them):
selective prediction in :mod:`medtransfer.metrics.selective`, reliability bins in
:mod:`medtransfer.metrics.reliability`."""

from medtransfer.metrics._checks import Score, Task
from medtransfer.metrics.reliability import reliability_bins
from medtransfer.metrics.selective import (
    augrc,
    aurc,
    confidence_scores,
    coverage_at_accuracy,
    coverage_at_risk,
    eaurc,
    predictions,
    risk_coverage_curve,
    selective_metrics_at_coverage,
    selective_risk_at_coverage,
)

__all__ = [
    "Score",
    "Task",
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
