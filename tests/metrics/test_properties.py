"""Properties of the metric code on random inputs (hypothesis): selective metrics, thresholds and calibration do
not depend on the order of the cases, stay within their documented bounds, agree with the independent
references in ``selective_reference.py`` (numpy, scipy, sklearn), and reject NaN or infinite input by name.

Confidences are rounded to 1, 2 or 6 decimals, so many problems have ties; targets such as coverages and risks
are drawn on a grid of twentieths, where the implementation's and the reference's tolerances cannot disagree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import selective_reference as ref
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve
from torchmetrics.functional.classification import binary_calibration_error

from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import fit_threshold
from medtransfer.metrics import functional as F

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRID = st.integers(1, 20).map(lambda k: k / 20)  # coverages, accuracies, risks: twentieths
GRID0 = st.integers(0, 20).map(lambda k: k / 20)


# --------------------------------------------------------------------------------------------------- strategies
@st.composite
def selective_problems(draw, min_n: int = 1, max_n: int = 40) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Confidences in [0, 1] (rounded: ties), correctness flags and a permutation of the cases."""
    n = draw(st.integers(min_n, max_n))
    decimals = draw(st.sampled_from([1, 2, 6]))
    conf = draw(arrays(np.float64, n, elements=st.floats(0, 1))).round(decimals)
    correct = draw(arrays(np.bool_, n))
    return conf, correct, draw(st.permutations(list(range(n))))


@st.composite
def binary_problems(draw, min_n: int = 2, max_n: int = 40, both_classes: bool = True):
    """Positive-class probabilities (rounded: ties), 0/1 targets and a permutation."""
    n = draw(st.integers(min_n, max_n))
    probs = draw(arrays(np.float64, n, elements=st.floats(0, 1))).round(draw(st.sampled_from([1, 2, 6])))
    target = draw(arrays(np.int64, n, elements=st.integers(0, 1)))
    if both_classes:
        assume(0 < target.sum() < n)
    return probs, target, draw(st.permutations(list(range(n))))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _exact(actual: torch.Tensor | float, expected: torch.Tensor | float) -> None:
    """Equal up to float64 rounding: reordering tied cases only changes the order of exact integer sums."""
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=0, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------------------------- selective: order
@SETTINGS
@given(problem=selective_problems(), coverage=GRID, bound=GRID0)
def test_selective_functions_ignore_the_order_of_the_cases(problem, coverage, bound):
    conf, correct, perm = problem
    c, k = _t(conf), _t(correct)
    cp, kp = _t(conf[perm]), _t(correct[perm])
    for fn in (F.aurc, F.eaurc, F.augrc):
        _exact(fn(cp, kp), fn(c, k))
    _exact(F.selective_risk_at_coverage(cp, kp, coverage), F.selective_risk_at_coverage(c, k, coverage))
    _exact(F.coverage_at_risk(cp, kp, bound), F.coverage_at_risk(c, k, bound))
    _exact(F.coverage_at_accuracy(cp, kp, bound), F.coverage_at_accuracy(c, k, bound))
    for got, want in zip(F.risk_coverage_curve(cp, kp), F.risk_coverage_curve(c, k), strict=True):
        _exact(got, want)


# --------------------------------------------------------------------------------------------- selective: bounds
@SETTINGS
@given(problem=selective_problems(), coverage=GRID)
def test_selective_values_stay_within_their_bounds(problem, coverage):
    conf, correct, _ = problem
    c, k = _t(conf), _t(correct)
    area, excess, general = float(F.aurc(c, k)), float(F.eaurc(c, k)), float(F.augrc(c, k))
    assert 0.0 <= area <= 1.0 + 1e-12
    assert 0.0 <= excess <= area + 1e-12
    assert 0.0 <= general <= 0.5 + 1e-12
    cov, risk, thresholds = F.risk_coverage_curve(c, k)
    assert (cov > 0).all() and (cov <= 1).all() and float(cov[-1]) == 1.0
    assert (cov[1:] > cov[:-1]).all() and (thresholds[1:] < thresholds[:-1]).all()
    assert (risk >= 0).all() and (risk <= 1).all()
    assert float(risk[-1]) == pytest.approx(1 - correct.mean())  # everything accepted: the plain error rate
    at = F.selective_metrics_at_coverage(c, k.long(), torch.ones_like(k, dtype=torch.long), coverage)
    assert float(at["coverage"]) >= coverage - 1e-12
    for name in ("risk", "accuracy", "sensitivity", "specificity"):
        assert math.isnan(float(at[name])) or 0.0 <= float(at[name]) <= 1.0, name


