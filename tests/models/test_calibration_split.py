"""The decision rule is calibrated on a held-out calibration split, certifies its risk, stores what it
guarantees with the weights, and checks that test data look like the calibration data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_loaders
from lightning.pytorch import LightningDataModule, Trainer, seed_everything

from medtransfer.data.base import calibration_rows
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.decisions.risk_control import REFER_ALL, control_selective_risk
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.thresholds import fit_threshold
from medtransfer.models.classifier import ClassifierModule


class _HeldOut(LightningDataModule):
    """Train, val (checkpoint choice) and a separate calibration split."""

    def __init__(self) -> None:
        super().__init__()
        self.train, _ = tiny_loaders(n=64, seed=0, signal=0.3)
        _, self.val = tiny_loaders(n=64, seed=1, signal=0.1)
        _, self.calib = tiny_loaders(n=160, seed=2, signal=0.1)

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val

    def calibration_dataloader(self):
        return self.calib


def _outputs(model, loader):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in loader]), torch.cat([y for _, y in loader])


@pytest.fixture(scope="module")
def calibrated():
    seed_everything(0)
    model = ClassifierModule(backbone="resnet10t", pretrained="none", target_risk=0.3, delta=0.1)
    data = _HeldOut()
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return model, trainer, data


def test_rule_is_fitted_on_the_calibration_split_only(calibrated):
    model, _, data = calibrated
    logits, targets = _outputs(model, data.calib)
    probs = model.predict_proba(logits)
    assert float(model.decision_threshold) == pytest.approx(fit_threshold(probs, targets, "youden"), abs=1e-6)
    expected = control_selective_risk(model.confidence(probs), model.decide(probs) == targets, 0.3, 0.1)
    assert float(model.min_confidence) == pytest.approx(expected.cutoff)
    assert model.calibration["source"] == "calib" and model.calibration["n"] == 160
    (control,) = model.calibration["risk_control"]["per_label"]
    assert control["coverage"] == pytest.approx(expected.coverage)


def test_guarantee_travels_in_the_checkpoint_and_test_reports_it(calibrated, tmp_path):
    model, trainer, data = calibrated
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = ClassifierModule.load_from_checkpoint(tmp_path / "model.ckpt", pretrained="none", weights_only=True)
    assert restored.calibration == model.calibration
    results = Trainer(logger=False, enable_progress_bar=False).test(restored, data.val, verbose=False)[0]
    for key in ("test/calib_certified", "test/calib_risk_bound", "test/target_risk", "test/shift_ks_p"):
        assert key in results
    assert results["test/delta"] == pytest.approx(0.1)


def test_a_model_trained_before_calibration_was_recorded_loads_and_claims_nothing(calibrated, tmp_path):
    _, trainer, data = calibrated
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=True)
    del checkpoint["calibration"]  # what checkpoints written before this change hold
    for name in ("delta", "set_alpha"):
        checkpoint["hyper_parameters"].pop(name)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = ClassifierModule.load_from_checkpoint(tmp_path / "old.ckpt", pretrained="none", weights_only=True)
    assert old.calibration is None and old.decision_rule.set_quantile is None
    with pytest.warns(UserWarning, match="no calibration data .* no guarantee is claimed"):
        results = Trainer(logger=False, enable_progress_bar=False).test(old, data.val, verbose=False)[0]
    assert "test/shift_ks_p" not in results and "test/coverage" in results
    import cv2

    from medtransfer.commands.predict import run_predict

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((32, 32), 128, dtype=np.uint8))
    result = run_predict(str(tmp_path / "images"), str(tmp_path / "old.ckpt"), output=tmp_path / "out.csv")
    assert result.predicted == 1 and result.guarantee["calibrated"] is False
    assert "no guarantee claimed" in result.guarantee["message"]


def test_exchangeability_warns_on_shifted_test_data(calibrated):
    model, _, _ = calibrated
    _, shifted = tiny_loaders(n=200, seed=3, signal=4.0)  # far more confident than the calibration cases
    with pytest.warns(UserWarning, match=r"Exchangeability: .*DIFFER.*p="):
        results = Trainer(logger=False, enable_progress_bar=False).test(model, shifted, verbose=False)[0]
    assert results["test/shift_ks_p"] < 0.01


_OUTSIDE = [("delta", {"delta": 1.0, "target_risk": 0.1}), ("target_risk", {"delta": 0.1, "target_risk": 0.0}),
            ("set_alpha", {"task": "multiclass", "num_classes": 3, "set_alpha": 0.0})]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), _OUTSIDE)
def test_risk_arguments_outside_the_open_unit_interval_are_one_line_errors(name, kwargs):
    with pytest.raises(ValueError, match=rf"^Expected argument `{name}` to be in \(0, 1\)"):
        ClassifierModule(backbone="resnet10t", pretrained="none", **kwargs)


def test_refer_all_rule_refers_every_case():
    rule = DecisionRule("binary", torch.tensor(0.5), torch.tensor(REFER_ALL))
    assert rule.abstains(torch.tensor([0.0, 0.5, 1.0])).all()


def test_multiclass_sets_refer_cases_with_more_than_one_class_and_round_trip():
    rule = DecisionRule("multiclass", torch.tensor(0.5), torch.tensor(0.0), set_quantile=0.8)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1]])
    assert rule.prediction_sets(probs).tolist() == [[True, False, False], [True, True, False]]
    assert rule.abstains(probs).tolist() == [False, True]
    assert DecisionRule.from_dict(rule.to_dict()).set_quantile == 0.8
    assert DecisionRule.from_dict({"task": "multiclass", "threshold": 0.5, "min_confidence": 0.0}).set_quantile is None
    assert DecisionRule("multiclass", torch.tensor(0.5), torch.tensor(0.0), set_quantile=math.inf).abstains(probs).all()


def test_calibration_split_is_held_out_of_validation_stratified(pneumonia_npz):
    data = MedMNISTDataModule(path=str(pneumonia_npz), calibration_fraction=0.5, image_size=32, mean=[0.5] * 3,
                              std=[0.5] * 3)  # fmt: skip
    data.setup("fit")
    val, calib = data.datasets["val"].targets, data.datasets["calib"].targets
    assert len(val) + len(calib) == 524 and abs(len(calib) - 262) <= 1
    assert abs(calib.mean() - val.mean()) < 0.01  # same class balance
    assert data.calibration_dataloader() is not None
    assert MedMNISTDataModule(path=str(pneumonia_npz)).calibration_dataloader() is None


def test_calibration_rows_keep_each_patient_on_one_side():
    patients = np.repeat(np.arange(40), 3)
    targets = np.repeat(np.arange(40) % 2, 3)
    rows = calibration_rows(targets, 0.25, seed=0, groups=patients)
    assert set(patients[rows]).isdisjoint(set(np.delete(patients, rows)))
    assert len(set(patients[rows])) == 10


def test_calibration_fraction_outside_zero_one_is_an_error(pneumonia_npz):
    with pytest.raises(ValueError, match=r"`calibration_fraction` to be in \[0, 1\), but got 1.0"):
        MedMNISTDataModule(path=str(pneumonia_npz), calibration_fraction=1.0)


def test_risk_coverage_plot_draws_the_guaranteed_bound(calibrated):
    from medtransfer.decisions.report import selective_report
    from medtransfer.tracking.report import TestReportPlots

    model, _, data = calibrated
    logits, targets = _outputs(model, data.val)
    probs = model.predict_proba(logits)
    rule = model.decision_rule
    report = {name: float(value.nanmean()) for name, value in selective_report(rule, probs, targets).items()}
    figure = TestReportPlots.figures(rule, probs, targets, report, calibration=model.calibration)["risk_coverage"]
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert any(label.startswith("guaranteed risk <= 0.3 (prob. 90%)") for label in labels)


def test_evaluate_and_predict_check_their_scores_against_the_calibration_data(calibrated, tmp_path):
    import cv2
    import pandas as pd

    from medtransfer.commands.evaluate import run_evaluate
    from medtransfer.commands.predict import run_predict

    model, trainer, data = calibrated
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    logits, targets = _outputs(model, data.val)
    probs = model.predict_proba(logits).numpy()
    names = np.array(["negative", "positive"])
    pd.DataFrame({"id": range(len(probs)), "prob_negative": 1 - probs, "prob_positive": probs}).to_csv(
        tmp_path / "predictions.csv", index=False
    )
    pd.DataFrame({"id": range(len(probs)), "label": names[targets.numpy()]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    result = run_evaluate(tmp_path / "predictions.csv", tmp_path / "labels.csv", id_column="id",
                          label_format="single", task="binary", model=str(tmp_path / "model.ckpt"))  # fmt: skip
    verdict = result.guarantee
    assert verdict["calibrated"] and verdict["risk_control"]["target_risk"] == 0.3
    assert 0 <= verdict["exchangeability"]["ks_p_value"] <= 1

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (32, 32), dtype=np.uint8))
    result = run_predict(str(folder), str(tmp_path / "model.ckpt"), output=tmp_path / "out.csv")
    assert result.guarantee["calibrated"] and "ks_p_value" in result.guarantee["exchangeability"]
