"""Threshold policies pick the documented point of the ROC/PR curve, checked against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.decisions.thresholds import fit_threshold, fit_thresholds


def _rates(p: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, float]:
    pred = p >= t
    tp, fp = (pred & (y == 1)).sum(), (pred & (y == 0)).sum()
    fn, tn = (~pred & (y == 1)).sum(), (~pred & (y == 0)).sum()
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    f1 = 2 * tp / (2 * tp + fp + fn)
    return sens, spec, f1


@pytest.fixture(params=[0, 1, 2])
def scores(request):
    rng = np.random.default_rng(request.param)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)  # rounded: many ties
    return torch.tensor(p), torch.tensor(y)


def test_youden_maximises_sensitivity_plus_specificity(scores):
    p, y = scores
    t = fit_threshold(p, y, "youden")
    candidates = np.unique(p.numpy())
    best = max(sum(_rates(p.numpy(), y.numpy(), c)[:2]) for c in candidates)
    assert sum(_rates(p.numpy(), y.numpy(), t)[:2]) == pytest.approx(best)


def test_target_sensitivity_is_met_with_the_best_specificity(scores):
    p, y = scores
    t = fit_threshold(p, y, "target_sensitivity", 0.9)
    sens, spec, _ = _rates(p.numpy(), y.numpy(), t)
    assert sens >= 0.9
    feasible = [c for c in np.unique(p.numpy()) if _rates(p.numpy(), y.numpy(), c)[0] >= 0.9]
    assert spec == pytest.approx(max(_rates(p.numpy(), y.numpy(), c)[1] for c in feasible))


def test_target_specificity_is_met_with_the_best_sensitivity(scores):
    p, y = scores
    t = fit_threshold(p, y, "target_specificity", 0.8)
    sens, spec, _ = _rates(p.numpy(), y.numpy(), t)
    assert spec >= 0.8
    feasible = [c for c in np.unique(p.numpy()) if _rates(p.numpy(), y.numpy(), c)[1] >= 0.8]
    assert sens == pytest.approx(max(_rates(p.numpy(), y.numpy(), c)[0] for c in feasible))


def test_f1_policy_maximises_f1(scores):
    p, y = scores
    t = fit_threshold(p, y, "f1")
    best = max(_rates(p.numpy(), y.numpy(), c)[2] for c in np.unique(p.numpy()))
    assert _rates(p.numpy(), y.numpy(), t)[2] == pytest.approx(best)


def test_fixed_policy_and_single_class_fall_back_to_default():
    p, y = torch.tensor([0.2, 0.9]), torch.tensor([1, 1])
    assert fit_threshold(p, torch.tensor([0, 1]), "fixed", default=0.3) == 0.3
    assert fit_threshold(p, y, "youden") == 0.5


def test_multilabel_gets_one_threshold_per_label(scores):
    p, y = scores
    stacked = fit_thresholds(torch.stack([p, 1 - p], 1), torch.stack([y, 1 - y], 1), "youden")
    assert stacked.shape == (2,)
    assert stacked[0] == fit_threshold(p, y, "youden")


@pytest.mark.parametrize(
    ("probs", "kwargs", "match"),
    [
        (torch.tensor([0.2, 1.5]), {}, "probabilities in"),
        (torch.tensor([0.2, float("nan")]), {}, "without NaN"),
        (torch.tensor([]), {}, "empty batch"),
        (torch.tensor([0.2, 0.7]), {"policy": "best"}, "Expected argument `policy`"),
        (torch.tensor([0.2, 0.7]), {"policy": "target_sensitivity", "target_value": 1.2}, "`target_value`"),
    ],
)
def test_bad_input_is_rejected(probs, kwargs, match):
    target = torch.tensor([0, 1][: len(probs)])
    with pytest.raises(ValueError, match=match):
        fit_threshold(probs, target, **kwargs)