# ------------------------------------------------------------------------------------------ selective: reference
@SETTINGS
@given(problem=selective_problems(), coverage=GRID, bound=GRID0)
def test_selective_functions_agree_with_the_reference(problem, coverage, bound):
    conf, correct, _ = problem
    c, k = _t(conf), _t(correct)
    assert float(F.aurc(c, k)) == pytest.approx(ref.aurc(conf, correct), abs=1e-9)
    assert float(F.eaurc(c, k)) == pytest.approx(max(0.0, ref.eaurc(conf, correct)), abs=1e-9)
    assert float(F.augrc(c, k)) == pytest.approx(ref.augrc(conf, correct), abs=1e-12)
    risk = F.selective_risk_at_coverage(c, k, coverage)
    assert float(risk) == pytest.approx(ref.risk_at_coverage(conf, correct, coverage), abs=1e-12)
    assert float(F.coverage_at_risk(c, k, bound)) == pytest.approx(ref.coverage_at_risk(conf, correct, bound))
    assert float(F.coverage_at_accuracy(c, k, 1 - bound)) == pytest.approx(ref.coverage_at_risk(conf, correct, bound))
    ref_cov, ref_risk, _, ref_thresholds = ref.operating_points(conf, correct)
    cov, risk_curve, thresholds = F.risk_coverage_curve(c, k)
    np.testing.assert_allclose(cov.numpy(), ref_cov, atol=1e-12)
    np.testing.assert_allclose(risk_curve.numpy(), ref_risk, atol=1e-12)
    np.testing.assert_array_equal(thresholds.numpy(), ref_thresholds)


@SETTINGS
@given(problem=binary_problems(min_n=1, both_classes=False), coverage=GRID)
def test_selective_metrics_at_coverage_agree_with_the_reference(problem, coverage):
    """Binary decisions at 0.5, ranked by the margin: the reference counts a confusion matrix (sklearn)."""
    probs, target, _ = problem
    p, y = _t(probs), _t(target)
    conf, preds = F.confidence_scores(p, "binary", score="margin"), (p >= 0.5).long()
    got = F.selective_metrics_at_coverage(conf, preds, y, coverage)
    want = ref.metrics_at_coverage(conf.numpy(), preds.numpy(), target, coverage)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, abs=1e-12, nan_ok=True), name


# --------------------------------------------------------------------------------------------------- reliability
@SETTINGS
@given(problem=binary_problems(min_n=1, both_classes=False), n_bins=st.integers(1, 20), data=st.data())
def test_reliability_bins_ignore_order_and_give_torchmetrics_ece(problem, n_bins, data):
    """The ECE of the bins is torchmetrics' binary ECE (for probabilities below 1, which it bins on their own)."""
    probs, target, perm = problem
    probs = np.minimum(probs, 0.999).astype(np.float32)
    p, y = _t(probs), _t(target)
    mean_conf, accuracy, count = F.reliability_bins(p, y, n_bins)
    shuffled = F.reliability_bins(p[perm], y[perm], n_bins)
    torch.testing.assert_close(shuffled[0], mean_conf, equal_nan=True)
    torch.testing.assert_close(shuffled[1], accuracy, equal_nan=True)
    assert torch.equal(shuffled[2], count) and int(count.sum()) == len(probs)
    filled = count > 0
    lower = torch.arange(n_bins)[filled] / n_bins
    assert (mean_conf[filled] >= lower - 1e-6).all() and (mean_conf[filled] <= lower + 1 / n_bins + 1e-6).all()
    ece = float((count[filled] / len(probs) * (accuracy[filled] - mean_conf[filled]).abs()).sum())
    assert ece == pytest.approx(float(binary_calibration_error(p, y, n_bins=n_bins, norm="l1")), abs=1e-5)


