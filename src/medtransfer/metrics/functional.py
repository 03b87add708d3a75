r"""The metric maths as pure torch functions: selective prediction (risk-coverage) and reliability bins.

Accepting the cases with confidence :math:`\kappa_i \ge t` gives coverage :math:`\phi(t)`, selective risk
:math:`R(t)` (errors over accepted cases) and generalized risk :math:`G(t)` (accepted errors over all cases).
The operating points are the distinct confidence values: **tied cases are accepted or rejected together**, as
``sklearn.metrics.roc_curve`` treats tied scores.

**Areas.** AURC, E-AURC and AUGRC integrate :math:`G(\phi)` drawn straight through :math:`(0, 0)` and the operating
points (the expected curve when a tie group is ranked in random order): AUGRC (Traub et al. 2024) is the trapezoid
rule, AURC integrates :math:`G / \phi` in closed form per segment, and E-AURC (Geifman et al. 2019) subtracts the
oracle's exact area :math:`r + (1 - r)\ln(1 - r)` for error rate :math:`r`, so a perfect ranking gives exactly 0
(the per-case sum some code uses differs by :math:`O(\log N / N)`).

**Operating points at a target.** ``*_at_coverage`` use the smallest achievable coverage at or above the target;
``coverage_at_*`` the largest operating-point coverage that meets the bound, or 0.

No installed library provides these: torchmetrics has ECE (``CalibrationError``, binned as :func:`reliability_bins`)
but no risk-coverage metric; torch-uncertainty (not a dependency) breaks ties by sort order, rescales by
:math:`1/(1 - 1/N)` and has no E-AURC, multilabel or sensitivity/specificity at coverage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from medtransfer.metrics._checks import (
    SCORES,
    Score,
    _check_pair,
    _check_probs,
    _check_threshold,
    _check_unit,
    _check_unit_interval,
)
from medtransfer.task import Task

__all__ = [
    "Score",
    "augrc",
    "aurc",
    "confidence_scores",
    "coverage_at_accuracy",
    "coverage_at_risk",
    "eaurc",
    "reliability_bins",
    "risk_coverage_curve",
    "selective_metrics_at_coverage",
    "selective_risk_at_coverage",
]

_COUNT_TOL = 1e-6  # case counts are integers: absorbs rounding in products like 0.07 * 100


# ----------------------------------------------------------------------------------------- scores, labels
def confidence_scores(
    probs: Tensor, task: Task, threshold: float | Tensor = 0.5, score: Score = "max_prob", validate_args: bool = True
) -> Tensor:
    """Confidence of each decision, ``(N,)`` or ``(N, L)`` (multilabel); higher means kept rather than referred.

    ``decision_prob``: the probability stated for the decision made (``p`` where ``p >= threshold``, else ``1 - p``;
    the top class probability for multi-class), so a low threshold does not rank false positives at ``p = 0.8``
    ahead of true negatives at ``p = 0.05``; ``max_prob``: the top class probability or :math:`\\max(p, 1 - p)`;
    ``margin``: top-1 minus top-2 probability or :math:`|p - \\text{threshold}|`.

    Example:
        >>> confidence_scores(torch.tensor([0.9, 0.2, 0.5]), "binary")
        tensor([0.9000, 0.8000, 0.5000])
    """
    if validate_args:
        _check_probs(probs, task)
        if score not in SCORES:
            raise ValueError(f"Expected argument `score` to be one of {SCORES}, but got {score!r}")
        _check_threshold(threshold, probs)
    if task == "multiclass":
        if score != "margin":
            return probs.max(dim=1).values
        top2 = probs.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    if score == "max_prob":
        return torch.maximum(probs, 1 - probs)
    threshold = torch.as_tensor(threshold, dtype=probs.dtype, device=probs.device)
    if score == "decision_prob":
        return torch.where(probs >= threshold, probs, 1 - probs)
    return (probs - threshold).abs()


# ----------------------------------------------------------------------------------------- operating points
def _operating_points(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One row per distinct confidence, highest first: threshold, accepted count and error count (float64)."""
    order = torch.argsort(confidence, descending=True, stable=True)
    sorted_conf = confidence[order]
    errors = (1 - correct[order].to(torch.float64)).cumsum(0)
    group_end = torch.ones_like(sorted_conf, dtype=torch.bool)
    group_end[:-1] = sorted_conf[1:] != sorted_conf[:-1]
    ends = group_end.nonzero().squeeze(1)
    return sorted_conf[ends], (ends + 1).to(torch.float64), errors[ends]


