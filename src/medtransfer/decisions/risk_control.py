r"""Abstention with a stated guarantee, conformal prediction sets, and a check that the guarantee applies.

**Risk control (binary; multi-label per label).** Given ``n`` accepted calibration cases with ``e`` errors at a
cut-off, the exact binomial tail :math:`P(\mathrm{Bin}(n, \alpha) \le e)` is a valid p-value for "selective risk
> alpha". Learn-Then-Test (Angelopoulos et al. 2021) with fixed-sequence testing walks a grid of cut-offs fixed in
advance, most confident first, and keeps the last one before the first p-value above ``delta``: *at most*
``target_risk`` *errors among the decided cases, with probability at least* ``1 - delta``. When nothing passes,
every case is referred (:data:`REFER_ALL`).

Small data: a cut-off can pass only if it decides on ``n >= log(delta) / log(1 - target_risk)`` cases
(:func:`min_testable`: 45 for 5 % at delta 0.1), so the sequence starts at the first such cut-off (a data-dependent
start; ``bench/risk_control.py`` measures that the violation rate stays at or below ``delta``).

This is MAPIE's ``BinaryClassificationController`` (precision of "correct", fixed-sequence FWER control, exact
binomial p-value) as a few vectorised lines; ``tests/decisions/test_risk_control.py`` checks both pick the same
cut-off. MAPIE itself needs a ``predict_function`` per call and cannot skip cut-offs that accept nothing.

**Under a change of prevalence (label shift).** Where the class shares differ from the calibration data's but
each class's images do not (:math:`p(x \mid y)` fixed), :func:`control_shifted_risk` certifies the selective risk
of the *target* population. Each calibration case of class ``k`` counts with weight
:math:`w_k \propto \pi_k / \hat\pi_{\mathrm{cal},k}` (the largest weight one case): the weighted accepted cases
and errors are the expected counts of the calibration subsample that keeps a case with probability
:math:`w_k`, a sample of the target population, and enter the same binomial tail (a regularised incomplete beta
function, which takes fractional counts). Equal weights give :func:`control_selective_risk` exactly. The
estimation error of the shares is accounted for by testing every candidate share vector
(:func:`prevalence_vertices`, the corners of the estimate's interval) and keeping the largest p-value: the
selective risk is linear-fractional in the shares, so where it exceeds the target at a share in the interval it
does at a corner. The guarantee then holds for every prevalence in the interval; with a ``1 - gamma`` interval, at least
``1 - delta - gamma`` overall. Prediction sets re-weighted the same way (Podkopaev & Ramdas 2021,
:func:`fit_shifted_aps_quantiles`) take one quantile per candidate class, the largest over the corners.

**Prediction sets (multi-class).** APS (Romano et al. 2020) with MAPIE's conformity score; sets are rebuilt from the
stored quantile and checked against MAPIE's ``SplitConformalClassifier`` in the tests.

**Exchangeability.** Both guarantees hold for data exchangeable with the calibration data:
:func:`check_exchangeability` runs a two-sample KS test on confidence and Fisher's exact test on each predicted
class's (label's) share, Bonferroni-combined, against the calibration scores stored in the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

__all__ = [
    "REFER_ALL",
    "ExchangeabilityCheck",
    "RiskControl",
    "aps_sets",
    "calibration_summary",
    "check_exchangeability",
    "conformal_quantile",
    "control_selective_risk",
    "control_shifted_risk",
    "default_grid",
    "fit_aps_quantile",
    "fit_shifted_aps_quantiles",
    "guarantee_verdict",
    "min_testable",
    "prevalence_vertices",
]

_logger = logging.getLogger(__name__)

#: A cut-off above every confidence score (they lie in [0, 1]): every case is referred.
REFER_ALL = 2.0
#: At most this many calibration scores per label are stored with a model (a seeded subsample beyond).
MAX_STORED_SCORES = 2000


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"Expected argument `{name}` to be in (0, 1), but got {value}")


def default_grid(resolution: int = 1000) -> np.ndarray:
    """Cut-offs fixed before seeing data: ``resolution + 1`` values from 1 down to 0 (tested in this order)."""
    return np.linspace(1.0, 0.0, resolution + 1)


@dataclass(frozen=True)
class RiskControl:
    """The certified cut-off of one binary problem (or label): decide when confidence ``>= cutoff``
    (:data:`REFER_ALL` when not ``certified``); ``coverage`` and ``risk`` on the ``n`` calibration cases, and
    ``risk_bound``, the one-sided ``1 - delta`` Clopper-Pearson upper bound on the selective risk there."""

    cutoff: float
    certified: bool
    coverage: float
    risk: float
    risk_bound: float
    n: int


def _counts(confidence: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accepted cases and errors among them at each cut-off of ``grid`` (accept: confidence >= cut-off)."""
    order = np.argsort(confidence, kind="stable")
    sorted_conf, wrong = confidence[order], (~correct[order]).astype(np.int64)
    errors_above = np.concatenate([np.cumsum(wrong[::-1])[::-1], [0]])  # errors among rows i.. of the sorted order
    first = np.searchsorted(sorted_conf, grid, side="left")
    return len(confidence) - first, errors_above[first]


