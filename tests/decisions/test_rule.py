"""The decision rule's abstention band says which probabilities it refers, whatever the confidence score."""

from __future__ import annotations

import pytest
import torch

from medtransfer.decisions.rule import DecisionRule
from medtransfer.metrics.functional import SCORES


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize(("threshold", "min_confidence"), [(0.3, 0.05), (0.3, 0.6), (0.3, 0.8), (0.7, 0.75)])
def test_the_band_is_what_the_rule_refers(score, threshold, min_confidence):
    rule = DecisionRule("binary", torch.tensor(threshold), torch.tensor(min_confidence), score)
    probs = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)
    low, high = rule.abstention_band
    torch.testing.assert_close(rule.abstains(probs), (probs > low) & (probs < high))


def test_the_stated_probability_refers_the_unsure_side_of_a_low_threshold():
    """At threshold 0.3, a positive at p = 0.4 is stated at 0.4 and a negative at p = 0.05 at 0.95: the margin
    ranks them the other way round (0.1 < 0.25) and would keep the unsure positive before the sure negative."""
    stated = DecisionRule("binary", torch.tensor(0.3), torch.tensor(0.6))
    assert stated.confidence_score == "decision_prob"
    assert stated.abstains(torch.tensor([0.4, 0.05], dtype=torch.float64)).tolist() == [True, False]
    assert stated.abstention_band == pytest.approx((0.3, 0.6))
