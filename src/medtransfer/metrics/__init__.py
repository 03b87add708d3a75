"""Metrics for medical decisions: the pure functions in :mod:`medtransfer.metrics.functional` (selective prediction:
risk-coverage curves, AURC, coverage at a risk; reliability bins) and, in :mod:`medtransfer.metrics.defined`, the
torchmetrics collections per stage with per-label means over defined labels.

For the expected calibration error use torchmetrics' ``CalibrationError``, and ``functional.reliability_bins`` for
the matching per-bin values of a reliability diagram. Fitting thresholds, temperature and abstention lives in
:mod:`medtransfer.decisions`.
"""
