"""The decision rule is fitted on held-out probabilities: thresholds by policy, the abstention band for a target
coverage or risk, certified risk control per label, and conformal sets; alike for the module and ``baseline``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.decisions.fitting import DecisionFitting, calibration_metrics
from medtransfer.decisions.risk_control import REFER_ALL, control_selective_risk
from medtransfer.decisions.thresholds import fit_threshold


def _binary(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, generator=generator)
    return probs, (torch.rand(n, generator=generator) < probs).long()


def test_threshold_by_policy_and_band_for_the_target_coverage():
    probs, targets = _binary()
    rule, record = DecisionFitting("binary", threshold_policy="youden", target_coverage=0.8).fit(probs, targets)
    assert float(rule.threshold) == pytest.approx(fit_threshold(probs, targets, "youden"), abs=1e-6)
    decided = ~rule.abstains(probs)
    assert decided.float().mean() >= 0.8
    confidence = rule.confidence(probs)
    assert (confidence[decided] >= confidence[~decided].max()).all()
    assert record["source"] == "val" and record["n"] == 400 and "scores" in record
    assert calibration_metrics(record) == {}  # no guarantee asked for: nothing to log


def test_target_risk_picks_the_largest_coverage_within_the_risk():
    probs, targets = _binary()
    rule, _ = DecisionFitting("binary", target_risk=0.2).fit(probs, targets)
    decided = ~rule.abstains(probs)
    assert (rule.decide(probs) != targets)[decided].float().mean() <= 0.2
    looser, _ = DecisionFitting("binary", target_risk=0.3).fit(probs, targets)
    assert (~looser.abstains(probs)).sum() >= decided.sum()


def test_multilabel_risk_control_is_certified_per_label():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(400, 3, generator=generator)
    targets = (torch.rand(400, 3, generator=generator) < probs * torch.tensor([1.0, 0.9, 0.2])).long()
    fitting = DecisionFitting("multilabel", target_risk=0.1, delta=0.1)
    rule, record = fitting.fit(probs, targets, "calib")
    confidence, correct = rule.confidence(probs), rule.decide(probs) == targets
    for j in range(3):
        expected = control_selective_risk(confidence[:, j], correct[:, j], 0.1, 0.1)
        assert float(rule.min_confidence[j]) == pytest.approx(expected.cutoff)
    assert float(rule.min_confidence[2]) == REFER_ALL  # the label the scores barely predict: all referred
    assert record["source"] == "calib" and len(record["risk_control"]["per_label"]) == 3
    assert calibration_metrics(record)["calib/certified"] == 0.0


def test_multiclass_sets_are_fitted_stored_and_written_by_predict():
    from medtransfer.commands.predict import Predictor
    from medtransfer.commands.predict_writer import prediction_rows

    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(300, 3, generator=generator), dim=-1)
    targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    rule, calibration = DecisionFitting("multiclass", target_coverage=1.0, set_alpha=0.1).fit(probs, targets, "calib")
    assert rule.set_quantile == calibration["set_quantile"] and calibration["set_coverage"] >= 0.9
    assert calibration_metrics(calibration)["calib/set_size"] == calibration["set_size"]
    predictor = Predictor(torch.nn.Identity(), rule, "multiclass", ["a", "b", "c"], {}, "m", calibration)
    rows = list(prediction_rows(predictor, probs[:20]))
    sets = rule.prediction_sets(probs[:20])
    for row, members in zip(rows, sets, strict=True):
        assert row["prediction_set"].split("|") == [n for n, keep in zip("abc", members, strict=True) if keep]
        assert (row["decision"] == "abstain") == (int(members.sum()) > 1)


_OUTSIDE = [
    ("target_coverage", {"target_coverage": 0.0}, r"\(0, 1\]"),
    ("target_risk", {"target_risk": 1.5}, r"\[0, 1\]"),
    ("delta", {"delta": 1.0, "target_risk": 0.1}, r"\(0, 1\)"),
    ("target_risk", {"delta": 0.1, "target_risk": 0.0}, r"\(0, 1\) with `delta`"),
]


@pytest.mark.parametrize(("name", "kwargs", "interval"), _OUTSIDE)
def test_arguments_outside_their_range_are_one_line_errors(name, kwargs, interval):
    with pytest.raises(ValueError, match=rf"^Expected argument `{name}` to be in {interval}"):
        DecisionFitting("binary", **kwargs)


def test_set_alpha_is_for_multiclass_only():
    with pytest.raises(ValueError, match="`set_alpha` only for a multiclass task"):
        DecisionFitting("binary", set_alpha=0.1)


def test_fitting_on_numpy_like_integer_targets_matches_long_targets():
    probs, targets = _binary(seed=1)
    a, _ = DecisionFitting("binary").fit(probs, targets)
    b, _ = DecisionFitting("binary").fit(probs, torch.from_numpy(np.asarray(targets, dtype=np.float32)))
    assert float(a.threshold) == float(b.threshold) and float(a.min_confidence) == float(b.min_confidence)
