"""Temperature scaling recovers a known miscalibration and lowers the validation NLL."""

from __future__ import annotations

import pytest
import torch

from medtransfer.decisions.temperature import fit_temperature


def test_recovers_the_temperature_of_overconfident_binary_logits():
    torch.manual_seed(0)
    true_logits = torch.randn(4000) * 2
    target = torch.bernoulli(true_logits.sigmoid())
    assert fit_temperature(true_logits * 3, target, "binary") == pytest.approx(3.0, rel=0.1)


def test_multiclass_temperature_lowers_negative_log_likelihood():
    torch.manual_seed(1)
    true_logits = torch.randn(3000, 4)
    target = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = true_logits * 2.5
    t = fit_temperature(overconfident, target, "multiclass")
    nll = torch.nn.functional.cross_entropy
    assert nll(overconfident / t, target) < nll(overconfident, target)
    assert t == pytest.approx(2.5, rel=0.15)


def test_works_inside_no_grad_evaluation():
    with torch.no_grad():
        assert fit_temperature(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), "binary") > 0


@pytest.mark.parametrize(
    ("logits", "match"), [(torch.tensor([]), "empty"), (torch.tensor([1.0, float("inf")]), "finite")]
)
def test_bad_input_is_rejected(logits, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, torch.zeros_like(logits), "binary")


def test_a_temperature_is_fitted_inside_inference_mode():
    """``validate`` and ``test`` run the epoch-end fitting in inference mode; calibration is on by default."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, generator=generator) * 4
    target = (logits / 4 + torch.randn(200, generator=generator) > 0).long()
    with torch.inference_mode():
        inside = fit_temperature(logits, target, "binary")
    assert inside == pytest.approx(fit_temperature(logits, target, "binary")) and inside > 1
