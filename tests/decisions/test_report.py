"""One selective report: the module's test, ``baseline`` and ``evaluate``'s table compute the same numbers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from medtransfer.decisions.prevalence import calibration_shares
from medtransfer.decisions.report import (
    evaluation_table,
    guarantee_report,
    prevalence_metrics,
    report_metrics,
    selective_report,
)
from medtransfer.decisions.rule import DecisionRule


def _multilabel(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(n, 3, generator=generator)
    targets = (torch.rand(n, 3, generator=generator) < probs).long()
    targets[:, 2] = 0  # a label without positives: undefined
    return probs, targets


def test_evaluation_table_is_the_selective_report_per_class():
    probs, targets = _multilabel()
    thresholds = torch.tensor([0.4, 0.5, 0.6])
    for score in ("decision_prob", "margin"):
        rule = DecisionRule("multilabel", thresholds, torch.zeros(3), score)
        report = selective_report(rule, probs, targets)
        table = evaluation_table(probs, targets, ["a", "b", "c"], "multilabel", thresholds.tolist(), score)
        for j, name in enumerate("abc"):
            for column, key in (("aurc", "aurc"), ("ece", "ece"), ("sel_acc_90", "selective_acc_cov90")):
                expected, got = float(report[key][j]), float(table.loc[name, column])
                same = (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, rel=1e-5)
                assert same, (score, name, column)
    assert table.loc["c", ["auroc", "aurc", "sel_acc_90"]].isna().all() and not math.isnan(table.loc["c", "accuracy"])


def test_binary_table_has_one_row_and_the_mean():
    probs = torch.rand(80, generator=torch.Generator().manual_seed(1))
    table = evaluation_table(probs, (probs > 0.3).long(), ["positive"], "binary", 0.5)
    assert list(table.index) == ["positive", "mean"] and table.loc["positive", "auroc"] == pytest.approx(1.0)


def test_report_metrics_log_means_and_each_defined_labels_auroc():
    probs, targets = _multilabel()
    rule = DecisionRule("multilabel", torch.full((3,), 0.5), torch.zeros(3))
    report = selective_report(rule, probs, targets)
    metrics, per_label = report_metrics(report, probs, targets, ["a", "b", "c"], "multilabel")
    assert metrics["test/auroc_labels_defined"] == 2 and "test/auroc/c" not in metrics
    assert metrics["test/aurc"] == pytest.approx(float(report["aurc"][:2].mean()))
    assert per_label["label"] == ["a", "b", "c"] and math.isnan(per_label["auroc"][2])


def test_a_model_without_calibration_data_claims_no_guarantee():
    probs = torch.rand(50)
    rule = DecisionRule("binary", torch.tensor(0.5), torch.tensor(0.0))
    with pytest.warns(UserWarning, match="no calibration data .* no guarantee is claimed"):
        assert guarantee_report(rule, None, probs, (probs > 0.5).long()) == {}


def _posteriors(n: int, share: float, seed: int, source: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posteriors at prevalence ``source`` of N(0, 1) vs N(2, 1) cases drawn at ``share``: calibrated."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, generator=generator) < share).long()
    x = torch.randn(n, generator=generator, dtype=torch.float64) + 2.0 * targets
    return torch.sigmoid(2 * x - 2 + math.log(source / (1 - source))), targets


def test_prevalence_metrics_estimate_the_test_shares_and_score_the_adapted_decisions():
    """Calibrated at 0.7, tested at 0.2: the EM estimate finds the test share within its interval, and the rule's
    decisions on the adapted probabilities are more accurate and better calibrated than on the model's own."""
    record = calibration_shares(*_posteriors(2000, 0.7, seed=1), "binary")
    probs, targets = _posteriors(1000, 0.2, seed=2)
    rule = DecisionRule("binary", torch.tensor(0.5), torch.tensor(0.0))
    metrics = prevalence_metrics(rule, record, probs, targets, ["pneumonia"])
    shares = ("true", "estimated", "estimated_low", "estimated_high", "calibration")
    adapted = ("acc", "ece", "selective_acc_cov80")
    assert set(metrics) == {f"test/prevalence/{k}" for k in shares} | {f"test/adapted/{k}" for k in adapted}
    true, estimated = metrics["test/prevalence/true"], metrics["test/prevalence/estimated"]
    assert true == pytest.approx(float(targets.double().mean())) and estimated == pytest.approx(true, abs=0.03)
    assert metrics["test/prevalence/estimated_low"] <= estimated <= metrics["test/prevalence/estimated_high"]
    assert metrics["test/prevalence/calibration"] == pytest.approx(record["prevalence"][1])
    plain = selective_report(rule, probs, targets)
    assert metrics["test/adapted/acc"] > float((rule.decide(probs) == targets).double().mean()) + 0.03
    assert metrics["test/adapted/ece"] < float(plain["ece"])


def test_prevalence_metrics_name_each_finding_and_fall_back_to_the_true_shares(caplog):
    probs, targets = _multilabel()
    rule = DecisionRule("multilabel", torch.full((2,), 0.5), torch.zeros(2))
    record = calibration_shares(probs[:, :2], targets[:, :2], "multilabel")
    metrics = prevalence_metrics(rule, record, probs[:, :2], targets[:, :2], ["a", "b"], stage="val")
    assert metrics["val/prevalence/true/b"] == pytest.approx(float(targets[:, 1].double().mean()))
    assert {"val/prevalence/estimated/a", "val/prevalence/calibration/b", "val/adapted/ece"} <= set(metrics)
    assert prevalence_metrics(rule, {"n": 300}, probs[:, :2], targets[:, :2], ["a", "b"]) == {}  # no shares kept
    with caplog.at_level(logging.WARNING):  # too few cases to estimate from: the true shares alone
        few = prevalence_metrics(rule, record, probs[:20, :2], targets[:20, :2], ["a", "b"])
    assert set(few) == {"test/prevalence/true/a", "test/prevalence/true/b"}
    assert "batch of 20 case(s) is too small" in caplog.text