def control_selective_risk(
    confidence: Any, correct: Any, target_risk: float, delta: float, grid: np.ndarray | None = None
) -> RiskControl:
    """The lowest cut-off (largest coverage) whose selective risk is certified ``<= target_risk`` w.p. ``1 - delta``,
    testing ``grid`` (most confident first; default :func:`default_grid`) on ``(N,)`` confidence and correctness."""
    _check_open_unit("target_risk", target_risk)
    _check_open_unit("delta", delta)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if confidence.shape != correct.shape:
        raise ValueError(
            f"Expected `confidence` and `correct` of one shape, but got {confidence.shape}, {correct.shape}"
        )
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    n = len(confidence)
    if n == 0:
        return RiskControl(REFER_ALL, False, 0.0, 0.0, 1.0, 0)
    accepted, errors = _counts(confidence, correct, grid)
    p_values = stats.binom.cdf(errors, accepted, target_risk)
    tested = np.flatnonzero(accepted >= min_testable(target_risk, delta))
    failed = tested[p_values[tested] > delta]
    stop = failed[0] if len(failed) else len(grid)
    passed = tested[tested < stop]
    if len(passed) == 0:
        return RiskControl(REFER_ALL, False, 0.0, 0.0, 1.0, n)
    k = int(passed[-1])
    e, m = int(errors[k]), int(accepted[k])
    bound = 1.0 if e >= m else float(stats.beta.ppf(1 - delta, e + 1, m - e))
    return RiskControl(float(grid[k]), True, m / n, e / m, bound, n)


def min_testable(target_risk: float, delta: float) -> int:
    """Fewest decided cases that can certify ``target_risk`` at ``delta`` (with no error among them)."""
    _check_open_unit("target_risk", target_risk)
    _check_open_unit("delta", delta)
    return math.ceil(math.log(delta) / math.log1p(-target_risk) - 1e-9)


# ------------------------------------------------------------------------------------------ label shift
def prevalence_vertices(estimated: Any, interval: Any | None = None) -> np.ndarray:
    """``(M, K)`` candidate class shares: ``estimated`` first, then the corners of ``interval`` (``(K, 2)``
    low/high per class) on the simplex. A binary ``(1,)`` share is read as ``[1 - p, p]``."""
    estimated = np.asarray(estimated, dtype=np.float64).reshape(-1)
    if estimated.shape == (1,):
        estimated = np.array([1 - estimated[0], estimated[0]])
        if interval is not None:
            low, high = np.asarray(interval, dtype=np.float64).reshape(2)
            interval = [[1 - high, 1 - low], [low, high]]
    if interval is None:
        return estimated[None]
    bounds = np.clip(np.asarray(interval, dtype=np.float64).reshape(len(estimated), 2), 0.0, 1.0)
    k = len(estimated)
    corners = []
    for free in range(k):  # K - 1 shares at a bound, the last one fills the simplex
        others = [j for j in range(k) if j != free]
        for choice in np.ndindex(*(2,) * (k - 1)):
            shares = np.empty(k)
            shares[others] = bounds[others, choice]
            shares[free] = 1.0 - shares[others].sum()
            if bounds[free, 0] - 1e-9 <= shares[free] <= bounds[free, 1] + 1e-9:
                corners.append(shares)
    corners = np.unique(np.clip(np.reshape(corners, (-1, k)), 0.0, 1.0).round(12), axis=0)
    return np.concatenate([estimated[None], corners])


