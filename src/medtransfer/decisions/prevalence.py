r"""Prevalence (label) shift: the class shares of an unlabelled batch, and probabilities adapted to them.

A model calibrated where a share :math:`\pi_s` of cases is sick states :math:`p_s(y|x)`; where the share is
:math:`\pi_t` and the images of each class look the same (label shift), Bayes' rule gives
:math:`p_t(y|x) \propto p_s(y|x)\,\pi_t(y)/\pi_s(y)` (:func:`adapt_probabilities`). :func:`estimate_prevalence`
finds :math:`\pi_t` without labels: ``em`` is the maximum-likelihood estimate by EM on calibrated probabilities
(Saerens et al. 2002; Alexandari et al. 2020; for two classes, binary or per finding, its maximum found directly
by Newton's method, :func:`_two_class_mle`), ``bbse`` solves :math:`C\pi_t = \bar p_t` for the calibration
split's soft confusion matrix :math:`C_{ij} = E_s[p_i(x) \mid y = j]` (Lipton et al. 2018, with soft predictions).
:func:`batch_prevalence` picks the shares ``--prevalence`` asks for (``predict``, ``evaluate``; ``test`` logs the
estimate) from a model's calibration record.
A multi-label task is one binary problem per finding. The interval is a percentile bootstrap over the batch's
cases: it does not count the error of the calibration split's own estimates.

Different images (another scanner, another modality) are not a prevalence shift: re-weighting classes does not
fix them, and :func:`shift_explanation` tells the two apart on the exchangeability check's statistics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from scipy import stats
from torch import Tensor

from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = [
    "MAX_STORED_PROBS",
    "MIN_CASES",
    "Prevalence",
    "PrevalenceMethod",
    "adapt_probabilities",
    "batch_prevalence",
    "calibration_shares",
    "estimate_prevalence",
    "given_prevalence",
    "shift_explanation",
    "summary_entry",
]

_logger = logging.getLogger(__name__)

#: ``em``: maximum likelihood by EM; ``bbse``: black-box shift estimation from the soft confusion matrix.
PrevalenceMethod = Literal["em", "bbse"]
#: The fewest cases a batch needs before its class shares are estimated (a binomial share of 50 cases has a
#: standard error up to 0.07); smaller batches keep the calibration shares.
MIN_CASES = 50
#: An estimated share below this (or above ``1 -`` it, binary and per finding) is at the boundary: the batch
#: seems to lack a class, and re-weighting by a share near 0 would silence it; no adaptation then.
MIN_SHARE = 0.01
#: At most this many calibration cases' probabilities are stored with a model (for :func:`shift_explanation`).
MAX_STORED_PROBS = 2000


@dataclass(frozen=True)
class Prevalence:
    """Class shares of a batch: ``estimated`` (binary ``[negative, positive]``, multi-class ``(C,)``, multi-label
    ``(L,)`` positive share per finding), its 95 % percentile-bootstrap ``interval`` ``(K, 2)`` over the batch's
    cases (``given``: the value itself, twice), and the ``source`` shares the model was calibrated at."""

    method: str
    estimated: Tensor
    interval: Tensor
    source: Tensor

    def to_dict(self, names: list[str]) -> dict[str, Any]:
        """``{method, estimated: {name: share}, interval: {name: [low, high]}, source: {name: share}}``."""
        return {
            "method": self.method,
            "estimated": {n: round(float(v), 4) for n, v in zip(names, self.estimated, strict=True)},
            "interval": {n: [round(float(a), 4), round(float(b), 4)] for n, (a, b) in zip(names, self.interval,
                                                                                           strict=True)},
            "source": {n: round(float(v), 4) for n, v in zip(names, self.source, strict=True)},
        }  # fmt: skip


def _columns(probs: Tensor, task: Task) -> Tensor:
    """Probabilities as ``(..., N, K)`` class columns: binary ``(N, 2)``, multi-class ``(N, C)``, multi-label
    ``(L, N, 2)`` (one binary problem per finding)."""
    probs = probs.detach().double().cpu()
    if task == "binary":
        return torch.stack([1 - probs, probs], dim=-1)
    if task == "multilabel":
        return torch.stack([1 - probs.T, probs.T], dim=-1)
    return probs


def _shares(shares: Tensor, task: Task) -> Tensor:
    """Shares as ``(..., K)`` class columns matching :func:`_columns` (multi-label ``(L,)`` -> ``(L, 2)``)."""
    shares = torch.as_tensor(shares, dtype=torch.float64).cpu()
    return torch.stack([1 - shares, shares], dim=-1) if task == "multilabel" else shares


def _em(columns: Tensor, source: Tensor, max_iter: int = 1000, tol: float = 1e-8) -> Tensor:
    """Maximum-likelihood target shares by EM (Saerens et al. 2002), batched over leading dimensions."""
    target = columns.mean(-2)
    for _ in range(max_iter):
        weighted = columns * (target / source).unsqueeze(-2)
        updated = (weighted / weighted.sum(-1, keepdim=True)).mean(-2)
        done = (updated - target).abs().max() < tol
        target = updated
        if done:
            break
    return target


def _two_class_mle(
    columns: Tensor, source: Tensor, start: Tensor | None = None, max_iter: int = 100, tol: float = 1e-12
) -> Tensor:
    r"""The maximum of :func:`_em`'s likelihood for two classes (binary, each multi-label finding), solved directly,
    batched over leading dimensions.

    With one share :math:`\pi` free, :math:`\ell(\pi) = \sum_i \log(\pi a_i + (1 - \pi) b_i)`
    (:math:`a_i = p_{i1}/\pi_{s1}`, :math:`b_i = p_{i0}/\pi_{s0}`) is concave, so its derivative falls
    monotonically: the maximum is where the derivative crosses zero, or 0 (1) when it is negative (positive) all
    along, where EM ends too. EM creeps there linearly, slowly when the classes overlap, and a batch waits for its
    slowest bootstrap replicate and finding (hundreds of passes over the data); Newton's method on the derivative,
    bisecting the bracket its sign keeps whenever a step leaves it, reaches ``tol`` in about ten passes, and in
    about five from a nearby ``start`` of the share (the batch's, for its bootstrap replicates).
    """
    a, b = columns[..., 1] / source[..., 1:], columns[..., 0] / source[..., :1]
    slope = a - b

    def derivatives(share: Tensor) -> tuple[Tensor, Tensor]:
        ratio = slope / (share.unsqueeze(-1) * a + (1 - share.unsqueeze(-1)) * b)
        return ratio.sum(-1), (ratio * ratio).sum(-1)  # l'(share) and -l''(share)

    start = columns[..., 1].mean(-1) if start is None else start.expand(columns.shape[:-2])  # kept where flat
    at_zero, at_one = derivatives(torch.zeros_like(start))[0] <= 0, derivatives(torch.ones_like(start))[0] >= 0
    flat = at_zero & at_one
    low = torch.where(flat, start, at_one.double())
    high = torch.where(flat, start, (~at_zero).double())
    share = torch.minimum(torch.maximum(start, low), high)
    for _ in range(max_iter):
        gradient, curvature = derivatives(share)
        low, high = torch.where(gradient > 0, share, low), torch.where(gradient > 0, high, share)
        updated = share + gradient / curvature.clamp(min=torch.finfo(curvature.dtype).tiny)
        updated = torch.where((updated >= low) & (updated <= high), updated, (low + high) / 2)
        done = (updated - share).abs().max() < tol
        share = updated
        if done:
            break
    return torch.stack([1 - share, share], dim=-1)


def _bbse(columns: Tensor, confusion: Tensor) -> Tensor:
    """Shares solving ``confusion @ shares = mean probabilities``, clipped to the simplex, batched."""
    mean = columns.mean(-2).unsqueeze(-1)
    shares = torch.linalg.solve(confusion.expand(*mean.shape[:-2], *confusion.shape[-2:]), mean).squeeze(-1)
    shares = shares.clamp(min=0)
    return shares / shares.sum(-1, keepdim=True).clamp(min=1e-12)


def _estimate(
    columns: Tensor, source: Tensor, method: str, confusion: Tensor | None, near: Tensor | None = None
) -> Tensor:
    """Target shares by ``method``; two classes solve EM's likelihood directly, starting from ``near``'s shares."""
    if method == "bbse":
        return _bbse(columns, confusion)
    if columns.shape[-1] == 2:
        return _two_class_mle(columns, source, None if near is None else near[..., 1])
    return _em(columns, source)


def _invalid(probs: Tensor, source: Tensor, task: Task, method: str, confusion: Tensor | None) -> str | None:
    """Why the batch or the model's record cannot give an estimate, or ``None``."""
    expected = 2 if task == "binary" else probs.shape[-1]
    if probs.ndim != (1 if task == "binary" else 2) or source.shape != (expected,):
        return f"probabilities of shape {tuple(probs.shape)} do not match the calibration shares {tuple(source.shape)}"
    if not torch.isfinite(probs).all() or not torch.isfinite(source).all():
        return "the probabilities or the calibration shares are not finite"
    if probs.min() < 0 or probs.max() > 1:
        return "the probabilities are not in [0, 1]"
    if len(probs) < MIN_CASES:
        return f"a batch of {len(probs)} case(s) is too small (at least {MIN_CASES} are needed)"
    low = source.min() if task != "multilabel" else torch.minimum(source, 1 - source).min()
    if low <= 0:
        return "a class has no calibration case (share 0), so it cannot be re-weighted"
    if method == "bbse":
        if confusion is None:
            return "bbse needs the calibration confusion matrix, which the model does not hold"
        if confusion.shape != (*_shares(source, task).shape, expected if task != "multilabel" else 2):
            return f"a confusion matrix of shape {tuple(confusion.shape)} does not match the calibration shares"
        if torch.linalg.matrix_rank(confusion).min() < confusion.shape[-1]:
            return "the calibration confusion matrix is singular"
    return None


def estimate_prevalence(
    probs: Tensor,
    source: Tensor,
    task: Task,
    method: PrevalenceMethod = "em",
    confusion: Tensor | None = None,
    n_bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> Prevalence | None:
    """The class shares of the batch ``probs`` (``(N,)`` binary, ``(N, C)``, ``(N, L)``), from calibrated
    probabilities and the ``source`` shares they were calibrated at (binary ``[negative, positive]``, multi-label
    positive shares); ``bbse`` needs the calibration split's soft ``confusion`` (:func:`calibration_shares`).

    Returns ``None`` after a one-line warning when it cannot estimate: a batch under :data:`MIN_CASES` cases,
    non-finite input, a class without calibration cases, or an estimate at the boundary (a share under
    :data:`MIN_SHARE`: the batch seems to lack a class). Multi-label: a finding at the boundary keeps its
    calibration share (no adaptation for it) and the warning names it.
    """
    if method not in ("em", "bbse"):
        raise ValueError(f"Expected argument `method` to be one of ('em', 'bbse'), but got {method!r}")
    probs, source = probs.detach().double().cpu(), torch.as_tensor(source, dtype=torch.float64).cpu()
    if confusion is not None:
        confusion = torch.as_tensor(confusion, dtype=torch.float64).cpu()
    reason = _invalid(probs, source, task, method, confusion)
    if reason is not None:
        _logger.warning("Prevalence not estimated: %s; probabilities are not adapted", reason)
        return None
    columns, shares = _columns(probs, task), _shares(source, task)
    estimated = _estimate(columns, shares, method, confusion)
    rows = torch.randint(len(probs), (n_bootstrap, len(probs)), generator=torch.Generator().manual_seed(seed))
    chunk = max(1, 2**22 // columns.numel())  # replicates per pass: about 32 MB of resampled columns
    resampled = torch.cat([
        _estimate(columns[..., part, :].movedim(-3, 0), shares, method, confusion, estimated)
        for part in rows.split(chunk)
    ])  # fmt: skip
    tail = (1 - level) / 2
    interval = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=0).movedim(0, -1)
    if task == "multilabel":
        estimated, interval = estimated[:, 1], interval[:, 1]
        boundary = (estimated < MIN_SHARE) | (estimated > 1 - MIN_SHARE)
        if boundary.any():
            _logger.warning("Prevalence at the boundary for finding(s) %s: their calibration shares are kept",
                            boundary.nonzero().flatten().tolist())  # fmt: skip
            estimated = torch.where(boundary, source, estimated)
            interval = torch.where(boundary.unsqueeze(-1), source.unsqueeze(-1).expand(-1, 2), interval)
    elif estimated.min() < MIN_SHARE:
        _logger.warning("Prevalence not estimated: the batch seems to lack class %d (estimated share %.4f); "
                        "probabilities are not adapted", int(estimated.argmin()), float(estimated.min()))  # fmt: skip
        return None
    return Prevalence(method, estimated, interval, source)


def given_prevalence(shares: list[float], source: Tensor, task: Task) -> Prevalence:
    """A known prevalence (``--prevalence 0.3`` or one share per class) as a :class:`Prevalence`: one value is the
    positive share (binary, every multi-label finding); multi-class takes one share per class, summing to 1."""
    source = torch.as_tensor(source, dtype=torch.float64)
    values = torch.tensor(shares, dtype=torch.float64)
    if task == "binary" and len(values) == 1:
        values = torch.cat([1 - values, values])
    elif task == "multilabel" and len(values) == 1:
        values = values.expand(len(source)).clone()
    if values.shape != source.shape:
        raise ValueError(f"Expected argument `prevalence` to hold 1 or {len(source)} share(s), but got {shares}")
    if not ((values > 0) & (values < 1)).all():
        raise ValueError(f"Expected argument `prevalence` to hold shares in (0, 1), but got {shares}")
    if task != "multilabel" and abs(float(values.sum()) - 1) > 1e-6:
        raise ValueError(f"Expected argument `prevalence` to sum to 1 over the classes, but got {shares}")
    return Prevalence("given", values, torch.stack([values, values], dim=-1), source)


def batch_prevalence(
    probs: Tensor,
    calibration: dict[str, Any] | None,
    task: Task,
    shares: str | list[float],
    method: PrevalenceMethod = "em",
    model: str = "the model",
) -> Prevalence | None:
    """The class shares ``--prevalence`` adapts ``probs`` to: estimated from them by ``method`` (``shares`` is
    ``"estimate"``) or the ``shares`` given, against those of the ``calibration`` record of ``model``. ``None``
    after a one-line warning when the record holds no class shares (calibrated before medtransfer recorded them)
    or no estimate is possible (:func:`estimate_prevalence`); given values that are not shares are a DataError."""
    if "prevalence" not in (calibration or {}):
        _logger.warning("Prevalence not adapted: %s holds no calibration class shares (calibrated before "
                        "medtransfer recorded them); fit or calibrate it again", model)  # fmt: skip
        return None
    source = torch.tensor(calibration["prevalence"], dtype=torch.float64)
    if shares != "estimate":
        try:
            return given_prevalence(list(shares), source, task)
        except ValueError as err:
            raise DataError(f"--prevalence {','.join(map(str, shares))}: {err}") from None
    confusion = calibration.get("confusion")
    confusion = None if confusion is None else torch.tensor(confusion, dtype=torch.float64)
    return estimate_prevalence(probs, source, task, method, confusion)


def summary_entry(
    prevalence: Prevalence | None, names: list[str], shares: str | list[float], method: PrevalenceMethod = "em"
) -> dict[str, Any]:
    """The ``prevalence`` entry of predict's summary and evaluate's JSON: ``{method, estimated, interval, source,
    adapted: true}`` by class ``names``, or ``{method, adapted: false}`` when nothing was adapted."""
    if prevalence is None:
        return {"method": method if shares == "estimate" else "given", "adapted": False}
    return {**prevalence.to_dict(names), "adapted": True}


def adapt_probabilities(probs: Tensor, source: Tensor, target: Tensor, task: Task) -> Tensor:
    """Bayes re-weighting :math:`p_t(y|x) \\propto p_s(y|x)\\,\\pi_t(y)/\\pi_s(y)`, in float64 (binary and
    multi-label as a shift of the logit, so saturated probabilities keep their order); the shape of ``probs``."""
    columns = _columns(probs, task)
    weights = (_shares(target, task) / _shares(source, task)).unsqueeze(-2)
    if task == "multiclass":
        weighted = columns * weights
        return weighted / weighted.sum(-1, keepdim=True)
    shift = (weights[..., 1] / weights[..., 0]).log()
    adapted = (torch.logit(columns[..., 1]) + shift).sigmoid()
    return adapted.T if task == "multilabel" else adapted


def calibration_shares(probs: Tensor, targets: Tensor, task: Task, seed: int = 0) -> dict[str, list]:
    """What estimation needs from the calibration split, as plain JSON: the class ``prevalence`` (binary
    ``[negative, positive]``, multi-label positive share per finding), the soft ``confusion`` matrix
    :math:`C_{ij} = E[p_i \\mid y = j]` (multi-label: one 2 x 2 matrix per finding) and the ``probs``
    themselves (at most :data:`MAX_STORED_PROBS` cases, a seeded subsample beyond; :func:`shift_explanation`)."""
    columns = _columns(probs, task)
    if task == "multiclass":
        onehot = torch.nn.functional.one_hot(targets.long().cpu(), probs.shape[-1]).double()
    else:
        positive = targets.double().cpu()
        positive = positive.T if task == "multilabel" else positive
        onehot = torch.stack([1 - positive, positive], dim=-1)
    counts = onehot.sum(-2)
    confusion = (columns.transpose(-1, -2) @ onehot) / counts.clamp(min=1).unsqueeze(-2)
    shares = counts / counts.sum(-1, keepdim=True)
    prevalence = shares[..., 1] if task == "multilabel" else shares
    rows = torch.arange(len(probs))
    if len(rows) > MAX_STORED_PROBS:
        rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:MAX_STORED_PROBS].sort()[0]
    stored = (probs.detach().double().cpu()[rows] * 1e6).round() / 1e6  # 6 decimals: plain JSON stays small
    return {"prevalence": prevalence.tolist(), "confusion": confusion.tolist(), "probs": stored.tolist()}


def _weighted_ks(values: Tensor, reference: Tensor, weights: Tensor) -> tuple[float, float]:
    """Two-sample KS distance between ``values`` and ``weights``-weighted ``reference``, and its asymptotic
    p-value with the reference's effective sample size :math:`(\\sum w)^2 / \\sum w^2`."""
    order = reference.argsort()
    reference, weights = reference[order], weights[order] / weights.sum()
    grid = torch.cat([values, reference]).sort()[0]
    mine = torch.searchsorted(values.sort()[0], grid, right=True) / len(values)
    theirs = torch.cat([torch.zeros(1, dtype=weights.dtype), weights.cumsum(0)])[
        torch.searchsorted(reference, grid, right=True)
    ]
    distance = float((mine - theirs).abs().max())
    n, m = len(values), float(1 / (weights**2).sum())
    return distance, float(stats.kstwobign.sf(distance * math.sqrt(n * m / (n + m))))


def shift_explanation(
    calibration: dict[str, Any], probs: Tensor, task: Task, level: float = 0.01
) -> tuple[bool, str] | None:
    """Whether re-weighting the classes explains why ``probs`` differ from the calibration data's, and a sentence
    saying so: under a pure prevalence shift the calibration cases weighted by
    :math:`\\sum_y p(y|x)\\,\\pi_t(y)/\\pi_s(y)` (:math:`\\pi_t` by EM) have the batch's distribution of
    probabilities (weighted KS per column, Bonferroni-adjusted). ``None`` when the model holds no calibration
    probabilities or no estimate is possible."""
    if "probs" not in calibration or "prevalence" not in calibration:
        return None
    stored = torch.tensor(calibration["probs"], dtype=torch.float64)
    source = torch.tensor(calibration["prevalence"], dtype=torch.float64)
    prevalence = estimate_prevalence(probs, source, task, n_bootstrap=1)
    if prevalence is None:
        return None
    weights = _columns(stored, task) * (_shares(prevalence.estimated, task) / _shares(source, task)).unsqueeze(-2)
    weights = weights.sum(-1)  # (N,) or, per finding, (L, N)
    batch, stored = probs.detach().double().cpu().reshape(len(probs), -1), stored.reshape(len(stored), -1)
    weights = weights.T if task == "multilabel" else weights.unsqueeze(-1).expand_as(stored)
    tests = [_weighted_ks(batch[:, j], stored[:, j], weights[:, j]) for j in range(stored.shape[1])]
    p_value = min(1.0, len(tests) * min(p for _, p in tests))
    if p_value >= level:
        return True, f"re-weighting the classes to the estimated prevalence explains it (KS p={p_value:.3g})"
    return False, (
        f"re-weighting the classes does not explain it (KS p={p_value:.3g}): the images themselves differ "
        "(another scanner, protocol or population?), which `--prevalence` does not correct"
    )
