"""Risk control, conformal sets and the exchangeability check, against MAPIE and brute-force references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from mapie.risk_control import BinaryClassificationController
from mapie.risk_control.fwer_control import control_fwer
from scipy import stats

from medtransfer.decisions.risk_control import (
    REFER_ALL,
    aps_sets,
    calibration_summary,
    check_exchangeability,
    control_selective_risk,
    control_shifted_risk,
    default_grid,
    fit_aps_quantile,
    fit_shifted_aps_quantiles,
    min_testable,
    prevalence_vertices,
)


def _scores(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0, 0.5, n)
    return confidence, rng.uniform(size=n) < 0.75 + confidence * 0.5


def _brute_force(confidence, correct, target_risk, delta, grid):
    """The textbook loop: walk the grid, test each testable cut-off with scipy's exact binomial test."""
    chosen = REFER_ALL
    for cutoff in grid:
        accepted = confidence >= cutoff
        n, errors = int(accepted.sum()), int((accepted & ~correct).sum())
        if n < min_testable(target_risk, delta):
            continue
        if stats.binomtest(errors, n, target_risk, alternative="less").pvalue > delta:
            break
        chosen = cutoff
    return chosen


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("target_risk", "delta"), [(0.1, 0.1), (0.05, 0.2)])
def test_cutoff_matches_brute_force(seed, target_risk, delta):
    confidence, correct = _scores(seed)
    grid = default_grid(500)
    result = control_selective_risk(confidence, correct, target_risk, delta, grid)
    assert result.cutoff == pytest.approx(_brute_force(confidence, correct, target_risk, delta, grid))


@pytest.mark.parametrize("seed", range(6))
def test_fixed_sequence_is_mapies(seed):
    """MAPIE's fixed-sequence FWER control on the same exact p-values passes the same cut-offs; and MAPIE's
    whole BinaryClassificationController never certifies more coverage (its p-value rounds n * risk up, which
    can add one error: 11 / 167 * 167 = 11.000000000000002)."""
    confidence, correct = _scores(seed)
    target_risk, delta = 0.1, 0.1
    grid = default_grid(500)
    accepted = (confidence[:, None] >= grid).sum(0)
    grid = grid[accepted >= min_testable(target_risk, delta)]
    errors = ((confidence[:, None] >= grid) & ~correct[:, None]).sum(0)
    p_values = stats.binom.cdf(errors, (confidence[:, None] >= grid).sum(0), target_risk)
    passed = control_fwer(p_values, delta, fwer_method="fixed_sequence")
    result = control_selective_risk(confidence, correct, target_risk, delta, grid)
    assert result.cutoff == pytest.approx(grid[passed[-1]])

    controller = BinaryClassificationController(
        lambda x: np.stack([1 - x, x], axis=1), "precision", 1 - target_risk, 1 - delta,
        best_predict_param_choice="recall", list_predict_params=grid[::-1].copy(), fwer_method="fixed_sequence",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.calibrate(confidence, correct.astype(int))
    assert controller.best_predict_param >= result.cutoff - 1e-12


def test_guarantee_reports_coverage_risk_and_bound():
    confidence, correct = _scores(0)
    result = control_selective_risk(confidence, correct, 0.1, 0.1)
    decided = confidence >= result.cutoff
    assert result.certified and result.n == 400
    assert result.coverage == pytest.approx(decided.mean())
    assert result.risk == pytest.approx((~correct[decided]).mean())
    assert result.risk <= result.risk_bound <= 0.1 + 1e-9  # the certified cut-off's upper bound meets the target


def test_all_correct_calibration_certifies_everything_it_can():
    confidence = np.linspace(0.01, 0.5, 200)
    result = control_selective_risk(confidence, np.ones(200, bool), 0.02, 0.1)
    assert result.certified and result.coverage == 1.0 and result.risk == 0.0


def test_empty_and_too_small_calibration_refer_everything():
    empty = control_selective_risk(np.zeros(0), np.zeros(0, bool), 0.05, 0.1)
    assert not empty.certified and empty.cutoff == REFER_ALL and empty.coverage == 0.0
    # 50 perfect cases certify 5 % (needs 45) but not 2 % (needs 114)
    confidence, correct = np.linspace(0.1, 0.5, 50), np.ones(50, bool)
    assert min_testable(0.02, 0.1) == 114 and min_testable(0.05, 0.1) == 45
    assert control_selective_risk(confidence, correct, 0.05, 0.1).certified
    assert not control_selective_risk(confidence, correct, 0.02, 0.1).certified


def test_all_wrong_calibration_certifies_nothing():
    result = control_selective_risk(np.linspace(0, 0.5, 300), np.zeros(300, bool), 0.1, 0.1)
    assert not result.certified and result.cutoff == REFER_ALL


_OUTSIDE = [("target_risk", {"target_risk": 0.0}), ("target_risk", {"target_risk": 1.0}),
            ("delta", {"delta": 0.0}), ("delta", {"delta": 1.5})]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), _OUTSIDE)
