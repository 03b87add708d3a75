"""One selective report: the module's test, ``baseline`` and ``evaluate``'s table compute the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from medtransfer.decisions.report import evaluation_table, guarantee_report, report_metrics, selective_report
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
