"""Metrics for medical decisions: pure functions in :mod:`medtransfer.metrics.functional` (risk-coverage, AURC,
reliability bins; ECE is torchmetrics' ``CalibrationError``) and the per-stage torchmetrics collections in
:mod:`medtransfer.metrics.defined`."""
