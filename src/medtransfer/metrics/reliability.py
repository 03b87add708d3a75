"""Reliability-diagram bins (per-bin confidence, accuracy, count); compute the ECE itself with torchmetrics'
``CalibrationError``, whose binning these bins match."""

from __future__ import annotations

import torch
from torch import Tensor

from medtransfer.metrics._checks import _check_pair, _check_unit_interval
from medtransfer.metrics.selective import _out_dtype

__all__ = ["reliability_bins"]


def reliability_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = 15, validate_args: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-bin mean confidence, accuracy and case count, for a reliability diagram.

    Bins split [0, 1] into ``n_bins`` equal intervals :math:`[b_j, b_{j+1})`, the last one closed. The ECE
    :math:`\sum_j \frac{n_j}{N} |\mathrm{acc}_j - \mathrm{conf}_j|` of these bins is torchmetrics'
    ``CalibrationError(norm="l1")`` (which puts confidence exactly 1.0 in a bin of its own): compute ECE there.

    Args:
        confidence: ``(N,)`` in [0, 1]: the top-class probability with ``correct`` = top class right
            (multiclass), or the positive-class probability with ``correct`` = target (binary).
        correct: 0/1, shaped like ``confidence``.
        n_bins: number of bins.

    Returns:
        ``mean_confidence`` and ``accuracy`` (NaN for empty bins) and ``count``, each ``(n_bins,)``.
    """
    if validate_args:
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"Expected argument `n_bins` to be an integer larger than 0, but got {n_bins}")
        _check_pair(confidence, correct)
        if confidence.ndim != 1:
            raise ValueError(f"Expected argument `confidence` of shape (N,), but got {tuple(confidence.shape)}")
        _check_unit_interval("confidence", confidence)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins - 1)  # as torchmetrics
    conf = confidence.to(torch.float64)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, index, conf)
    correct_sum = torch.zeros_like(count).index_add_(0, index, correct.to(torch.float64))
    dtype = _out_dtype(confidence)
    return (conf_sum / count).to(dtype), (correct_sum / count).to(dtype), count.long()
