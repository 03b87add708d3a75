"""Selective prediction maths against independent numpy/sklearn/scipy references, edge cases and input errors."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
import selective_reference as ref
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from medtransfer.decisions.rule import DecisionRule
from medtransfer.metrics import functional as F

SEEDS = [0, 1, 2]
SIZES = [1, 2, 7, 60, 400]
ADVERSARIAL = {
    "all_ties": ([0.7] * 9, [1, 0, 1, 1, 0, 1, 0, 1, 1]),
    "many_ties": ([0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1], [1, 0, 1, 1, 0, 0, 1, 0, 0]),
    "all_correct": ([0.3, 0.9, 0.5, 0.5, 0.1], [1, 1, 1, 1, 1]),
    "all_wrong": ([0.3, 0.9, 0.5, 0.5, 0.1], [0, 0, 0, 0, 0]),
    "single_case_right": ([0.4], [1]),
    "single_case_wrong": ([0.4], [0]),
    "errors_on_top": ([0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 1, 1, 1]),
    "ties_across_classes_at_top": ([1.0, 1.0, 1.0, 0.2, 0.1], [0, 1, 1, 1, 0]),
}


def _problems() -> list[tuple[np.ndarray, np.ndarray]]:
    random = [ref.random_problem(s, n, d) for s in SEEDS for n in SIZES for d in (None, 1)]
    return random + [(np.array(c, dtype=np.float64), np.array(k, dtype=bool)) for c, k in ADVERSARIAL.values()]


PROBLEMS = _problems()
PROBLEM_IDS = [f"seed{s}-n{n}-{'ties' if d else 'cont'}" for s in SEEDS for n in SIZES for d in (None, 1)] + list(
    ADVERSARIAL
)


def _t(conf: np.ndarray, correct: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(conf, dtype=torch.float64), torch.tensor(correct)


@pytest.mark.parametrize(("conf", "correct"), PROBLEMS, ids=PROBLEM_IDS)
def test_curve_and_areas_match_the_reference(conf, correct):
    coverage, risk, thresholds = F.risk_coverage_curve(*_t(conf, correct))
    ref_coverage, ref_risk, _, ref_thresholds = ref.operating_points(conf, correct)
    np.testing.assert_allclose(coverage.numpy(), ref_coverage, atol=1e-12)
    np.testing.assert_allclose(risk.numpy(), ref_risk, atol=1e-12)
    np.testing.assert_array_equal(thresholds.numpy(), ref_thresholds)
    assert F.aurc(*_t(conf, correct)).item() == pytest.approx(ref.aurc(conf, correct), abs=1e-6)
    assert F.eaurc(*_t(conf, correct)).item() == pytest.approx(max(ref.eaurc(conf, correct), 0.0), abs=1e-6)
    assert F.augrc(*_t(conf, correct)).item() == pytest.approx(ref.augrc(conf, correct), abs=1e-6)


@pytest.mark.parametrize(("conf", "correct"), PROBLEMS, ids=PROBLEM_IDS)
@pytest.mark.parametrize("coverage", [0.05, 0.5, 0.8, 1.0])
def test_operating_points_at_targets_match_the_reference(conf, correct, coverage):
    c, k = _t(conf, correct)
    assert F.selective_risk_at_coverage(c, k, coverage).item() == pytest.approx(
        ref.risk_at_coverage(conf, correct, coverage), abs=1e-12
    )
    max_risk = 1 - coverage  # reuse the grid as risk bounds 0.95, 0.5, 0.2, 0
    assert F.coverage_at_risk(c, k, max_risk).item() == pytest.approx(
        ref.coverage_at_risk(conf, correct, max_risk), abs=1e-12
    )
    assert F.coverage_at_accuracy(c, k, coverage).item() == pytest.approx(
        ref.coverage_at_risk(conf, correct, 1 - coverage), abs=1e-12
    )


def test_aurc_and_augrc_with_ties_average_every_order_within_tie_groups():
    conf = np.array([0.9, 0.6, 0.6, 0.6, 0.6, 0.2, 0.2])
    correct = np.array([1, 0, 1, 1, 0, 1, 0], dtype=bool)
    groups = [np.flatnonzero(conf == v) for v in np.unique(conf)[::-1]]
    aurcs, augrcs = [], []
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        ranking = np.concatenate(orders)  # one strict ranking consistent with the ties
        strict = np.empty(conf.size)
        strict[ranking] = np.arange(conf.size, 0, -1)
        aurcs.append(ref.aurc(strict, correct))
        augrcs.append(ref.augrc(strict, correct))
    assert F.aurc(*_t(conf, correct)).item() == pytest.approx(np.mean(aurcs), abs=1e-9)
    assert F.augrc(*_t(conf, correct)).item() == pytest.approx(np.mean(augrcs), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_values_do_not_depend_on_input_order(seed):
    conf, correct = ref.random_problem(seed, 200, decimals=1)
    c, k = _t(conf, correct)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(seed))
    for fn in (F.aurc, F.eaurc, F.augrc):
        assert fn(c, k).item() == pytest.approx(fn(c[perm], k[perm]).item(), abs=1e-12)
    for coverage in (0.3, 0.9):
        assert F.selective_risk_at_coverage(c, k, coverage) == F.selective_risk_at_coverage(c[perm], k[perm], coverage)
    torch.testing.assert_close(F.risk_coverage_curve(c, k), F.risk_coverage_curve(c[perm], k[perm]))


@pytest.mark.parametrize(("conf", "correct"), PROBLEMS, ids=PROBLEM_IDS)
def test_values_are_bounded(conf, correct):
    c, k = _t(conf, correct)
    assert 0 <= F.aurc(c, k).item() <= 1
    assert 0 <= F.augrc(c, k).item() <= 0.5
    assert 0 <= F.eaurc(c, k).item() <= F.aurc(c, k).item()
    coverage, risk, _ = F.risk_coverage_curve(c, k)
    assert bool(((coverage > 0) & (coverage <= 1) & (risk >= 0) & (risk <= 1)).all())


@pytest.mark.parametrize("error_rate", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tied", [False, True])
def test_a_perfect_ranking_has_the_oracle_aurc_and_zero_eaurc(error_rate, tied):
    n = 50
    correct = torch.arange(n) >= round(error_rate * n)  # the wrong cases first ...
    conf = correct.double() if tied else torch.arange(n, dtype=torch.float64)  # ... are the least confident
    r = error_rate
    oracle = r + (1 - r) * math.log(1 - r) if r < 1 else 1.0
    assert F.aurc(conf, correct).item() == pytest.approx(oracle, abs=1e-12)
    assert F.eaurc(conf, correct).item() == pytest.approx(0.0, abs=1e-12)
    assert F.augrc(conf, correct).item() == pytest.approx(r * r / 2, abs=1e-12)


def test_constant_confidence_gives_the_error_rate_everywhere():
    conf, correct = torch.full((8,), 0.6), torch.tensor([1, 1, 0, 1, 1, 1, 0, 1])
    assert F.aurc(conf, correct).item() == pytest.approx(0.25)
    assert F.selective_risk_at_coverage(conf, correct, 0.1).item() == pytest.approx(0.25)  # the tie group is whole
    assert F.coverage_at_risk(conf, correct, 0.2).item() == 0.0  # no operating point reaches 20 % risk


def test_target_coverage_takes_the_smallest_achievable_coverage_at_or_above_it():
    conf = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.3])
    correct = torch.tensor([1, 1, 0, 0, 1])
    preds, target = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([1, 1, 0, 1, 0])
    out = F.selective_metrics_at_coverage(conf, preds, target, 0.4)  # 1/5 < 0.4 <= 4/5: the 0.8 group joins
    assert out["coverage"].item() == pytest.approx(0.8)
    assert out["risk"].item() == pytest.approx(0.5) == F.selective_risk_at_coverage(conf, correct, 0.4).item()
    assert F.selective_metrics_at_coverage(conf, preds, target, 0.2)["coverage"].item() == pytest.approx(0.2)


def test_count_comparisons_tolerate_rounding_of_the_bounds():
    conf = torch.linspace(1, 0, 100, dtype=torch.float64)
    correct = torch.arange(100) >= 57  # 57 errors on top: risk 0.57 at full coverage, but 0.57 * 100 < 57 in floats
    assert F.coverage_at_risk(conf, correct, 0.57).item() == 1.0
    assert F.coverage_at_accuracy(conf, correct, 0.43).item() == 1.0
    assert F.coverage_at_risk(conf, correct, 0.56).item() == 0.0
    assert F.selective_risk_at_coverage(conf, correct, 0.07).item() == 1.0  # 0.07 * 100 > 7: still the top 7 cases
    assert F.selective_metrics_at_coverage(conf, correct.long(), correct.long(), 0.07)["coverage"].item() == 0.07


@pytest.mark.parametrize("seed", SEEDS)
def test_selective_metrics_at_coverage_match_a_confusion_matrix(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, 120)
    probs = np.clip(rng.normal(0.3 + 0.4 * target, 0.25), 0, 1).round(2)
    conf, preds = np.maximum(probs, 1 - probs), (probs >= 0.5).astype(int)
    for coverage in (0.3, 0.75, 1.0):
        got = F.selective_metrics_at_coverage(torch.tensor(conf), torch.tensor(preds), torch.tensor(target), coverage)
        expected = ref.metrics_at_coverage(conf, preds, target, coverage)
        for key, value in expected.items():
            assert got[key].item() == pytest.approx(value, abs=1e-12), key


def test_sensitivity_is_nan_when_no_positive_case_is_accepted():
    out = F.selective_metrics_at_coverage(
        torch.tensor([0.9, 0.8, 0.2]), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 0.5
    )
    assert math.isnan(out["sensitivity"].item()) and out["specificity"].item() == 1.0


def test_multilabel_inputs_give_one_result_per_label():
    conf, correct = ref.random_problem(3, 90, decimals=1)
    conf2, correct2 = ref.random_problem(4, 90)
    c = torch.tensor(np.stack([conf, conf2], axis=1))
    k = torch.tensor(np.stack([correct, correct2], axis=1))
    for fn in (F.aurc, F.eaurc, F.augrc):
        torch.testing.assert_close(fn(c, k), torch.stack([fn(c[:, 0], k[:, 0]), fn(c[:, 1], k[:, 1])]))
    out = F.selective_metrics_at_coverage(c, k.long(), torch.ones_like(k, dtype=torch.long), 0.5)
    assert all(v.shape == (2,) for v in out.values())
    torch.testing.assert_close(out["risk"], F.selective_risk_at_coverage(c, k, 0.5))


def test_confidence_scores_and_predictions_per_task():
    binary = torch.tensor([0.9, 0.2, 0.5])
    torch.testing.assert_close(F.confidence_scores(binary, "binary"), torch.tensor([0.9, 0.8, 0.5]))
    torch.testing.assert_close(F.confidence_scores(binary, "binary", 0.3, "margin"), torch.tensor([0.6, 0.1, 0.2]))
    # the probability stated for the decision: at a threshold of 0.3, 0.2 is a negative stated at 0.8
    for threshold in (0.3, 0.6):
        stated = F.confidence_scores(binary, "binary", threshold, "decision_prob")
        torch.testing.assert_close(stated, torch.tensor([0.9, 0.8, 0.5]))
    torch.testing.assert_close(F.confidence_scores(torch.tensor([0.35, 0.25]), "binary", 0.3, "decision_prob"),
                               torch.tensor([0.35, 0.75]))  # fmt: skip
    assert DecisionRule("binary", torch.tensor(0.5), torch.tensor(0.0)).decide(binary).tolist() == [1, 0, 1]
    multiclass = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.45, 0.05]])
    torch.testing.assert_close(F.confidence_scores(multiclass, "multiclass"), torch.tensor([0.6, 0.5]))
    torch.testing.assert_close(F.confidence_scores(multiclass, "multiclass", score="margin"), torch.tensor([0.3, 0.05]))
    assert DecisionRule("multiclass", torch.tensor(0.5), torch.tensor(0.0)).decide(multiclass).tolist() == [1, 0]
    multilabel, thresholds = torch.tensor([[0.2, 0.7], [0.6, 0.6]]), torch.tensor([0.1, 0.65])
    assert DecisionRule("multilabel", thresholds, torch.zeros(2)).decide(multilabel).tolist() == [[1, 1], [1, 0]]
    torch.testing.assert_close(
        F.confidence_scores(multilabel, "multilabel", thresholds, "margin"), torch.tensor([[0.1, 0.05], [0.5, 0.05]])
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_reliability_bins_reproduce_torchmetrics_ece(seed):
    gen = torch.Generator().manual_seed(seed)
    probs, target = torch.rand(300, generator=gen), torch.randint(0, 2, (300,), generator=gen)
    conf, acc, count = F.reliability_bins(probs, target, n_bins=15)
    weight = count / count.sum()
    ece = (weight * (acc - conf).abs()).nansum()
    torch.testing.assert_close(ece, BinaryCalibrationError(n_bins=15)(probs, target))
    assert int(count.sum()) == 300 and conf.shape == acc.shape == count.shape == (15,)

    logits = torch.randn(300, 4, generator=gen)
    probs, target = logits.softmax(-1), torch.randint(0, 4, (300,), generator=gen)
    conf, acc, count = F.reliability_bins(probs.max(-1).values, probs.argmax(-1) == target, n_bins=10)
    ece = ((count / 300) * (acc - conf).abs()).nansum()
    torch.testing.assert_close(ece, MulticlassCalibrationError(num_classes=4, n_bins=10)(probs, target))


def test_reliability_bins_mark_empty_bins_with_nan():
    conf, acc, count = F.reliability_bins(torch.tensor([0.05, 0.95, 1.0]), torch.tensor([1, 0, 1]), n_bins=4)
    assert count.tolist() == [1, 0, 0, 2]
    assert torch.isnan(conf[1:3]).all() and acc[3].item() == 0.5


BAD_INPUTS = [
    (lambda: F.confidence_scores(torch.tensor([0.2, 1.5]), "binary"), r"in \[0, 1\], but got 1.5 at index \(1,\)"),
    (lambda: F.confidence_scores(torch.tensor([[0.2, -0.1]]), "multilabel"), r"but got -0.1\d* at index \(0, 1\)"),
    (lambda: F.confidence_scores(torch.tensor([0.2, float("nan")]), "binary"), r"finite values, but got nan"),
    (lambda: F.aurc(torch.tensor([0.2, float("inf")]), torch.tensor([1, 0])), r"finite values, but got inf"),
    (lambda: F.aurc(torch.tensor([]), torch.tensor([])), "empty batch"),
    (lambda: F.confidence_scores(torch.zeros(0, 3), "multiclass"), "empty batch"),
    (lambda: F.selective_risk_at_coverage(torch.rand(4), torch.ones(4), 1.5), r"`coverage` to be in \(0, 1\], but"),
    (lambda: F.selective_risk_at_coverage(torch.rand(4), torch.ones(4), 0.0), r"`coverage` to be in \(0, 1\], but"),
    (lambda: F.selective_metrics_at_coverage(torch.rand(2), torch.ones(2), torch.ones(2), -0.1), "`coverage`"),
    (lambda: F.coverage_at_risk(torch.rand(4), torch.ones(4), 1.2), r"`max_risk` to be in \[0, 1\]"),
    (lambda: F.coverage_at_accuracy(torch.rand(4), torch.ones(4), -1.0), r"`min_accuracy` to be in \[0, 1\]"),
    (lambda: F.aurc(torch.rand(4), torch.tensor([1, 0, 2, 1])), r"`correct` to hold 0/1 values, but got 2"),
    (lambda: F.aurc(torch.rand(4), torch.ones(3)), "`correct` of the same shape"),
    (lambda: F.confidence_scores(torch.rand(3, 1), "multiclass"), r"of shape \(N, C\) with C >= 2"),
    (lambda: F.confidence_scores(torch.rand(3), "binary", score="entropy"), "`score` to be one of"),
    (lambda: F.confidence_scores(torch.rand(3, 2), "multilabel", torch.tensor([0.5, 0.5, 0.5])), "one value per label"),
    (lambda: F.confidence_scores(torch.rand(3), "binary", 1.2), r"`threshold` to be in \[0, 1\]"),
    (lambda: F.reliability_bins(torch.rand(3), torch.ones(3), n_bins=0), "`n_bins` to be an integer larger than 0"),
    (lambda: F.reliability_bins(torch.tensor([0.5, 2.0]), torch.ones(2)), "`confidence` to hold probabilities"),
]


@pytest.mark.parametrize(("call", "match"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples():
    assert doctest.testmod(F, raise_on_error=False).failed == 0