def test_arguments_outside_the_open_unit_interval_are_one_line_errors(name, kwargs):
    args = {"target_risk": 0.05, "delta": 0.1} | kwargs
    with pytest.raises(ValueError, match=rf"^Expected argument `{name}` to be in \(0, 1\), but got [-\d.]+$"):
        control_selective_risk(np.ones(3), np.ones(3, bool), **args)


class _Prefit:
    """Probabilities in, probabilities out: lets MAPIE conformalize scores that were computed elsewhere."""

    _estimator_type = "classifier"

    def __init__(self, num_classes: int) -> None:
        self.classes_ = np.arange(num_classes)
        self.n_features_in_ = num_classes

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return np.asarray(X, dtype=np.float64)

    def predict(self, X):
        return np.asarray(X).argmax(axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_aps_sets_match_mapie(seed):
    """The stored quantile and the sets rebuilt from it are MAPIE's ``SplitConformalClassifier(prefit=True)``'s."""
    from mapie.classification import SplitConformalClassifier

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1], 300)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    new = rng.dirichlet([1, 1, 1], 200)
    mapie = SplitConformalClassifier(
        _Prefit(3), confidence_level=0.9, conformity_score="aps", prefit=True, random_state=seed
    ).conformalize(probs, labels)
    _, mapie_sets = mapie.predict_set(new)
    np.testing.assert_array_equal(aps_sets(new, fit_aps_quantile(probs, labels, 0.1, seed)), mapie_sets[:, :, 0])


def test_two_class_models_and_labels_of_two_classes_get_sets():
    """MAPIE's classifier refuses calibration labels of fewer than three classes; the score itself does not."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], 500)
    labels = (rng.uniform(size=500) < probs[:, 1]).astype(int)
    sets = aps_sets(probs, fit_aps_quantile(probs, labels, 0.1))
    assert sets[np.arange(500), labels].mean() >= 0.85 and sets.any(axis=1).all()
    three = rng.dirichlet([1, 1, 1], 500)
    assert math.isfinite(fit_aps_quantile(three, three[:, :2].argmax(axis=1), 0.1))


def test_aps_sets_cover_at_least_one_minus_alpha():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2, 1, 1], 4000)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    quantile = fit_aps_quantile(probs[:1000], labels[:1000], 0.1)
    sets = aps_sets(probs[1000:], quantile)
    assert sets.any(axis=1).all()
    assert sets[np.arange(3000), labels[1000:]].mean() >= 0.9 - 3 * math.sqrt(0.09 / 3000)


def test_too_few_cases_for_the_quantile_give_every_class():
    probs = np.array([[0.7, 0.2, 0.1]] * 5)
    assert fit_aps_quantile(probs, np.zeros(5, int), 0.1) == math.inf  # ceil(6 * 0.9) = 6 > 5
    assert aps_sets(probs, math.inf).all()


def test_exchangeability_check_fires_on_shift_only():
    rng = np.random.default_rng(0)
    calib = rng.beta(5, 1, 500) / 2
    summary = calibration_summary(calib, calib > 0.3)
    same = rng.beta(5, 1, 600) / 2
    shifted = rng.beta(2, 2, 600) / 2
    assert not check_exchangeability(summary, same, same > 0.3).shifted
    check = check_exchangeability(summary, shifted, shifted > 0.3)
    assert check.shifted and check.ks_p_value < 1e-6
    assert "DIFFER" in check.message() and f"p={check.ks_p_value:.3g}" in check.message()


# ------------------------------------------------------------------------------------------ label shift
def _shifted(seed: int, n: int, positive_share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Margin confidence, correctness and labels where each class's scores keep their law and only the class
    shares change (label shift)."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < positive_share).astype(int)
    probs = 1 / (1 + np.exp(-np.where(labels == 1, rng.normal(2.0, 1.5, n), rng.normal(-1.0, 1.5, n))))
    return np.abs(probs - 0.5), (probs >= 0.5) == labels, labels


def test_shifted_risk_at_the_calibration_shares_is_the_plain_control():
    for seed in range(4):
        confidence, correct, labels = _shifted(seed, 400, 0.7)
        shares = np.bincount(labels) / len(labels)
        plain = control_selective_risk(confidence, correct, 0.1, 0.1)
        shifted = control_shifted_risk(confidence, correct, labels, shares, 0.1, 0.1)
        assert shifted.cutoff == pytest.approx(plain.cutoff)
        assert shifted.coverage == pytest.approx(plain.coverage) and shifted.risk == pytest.approx(plain.risk)


def test_shifted_risk_holds_where_the_plain_control_fails():
    """Calibrated at 70 % positives, used at 10 %: the plain cut-off's risk on the target population exceeds the
    target in most draws; the re-weighted one's in at most delta of them (2 se of 100 draws allowed)."""
    big_confidence, big_correct, big_labels = _shifted(999, 200_000, 0.5)

    def target_risk_at(cutoff: float, positive_share: float) -> float:
        weights = np.where(big_labels == 1, positive_share, 1 - positive_share)
        decided = big_confidence >= cutoff
        return float((weights * (decided & ~big_correct)).sum() / max((weights * decided).sum(), 1e-12))

    plain, shifted = [], []
    for seed in range(100):
        confidence, correct, labels = _shifted(seed, 400, 0.7)
        plain.append(target_risk_at(control_selective_risk(confidence, correct, 0.1, 0.1).cutoff, 0.1) > 0.1)
        result = control_shifted_risk(confidence, correct, labels, [0.9, 0.1], 0.1, 0.1)
        shifted.append(result.certified and target_risk_at(result.cutoff, 0.1) > 0.1)
    assert np.mean(plain) > 0.5
    assert np.mean(shifted) <= 0.1 + 2 * math.sqrt(0.09 / 100)


