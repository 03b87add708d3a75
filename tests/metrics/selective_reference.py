"""Independent numpy/sklearn/scipy references for the selective metrics, written as the definitions read.

The implementation sorts once and integrates segments in closed form; these loop over the distinct thresholds,
integrate numerically (``scipy.integrate.quad``) or use the AUROC identity of the AUGRC.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.integrate import quad
from scipy.special import xlogy
from sklearn.metrics import confusion_matrix, roc_auc_score


def operating_points(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coverage, selective risk, generalized risk and threshold of accepting ``conf >= t`` per distinct ``t``."""
    conf, wrong = np.asarray(conf, dtype=np.float64), ~np.asarray(correct, dtype=bool)
    rows = []
    for t in np.unique(conf)[::-1]:
        accepted = conf >= t
        rows.append((accepted.mean(), wrong[accepted].mean(), (wrong & accepted).sum() / conf.size, t))
    return tuple(np.array(column) for column in zip(*rows, strict=True))


def aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Integral of G(phi) / phi, with G linear between (0, 0) and the operating points, by adaptive quadrature."""
    coverage, _, generalized, _ = operating_points(conf, correct)
    xs, ys = np.r_[0.0, coverage], np.r_[0.0, generalized]
    total = 0.0
    for a, b in itertools.pairwise(xs):
        value, _ = quad(lambda x: np.interp(x, xs, ys) / x, a, b, epsabs=1e-13, epsrel=1e-12)
        total += value
    return total


def error_rate(correct: np.ndarray) -> float:
    return float(1 - np.asarray(correct, dtype=np.float64).mean())


def eaurc(conf: np.ndarray, correct: np.ndarray) -> float:
    r = error_rate(correct)
    return aurc(conf, correct) - (r + xlogy(1 - r, 1 - r))


def augrc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Traub et al.: AUGRC = (1 - AUROC) r (1 - r) + r^2 / 2, AUROC of confidence separating right from wrong."""
    correct = np.asarray(correct, dtype=int)
    r = error_rate(correct)
    if correct.min() == correct.max():
        return r * r / 2
    return (1 - roc_auc_score(correct, conf)) * r * (1 - r) + r * r / 2


def accepted_at_coverage(conf: np.ndarray, coverage: float) -> np.ndarray:
    """Mask of the first threshold (highest first) that accepts at least ``coverage`` of the cases."""
    conf = np.asarray(conf, dtype=np.float64)
    for t in np.unique(conf)[::-1]:
        accepted = conf >= t
        if accepted.sum() >= coverage * conf.size - 1e-9:
            return accepted
    raise AssertionError("unreachable: the lowest threshold accepts every case")


def risk_at_coverage(conf: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    accepted = accepted_at_coverage(conf, coverage)
    return 1 - np.asarray(correct, dtype=np.float64)[accepted].mean()


def metrics_at_coverage(conf: np.ndarray, preds: np.ndarray, target: np.ndarray, coverage: float) -> dict[str, float]:
    accepted = accepted_at_coverage(conf, coverage)
    tn, fp, fn, tp = confusion_matrix(target[accepted], preds[accepted], labels=[0, 1]).ravel()
    accuracy = (tp + tn) / accepted.sum()
    return {
        "coverage": accepted.mean(),
        "risk": 1 - accuracy,
        "accuracy": accuracy,
        "sensitivity": tp / (tp + fn) if tp + fn else np.nan,
        "specificity": tn / (tn + fp) if tn + fp else np.nan,
    }


def coverage_at_risk(conf: np.ndarray, correct: np.ndarray, max_risk: float) -> float:
    coverage, risk, _, _ = operating_points(conf, correct)
    ok = risk <= max_risk + 1e-12
    return float(coverage[ok].max()) if ok.any() else 0.0


def random_problem(seed: int, n: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Confidences loosely related to correctness; rounding to ``decimals`` makes many ties."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < rng.uniform(0.2, 0.9)
    conf = np.clip(rng.normal(0.5 + 0.2 * correct, 0.2), 0, 1)
    if decimals is not None:
        conf = conf.round(decimals)
    return conf, correct
