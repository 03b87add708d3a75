"""Threshold and temperature are fitted on validation outputs, stored, and applied unchanged by test."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_loaders
from lightning.pytorch import Trainer, seed_everything

from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import fit_threshold
from medtransfer.models.classifier import ClassifierModule


def _outputs(model: ClassifierModule, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    return logits, torch.cat([y for _, y in loader])


@pytest.fixture(scope="module")
def fitted():
    seed_everything(0)
    model = ClassifierModule(
        backbone="resnet10t", pretrained="none", threshold_policy="youden", temperature_scaling=True
    )
    train, val = tiny_loaders(n=64, seed=0, signal=0.3)[0], tiny_loaders(n=64, seed=1, signal=0.1)[1]
    trainer = Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, train, val)
    model.fit_metrics = dict(trainer.callback_metrics)  # before any test run replaces them
    return model, trainer, val


def test_stored_values_are_the_ones_fitted_on_validation(fitted):
    model, _, val = fitted
    logits, targets = _outputs(model, val)
    temperature = fit_temperature(logits, targets, "binary")
    assert float(model.temperature) == pytest.approx(temperature, rel=1e-4)
    threshold = fit_threshold((logits / temperature).sigmoid(), targets, "youden")
    assert float(model.decision_threshold) == pytest.approx(threshold, abs=1e-6)


def test_test_applies_the_stored_threshold_without_refitting(fitted):
    model, trainer, _ = fitted
    _, other = tiny_loaders(n=64, seed=7, signal=0.1)  # another split
    stored = float(model.decision_threshold)
    logits, targets = _outputs(model, other)
    probs = model.predict_proba(logits)
    refit = fit_threshold(probs, targets, "youden")
    assert refit != pytest.approx(stored)  # otherwise this test could not tell the two apart
    results = trainer.test(model, other, verbose=False)[0]
    assert results["test/threshold"] == pytest.approx(stored)
    assert float(model.decision_threshold) == pytest.approx(stored)
    expected_acc = ((probs >= stored).long() == targets).float().mean().item()
    assert results["test/acc"] == pytest.approx(expected_acc)
    positives = targets == 1
    assert results["test/sensitivity"] == pytest.approx((probs[positives] >= stored).float().mean().item())


def test_validation_decision_metrics_use_this_epochs_threshold(fitted):
    model, _, val = fitted
    logits, targets = _outputs(model, val)
    decisions = (model.predict_proba(logits) >= model.decision_threshold).long()
    expected = (decisions == targets).float().mean().item()
    assert float(model.fit_metrics["val/acc"]) == pytest.approx(expected)


def test_thresholds_travel_in_the_checkpoint(fitted, tmp_path):
    model, trainer, _ = fitted
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = ClassifierModule.load_from_checkpoint(tmp_path / "model.ckpt", pretrained="none", weights_only=True)
    assert float(restored.decision_threshold) == float(model.decision_threshold)
    assert float(restored.temperature) == float(model.temperature)


def test_abstention_band_decides_on_the_target_share_of_validation_cases(fitted):
    model, _, val = fitted
    logits, _ = _outputs(model, val)
    probs = model.predict_proba(logits)
    decided = ~model.abstains(probs)
    assert decided.float().mean() >= 0.9  # target_coverage default
    confidence = model.confidence(probs)
    assert (confidence[decided] >= confidence[~decided].max()).all() if (~decided).any() else True
    low, high = model.abstention_band
    # the band's edges are the cut-off case's probability up to rounding (1 - (1 - p) need not be p): off the edges
    # the band is exactly the rule
    off_edge = ((probs - low).abs() > 1e-12) & ((probs - high).abs() > 1e-12)
    assert off_edge.sum() >= len(probs) - 2
    torch.testing.assert_close(decided[off_edge], ((probs <= low) | (probs >= high))[off_edge])