def test_prevalence_vertices_are_the_interval_corners_on_the_simplex():
    binary = prevalence_vertices([0.3], [0.25, 0.36])
    np.testing.assert_allclose(binary[0], [0.7, 0.3])
    assert {tuple(row) for row in binary[1:].round(6)} == {(0.75, 0.25), (0.64, 0.36)}
    low, high = np.array([0.15, 0.25, 0.45]), np.array([0.25, 0.35, 0.55])
    corners = prevalence_vertices([0.2, 0.3, 0.5], np.stack([low, high], axis=1))
    np.testing.assert_allclose(corners.sum(axis=1), 1.0)
    assert ((corners >= low - 1e-9) & (corners <= high + 1e-9)).all() and len(corners) == 7


def test_a_wider_interval_never_certifies_more():
    confidence, correct, labels = _shifted(0, 600, 0.7)
    point = control_shifted_risk(confidence, correct, labels, [0.6, 0.4], 0.1, 0.1)
    wide = control_shifted_risk(confidence, correct, labels, prevalence_vertices([0.4], [0.3, 0.5]), 0.1, 0.1)
    assert point.certified and wide.cutoff >= point.cutoff and wide.risk_bound <= 0.1 + 1e-9


def test_shifted_risk_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"Expected `labels` in 0\.\.1, but got 0\.\.2"):
        control_shifted_risk(np.ones(3), np.ones(3, bool), np.array([0, 1, 2]), [0.5, 0.5], 0.1, 0.1)


def test_shifted_sets_at_the_calibration_shares_are_the_plain_sets():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 300)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    quantiles = fit_shifted_aps_quantiles(probs, labels, 0.1, np.bincount(labels) / 300)
    np.testing.assert_allclose(quantiles, fit_aps_quantile(probs, labels, 0.1))


def test_shifted_sets_cover_the_target_population():
    """Calibrated with equal class shares, used where class 0 is 80 %: re-weighted sets cover at least
    1 - alpha of the target cases (the plain sets' coverage there is reported only)."""
    rng = np.random.default_rng(1)

    def draw(n: int, shares: list[float]) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(3, size=n, p=shares)
        probs = rng.dirichlet([1, 1, 1], n)
        probs[np.arange(n), labels] += rng.uniform(0, 1.5, n)  # class 0 is the hardest only by its share
        return probs / probs.sum(axis=1, keepdims=True), labels

    cal_probs, cal_labels = draw(1500, [1 / 3, 1 / 3, 1 / 3])
    new_probs, new_labels = draw(20_000, [0.8, 0.1, 0.1])
    quantiles = fit_shifted_aps_quantiles(cal_probs, cal_labels, 0.1, [0.8, 0.1, 0.1])
    sets = aps_sets(new_probs, quantiles)
    assert sets[np.arange(20_000), new_labels].mean() >= 0.9 - 3 * math.sqrt(0.09 / 20_000)