# --------------------------------------------------------------------------------------------------- thresholds
def _rates(probs: np.ndarray, target: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of calling ``probs >= threshold`` positive."""
    called = probs >= threshold
    return called[target == 1].mean(), (~called)[target == 0].mean()


@SETTINGS
@given(problem=binary_problems(), target_value=GRID)
def test_thresholds_ignore_order_stay_in_range_and_meet_their_policy(problem, target_value):
    probs, target, perm = problem
    probs = np.minimum(probs, 0.99)  # with p == 1 a specificity may be out of reach: see the test below
    p, y = _t(probs), _t(target)
    for policy in ("youden", "target_sensitivity", "target_specificity", "f1", "fixed"):
        threshold = fit_threshold(p, y, policy, target_value)
        assert fit_threshold(p[perm], y[perm], policy, target_value) == threshold, policy
        assert 0.0 <= threshold <= 1.0, policy
    sensitivity, _ = _rates(probs, target, fit_threshold(p, y, "target_sensitivity", target_value))
    assert sensitivity >= target_value - 1e-12
    _, specificity = _rates(probs, target, fit_threshold(p, y, "target_specificity", target_value))
    assert specificity >= target_value - 1e-12


def test_an_unreachable_target_specificity_is_not_passed_off_as_met():
    """Found by the property above: a float32 sigmoid saturates to exactly 1.0 for logits above ~17, so an
    overconfident negative can have p == 1, and then no threshold in [0, 1] reaches specificity 0.9 here (the
    best is 0.75). ``fit_threshold`` returns the ROC's artificial first threshold 1.0, whose curve point claims
    specificity 1, silently; it should say that the target is out of reach."""
    probs = np.array([1.0, 0.2, 0.3, 0.1, 0.9])
    target = np.array([0, 0, 0, 0, 1])
    with pytest.warns(UserWarning, match=r"(?i)no threshold reaches specificity 0\.9"):
        threshold = fit_threshold(_t(probs), _t(target), "target_specificity", 0.9)
    assert _rates(probs, target, threshold)[1] == 0.75


@SETTINGS
@given(problem=binary_problems())
def test_youden_threshold_reaches_the_best_point_of_sklearns_roc(problem):
    """The reference is sklearn's full ROC curve (every distinct score), not torchmetrics'."""
    probs, target, _ = problem
    fpr, tpr, _ = roc_curve(target, probs, drop_intermediate=False)
    best = float(np.max(tpr - fpr))
    assume(best > 0)  # an uninformative score has no best cut; the policy then keeps the top one
    sensitivity, specificity = _rates(probs, target, fit_threshold(_t(probs), _t(target), "youden"))
    assert sensitivity + specificity - 1 == pytest.approx(best, abs=1e-12)


# --------------------------------------------------------------------------------------------------- calibration
def _nll(logits: np.ndarray, target: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / T)``, in numpy (log-sum-exp form)."""
    z = logits / temperature
    return float(np.mean(np.logaddexp(0, z) - target * z))


@st.composite
def calibration_problems(draw):
    """Binary logits that are right more often than wrong but not separable: the best temperature is finite."""
    n = draw(st.integers(4, 40))
    magnitude = draw(arrays(np.float64, n, elements=st.floats(0.05, 8)))
    right = draw(arrays(np.bool_, n))
    assume(1 <= (~right).sum() < right.sum())
    target = draw(arrays(np.int64, n, elements=st.integers(0, 1)))
    sign = np.where(target == 1, 1.0, -1.0) * np.where(right, 1.0, -1.0)
    return sign * magnitude, target, draw(st.permutations(list(range(n))))


@settings(SETTINGS, max_examples=30)  # two L-BFGS fits per example
@given(problem=calibration_problems())
def test_temperature_ignores_order_and_minimises_the_nll_like_scipy(problem):
    logits, target, perm = problem
    reference = minimize_scalar(lambda log_t: _nll(logits, target, math.exp(log_t)), bounds=(-6, 6), method="bounded")
    assume(-5.5 < reference.x < 5.5)  # an interior optimum (very weak signal sends T to infinity)
    temperature = fit_temperature(_t(logits), _t(target), "binary")
    assert math.isfinite(temperature) and temperature > 0
    assert _nll(logits, target, temperature) <= reference.fun + 1e-7
    # Shuffled, L-BFGS sums in another order and may stop elsewhere on a flat optimum: the same NLL, not the same T.
    shuffled = fit_temperature(_t(logits[perm]), _t(target[perm]), "binary")
    assert _nll(logits, target, shuffled) <= reference.fun + 1e-7


# ----------------------------------------------------------------------------------------------- bad numbers
@SETTINGS
@given(problem=binary_problems(min_n=1, both_classes=False), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_or_inf_anywhere_is_rejected_by_name(problem, bad):
    probs, target, perm = problem
    position = perm[0]
    probs = probs.copy()
    probs[position] = bad
    p, y = _t(probs), _t(target)
    finite = r"to hold finite values, but got -?(nan|inf) at index \(" + str(position) + r",\)"
    with pytest.raises(ValueError, match=finite):
        F.confidence_scores(p, "binary")
    with pytest.raises(ValueError, match=finite):
        F.aurc(p, y)
    with pytest.raises(ValueError, match=r"without NaN"):
        fit_threshold(p, y)
    with pytest.raises(ValueError, match=r"finite `logits`"):
        fit_temperature(p, y, "binary")