def _per_label(fn: Callable[..., Tensor], confidence: Tensor, *columns: Tensor) -> Tensor:
    """``fn`` on ``(N,)`` inputs, or stacked over the labels of ``(N, L)`` inputs."""
    if confidence.ndim == 1:
        return fn(confidence, *columns)
    return torch.stack([fn(confidence[:, j], *(c[:, j] for c in columns)) for j in range(confidence.shape[1])])


def _out_dtype(confidence: Tensor) -> torch.dtype:
    return confidence.dtype if confidence.is_floating_point() else torch.get_default_dtype()


def risk_coverage_curve(
    confidence: Tensor, correct: Tensor, validate_args: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Coverage, selective risk and threshold at each distinct ``(N,)`` confidence, by increasing coverage.

    ``correct`` is 1 where the prediction is right; there is no point at coverage 0, where the risk is undefined.

    Example:
        >>> risk_coverage_curve(torch.tensor([0.9, 0.8, 0.8, 0.6]), torch.tensor([1, 1, 0, 0]))
        (tensor([0.2500, 0.7500, 1.0000]), tensor([0.0000, 0.3333, 0.5000]), tensor([0.9000, 0.8000, 0.6000]))
    """
    if validate_args:
        _check_pair(confidence, correct)
        if confidence.ndim != 1:
            raise ValueError(f"Expected argument `confidence` of shape (N,), but got {tuple(confidence.shape)}")
    thresholds, accepted, errors = _operating_points(confidence, correct)
    dtype = _out_dtype(confidence)
    return (accepted / confidence.numel()).to(dtype), (errors / accepted).to(dtype), thresholds


def _areas(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AURC, AUGRC and error rate of one ``(N,)`` problem, in float64 (see the module docstring)."""
    _, accepted, errors = _operating_points(confidence, correct)
    zero = accepted.new_zeros(1)
    n = float(confidence.numel())
    a, b = torch.cat([zero, accepted[:-1]]), accepted  # segment ends, in accepted cases
    ea, eb = torch.cat([zero, errors[:-1]]), errors
    augrc_ = ((b - a) * (ea + eb)).sum() / (2 * n * n)
    # On a segment G(phi) = (ea + s (n phi - a)) / n, s = (eb - ea) / (b - a): the integral of G / phi is
    # (eb - ea) / n + (ea b - eb a) / ((b - a) n) * ln(b / a); the log term vanishes on the first segment (a = 0).
    log_ratio = torch.where(a > 0, torch.log1p((b - a) / a.clamp_min(1)), torch.zeros_like(a))
    aurc_ = ((eb - ea) + (ea * b - eb * a) / (b - a) * log_ratio).sum() / n
    return aurc_, augrc_, errors[-1] / n


def aurc(confidence: Tensor, correct: Tensor, validate_args: bool = True) -> Tensor:
    r"""Area under the risk-coverage curve, :math:`\int_0^1 G(\phi)/\phi \, d\phi`, in [0, 1] (lower is better).

    ``(N,)`` inputs give a scalar, ``(N, L)`` one result per label; a constant confidence gives the error rate.

    Example:
        >>> aurc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 1, 0, 0]))  # oracle: 0.5 + 0.5 ln 0.5
        tensor(0.1534)
    """
    if validate_args:
        _check_pair(confidence, correct)
    return _per_label(lambda c, k: _areas(c, k)[0], confidence, correct).to(_out_dtype(confidence))


def eaurc(confidence: Tensor, correct: Tensor, validate_args: bool = True) -> Tensor:
    r"""Excess AURC over an oracle ranking with the same error rate :math:`r`: AURC minus
    :math:`r + (1 - r) \ln(1 - r)`, so a perfect ranking gives 0 (clamped at 0 against rounding).

    Example:
        >>> eaurc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 1, 0]))
        tensor(0.4774)
    """
    if validate_args:
        _check_pair(confidence, correct)

    def one(c: Tensor, k: Tensor) -> Tensor:
        area, _, r = _areas(c, k)
        return (area - r - torch.special.xlogy(1 - r, 1 - r)).clamp_min(0)

    return _per_label(one, confidence, correct).to(_out_dtype(confidence))


def augrc(confidence: Tensor, correct: Tensor, validate_args: bool = True) -> Tensor:
    r"""Area under the generalized risk-coverage curve, in [0, 0.5] (lower is better); it equals
    :math:`(1 - \mathrm{AUROC}) \, r(1 - r) + r^2/2`.

    Example:
        >>> augrc(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
        tensor(0.1875)
    """
    if validate_args:
        _check_pair(confidence, correct)
    return _per_label(lambda c, k: _areas(c, k)[1], confidence, correct).to(_out_dtype(confidence))


def _at_coverage(confidence: Tensor, coverage: float) -> Tensor:
    """Acceptance mask of the smallest operating point whose coverage is at least ``coverage``."""
    thresholds, accepted, _ = _operating_points(confidence, torch.ones_like(confidence))
    index = int(torch.nonzero(accepted >= coverage * confidence.numel() - _COUNT_TOL)[0])
    return confidence >= thresholds[index]


def selective_risk_at_coverage(
    confidence: Tensor, correct: Tensor, coverage: float, validate_args: bool = True
) -> Tensor:
    """Error rate among the accepted cases at the smallest achievable coverage ``>= coverage`` (tie groups whole).

    Example:
        >>> selective_risk_at_coverage(torch.tensor([0.9, 0.8, 0.8, 0.6]), torch.tensor([1, 1, 0, 0]), 0.5)
        tensor(0.3333)
    """
    if validate_args:
        _check_pair(confidence, correct)
        _check_unit("coverage", coverage, low_open=True)

    def one(c: Tensor, k: Tensor) -> Tensor:
        keep = _at_coverage(c, coverage)
        return 1 - k[keep].to(torch.float64).mean()

    return _per_label(one, confidence, correct).to(_out_dtype(confidence))


def selective_metrics_at_coverage(
    confidence: Tensor, preds: Tensor, target: Tensor, coverage: float, validate_args: bool = True
) -> dict[str, Tensor]:
    """Achieved ``coverage``, ``risk``, ``accuracy``, ``sensitivity`` and ``specificity`` of 0/1 ``preds`` at the
    smallest achievable coverage ``>= coverage``; NaN where no positive (negative) case is accepted.

    Example:
        >>> out = selective_metrics_at_coverage(
        ...     torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]), torch.tensor([1, 0, 0, 0]), 0.75
        ... )
        >>> {k: round(v.item(), 4) for k, v in out.items()}
        {'coverage': 0.75, 'risk': 0.3333, 'accuracy': 0.6667, 'sensitivity': 1.0, 'specificity': 0.5}
    """
    if validate_args:
        _check_pair(confidence, preds, "preds")
        _check_pair(confidence, target, "target")
        _check_unit("coverage", coverage, low_open=True)
    keys = ("coverage", "risk", "accuracy", "sensitivity", "specificity")

    def one(c: Tensor, p: Tensor, y: Tensor) -> Tensor:
        keep = _at_coverage(c, coverage)
        p, y = p[keep].bool(), y[keep].bool()
        accuracy = (p == y).to(torch.float64).mean()
        sensitivity = (p & y).sum() / y.sum().to(torch.float64)  # NaN (0/0) when no positive is kept
        specificity = (~p & ~y).sum() / (~y).sum().to(torch.float64)
        return torch.stack([keep.to(torch.float64).mean(), 1 - accuracy, accuracy, sensitivity, specificity])

    values = _per_label(one, confidence, preds, target).to(_out_dtype(confidence))
    return dict(zip(keys, values.unbind(-1), strict=True))


def _largest_coverage(confidence: Tensor, correct: Tensor, max_errors_per_case: float) -> Tensor:
    _, accepted, errors = _operating_points(confidence, correct)
    ok = errors <= max_errors_per_case * accepted + _COUNT_TOL
    if not ok.any():
        return accepted.new_zeros(())
    return accepted[ok].max() / confidence.numel()


def coverage_at_risk(confidence: Tensor, correct: Tensor, max_risk: float, validate_args: bool = True) -> Tensor:
    """Largest operating-point coverage whose selective risk is ``<= max_risk``; 0 if there is none.

    Example:
        >>> coverage_at_risk(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 1]), 0.25)
        tensor(1.)
    """
    if validate_args:
        _check_pair(confidence, correct)
        _check_unit("max_risk", max_risk)
    return _per_label(lambda c, k: _largest_coverage(c, k, max_risk), confidence, correct).to(_out_dtype(confidence))


def coverage_at_accuracy(
    confidence: Tensor, correct: Tensor, min_accuracy: float, validate_args: bool = True
) -> Tensor:
    """Largest operating-point coverage whose selective accuracy is ``>= min_accuracy``; 0 if there is none.

    Example:
        >>> coverage_at_accuracy(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 1]), 0.9)
        tensor(0.2500)
    """
    if validate_args:
        _check_unit("min_accuracy", min_accuracy)
    return coverage_at_risk(confidence, correct, 1.0 - min_accuracy, validate_args)


# ----------------------------------------------------------------------------------------- reliability
def reliability_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = 15, validate_args: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean confidence, accuracy (NaN when empty) and case count over ``n_bins`` equal bins of [0, 1],
    for a reliability diagram; the same bins as torchmetrics' ``CalibrationError``, which computes the ECE."""
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