def _shares(prevalence: Any, num_classes: int) -> np.ndarray:
    shares = np.asarray(prevalence, dtype=np.float64)
    shares = shares[None] if shares.ndim == 1 else shares
    if shares.ndim != 2 or shares.shape[1] != num_classes or (shares < 0).any():
        raise ValueError(f"Expected `prevalence` of shape (K,) or (M, K) with K={num_classes}, but got {shares.shape}")
    return shares / shares.sum(axis=1, keepdims=True)


def control_shifted_risk(
    confidence: Any,
    correct: Any,
    labels: Any,
    prevalence: Any,
    target_risk: float,
    delta: float,
    grid: np.ndarray | None = None,
) -> RiskControl:
    """:func:`control_selective_risk` for a population with other class shares: ``prevalence`` is ``(K,)`` or
    ``(M, K)`` candidate target shares (:func:`prevalence_vertices`); a cut-off passes when the bound holds for
    every candidate. ``labels`` are the ``(N,)`` calibration classes in ``0..K-1``. ``coverage`` and ``risk`` are
    re-weighted to the first candidate; ``risk_bound`` is the largest bound at the certified cut-off."""
    _check_open_unit("target_risk", target_risk)
    _check_open_unit("delta", delta)
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not confidence.shape == correct.shape == labels.shape:
        raise ValueError(
            f"Expected `confidence`, `correct` and `labels` of one shape, but got "
            f"{confidence.shape}, {correct.shape}, {labels.shape}"
        )
    shares = _shares(prevalence, np.asarray(prevalence).shape[-1])
    if len(labels) and (labels.min() < 0 or labels.max() >= shares.shape[1]):
        raise ValueError(f"Expected `labels` in 0..{shares.shape[1] - 1}, but got {labels.min()}..{labels.max()}")
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    sizes = np.bincount(labels, minlength=shares.shape[1]).astype(np.float64)
    accepted, errors = np.zeros((2, shares.shape[1], len(grid)))
    for k in range(shares.shape[1]):
        rows = labels == k
        accepted[k], errors[k] = _counts(confidence[rows], correct[rows], grid)
    weights = np.divide(shares, sizes, out=np.zeros_like(shares), where=sizes > 0)
    weights /= weights.max(axis=1, keepdims=True)  # the largest class weight is one case
    kept, wrong = weights @ accepted, weights @ errors  # (M, grid): weighted accepted cases and errors
    with np.errstate(divide="ignore", invalid="ignore"):
        p_values = np.where(kept > wrong, special.betainc(kept - wrong, wrong + 1, 1 - target_risk), 1.0).max(0)
    tested = np.flatnonzero((kept >= math.log(delta) / math.log1p(-target_risk) - 1e-9).all(axis=0))
    failed = tested[p_values[tested] > delta]
    stop = failed[0] if len(failed) else len(grid)
    passed = tested[tested < stop]
    if len(passed) == 0:
        return RiskControl(REFER_ALL, False, 0.0, 0.0, 1.0, len(labels))
    j = int(passed[-1])
    e, m = wrong[:, j], kept[:, j]
    bound = float(np.where(e >= m, 1.0, stats.beta.ppf(1 - delta, e + 1, np.maximum(m - e, 1e-12))).max())
    coverage = float(shares[0] @ np.divide(accepted[:, j], sizes, out=np.zeros_like(sizes), where=sizes > 0))
    return RiskControl(float(grid[j]), True, coverage, float(e[0] / m[0]), bound, len(labels))


def fit_shifted_aps_quantiles(probs: Any, labels: Any, alpha: float, prevalence: Any, seed: int = 0) -> np.ndarray:
    """Per candidate class, the APS threshold for coverage ``1 - alpha`` in a population with class shares
    ``prevalence`` (``(K,)`` or ``(M, K)`` candidates, the largest threshold over them): the weighted conformal
    quantile of Podkopaev & Ramdas (2021), calibration case ``i`` weighted by ``w[y_i]`` and the new case by
    ``w[y]`` for the class ``y`` tested, ``w = target / calibration share``; ``inf`` where too few cases weigh."""
    _check_open_unit("alpha", alpha)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    shares = _shares(prevalence, num_classes)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    scores = _aps_scores(probs, labels, seed)
    order = np.argsort(scores, kind="stable")
    quantiles = np.full(num_classes, -np.inf)
    for target in shares:
        weights = np.divide(target * len(labels), counts, out=np.zeros(num_classes), where=counts > 0)
        cumulative = np.cumsum(weights[labels[order]])
        for y in range(num_classes):
            need = (1 - alpha) * (cumulative[-1] + weights[y]) if len(labels) else math.inf
            k = int(np.searchsorted(cumulative, need - 1e-12, side="left"))
            quantiles[y] = max(quantiles[y], scores[order[k]] if k < len(labels) and weights[y] > 0 else math.inf)
    return quantiles


# ------------------------------------------------------------------------------------------ prediction sets
def fit_aps_quantile(probs: Any, labels: Any, alpha: float, seed: int = 0) -> float:
    """The APS threshold for coverage ``1 - alpha``: the conformal quantile of MAPIE's randomised
    ``APSConformityScore`` on the calibration cases; ``inf`` (every class) when there are too few."""
    _check_open_unit("alpha", alpha)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if math.ceil((len(labels) + 1) * (1 - alpha) - 1e-9) > len(labels):
        return math.inf
    return conformal_quantile(_aps_scores(probs, labels, seed), alpha)


def _aps_scores(probs: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """MAPIE's randomised ``APSConformityScore`` of each calibration case, called directly: MAPIE's classifier
    refuses calibration labels of fewer than three classes (a two-class model gets a third, empty column, which
    changes no score)."""
    from mapie.conformity_scores import APSConformityScore

    probs = np.pad(probs, ((0, 0), (0, max(0, 3 - probs.shape[1]))))  # MAPIE's one-hot needs three columns
    score = APSConformityScore()
    score.set_external_attributes(classes=np.arange(probs.shape[1]), random_state=seed)
    return np.asarray(score.get_conformity_scores(labels, probs, y_enc=labels), dtype=np.float64).reshape(-1)


def conformal_quantile(scores: Any, alpha: float) -> float:
    r"""The :math:`\lceil (n + 1)(1 - \alpha) \rceil`-th smallest score; ``inf`` (every class) when that exceeds n."""
    _check_open_unit("alpha", alpha)
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    k = math.ceil((len(scores) + 1) * (1 - alpha) - 1e-9)
    return math.inf if k > len(scores) else float(scores[k - 1])


def aps_sets(probs: Any, quantile: Any) -> np.ndarray:
    """``(N, C)`` membership: classes ranked down to (and including) the first whose cumulative probability
    reaches ``quantile`` (MAPIE's ``include_last_label=True``; ``(C,)``: one per class, a class joins while the
    probability ranked before it is below its own); the most probable class is always in the set."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked
    quantile = np.asarray(quantile, dtype=np.float64)
    keep_ranked = before < (quantile[order] if quantile.ndim else quantile) - 1e-12
    keep_ranked[:, 0] = True
    sets = np.zeros_like(keep_ranked)
    np.put_along_axis(sets, order, keep_ranked, axis=1)
    return sets


# ------------------------------------------------------------------------------------------ exchangeability
@dataclass(frozen=True)
class ExchangeabilityCheck:
    """Whether the data at hand look like the calibration data: the largest KS distance of confidence and its
    p-value, the positive-decision rates now and at calibration and Fisher's p-value on them (both
    Bonferroni-adjusted over columns); ``shifted`` when either p-value is below ``level``."""

    ks_statistic: float
    ks_p_value: float
    positive_rate: list[float]
    calibration_positive_rate: list[float]
    rate_p_value: float
    shifted: bool
    level: float

    def message(self) -> str:
        pairs = zip(self.positive_rate, self.calibration_positive_rate, strict=True)
        rates = ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in pairs)
        verdict = "DIFFER from" if self.shifted else "are consistent with"
        return (
            f"these cases' scores {verdict} the calibration data's: confidence KS {self.ks_statistic:.3f} "
            f"(p={self.ks_p_value:.3g}); predicted-positive rate here vs calibration {rates} "
            f"(p={self.rate_p_value:.3g})"
        )


def _columns(values: Any, dtype: type) -> np.ndarray:
    """``(N,)`` or ``(N, K)`` values as ``(N, K)``."""
    values = np.asarray(values, dtype=dtype)
    return values[:, None] if values.ndim == 1 else values


def calibration_summary(confidence: Any, positives: Any, seed: int = 0) -> dict[str, Any]:
    """What :func:`check_exchangeability` needs later, as plain JSON: the number of cases and, per column of
    ``confidence`` and 0/1 ``positives`` (binary decision, label, or one-hot class), the confidence scores (at most
    :data:`MAX_STORED_SCORES`, a seeded subsample beyond) and the count of positive decisions."""
    confidence, positives = _columns(confidence, np.float64), _columns(positives, np.int64)
    rows = np.arange(len(confidence))
    if len(rows) > MAX_STORED_SCORES:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_STORED_SCORES, replace=False))
    return {
        "n": len(confidence),
        "confidence": [np.round(confidence[rows, j], 6).tolist() for j in range(confidence.shape[1])],
        "positives": positives.sum(axis=0).tolist(),
    }


def check_exchangeability(
    summary: dict[str, Any], confidence: Any, positives: Any, level: float = 0.01
) -> ExchangeabilityCheck:
    """Compare the data at hand with a :func:`calibration_summary`; ``shifted`` when a p-value is below ``level``."""
    _check_open_unit("level", level)
    confidence, positives = _columns(confidence, np.float64), _columns(positives, np.int64)
    stored = summary["confidence"]
    if len(stored) != confidence.shape[1] or len(summary["positives"]) != positives.shape[1]:
        raise ValueError(f"Expected {len(stored)} confidence column(s) as calibrated, but got {confidence.shape[1]}")
    tests = [stats.ks_2samp(confidence[:, j], np.asarray(stored[j])) for j in range(len(stored))]
    ks_p = min(1.0, len(tests) * min(float(t.pvalue) for t in tests))
    n, m = int(summary["n"]), len(positives)
    now, then = positives.sum(axis=0), np.asarray(summary["positives"], dtype=np.int64)
    rate_ps = [stats.fisher_exact([[a, m - a], [b, n - b]]).pvalue for a, b in zip(now, then, strict=True)]
    rate_p = min(1.0, len(rate_ps) * min(rate_ps))
    return ExchangeabilityCheck(
        ks_statistic=max(float(t.statistic) for t in tests),
        ks_p_value=ks_p,
        positive_rate=(now / max(m, 1)).round(4).tolist(),
        calibration_positive_rate=(then / max(n, 1)).round(4).tolist(),
        rate_p_value=float(rate_p),
        shifted=bool(ks_p < level or rate_p < level),
        level=level,
    )


def guarantee_verdict(rule: Any, calibration: dict[str, Any] | None, probs: list[Any], level: float = 0.01) -> dict:
    """As JSON for a prediction run (``probs`` in batches): the model's stored guarantee (its ``calibration``
    record, or ``None``) and whether these cases look like its calibration data; warns when they do not, and
    when the model holds no calibration data (no guarantee claimed)."""
    if not calibration or "scores" not in calibration:
        message = "the model holds no calibration data (trained before medtransfer recorded it): no guarantee claimed"
        _logger.warning("%s", message)
        return {"calibrated": False, "message": message}
    verdict: dict[str, Any] = {"calibrated": True, "source": calibration.get("source"), "n": calibration.get("n")}
    control = calibration.get("risk_control")
    if control is not None:
        per_label = control["per_label"]
        verdict["risk_control"] = {
            "target_risk": control["target_risk"], "delta": control["delta"],
            "certified": [r["certified"] for r in per_label],
            "calibration_coverage": [r["coverage"] for r in per_label],
        }  # fmt: skip
        if not all(verdict["risk_control"]["certified"]):
            _logger.warning("No coverage met target_risk %s at delta %s on the calibration data: those cases "
                            "(labels) are all referred", control["target_risk"], control["delta"])  # fmt: skip
    if calibration.get("set_quantile") is not None:
        verdict["set_alpha"] = calibration.get("set_alpha")
    batches = [p for p in probs if len(p)]
    if not batches:
        return verdict
    import torch

    stacked = torch.cat(batches)
    check = check_exchangeability(
        calibration["scores"], rule.confidence(stacked).cpu().numpy(), rule.positives(stacked).cpu().numpy(), level
    )
    verdict["exchangeability"] = asdict(check)
    verdict["message"] = check.message()
    if check.shifted:
        from medtransfer.decisions.prevalence import shift_explanation

        explanation, hint = shift_explanation(calibration, stacked, rule.task), ""
        if explanation is not None:
            verdict["prevalence_shift"], verdict["message"] = explanation[0], f"{check.message()}; {explanation[1]}"
            hint = "\nHINT: `--prevalence estimate` adapts the probabilities and decisions to it" * explanation[0]
        _logger.warning("Exchangeability: %s. The calibration guarantee may not hold for these cases.%s",
                        verdict["message"], hint)  # fmt: skip
    else:
        _logger.info("Exchangeability: %s", check.message())
    return verdict
