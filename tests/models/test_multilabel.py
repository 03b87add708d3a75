"""Multi-label task: one sigmoid per label, per-label thresholds and bands, weighted BCE, per-label report."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.models.classifier import ClassifierModule
from medtransfer.tracking.report import TestReportPlots


class TwoFindings(LightningDataModule):
    """Noise images with two independent findings: a bright centre, and a bright left edge (rarer)."""

    class_names = ("centre", "edge")

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.stack([torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.25], 1).float()
        images = torch.randn(n, 3, 32, 32, generator=g)
        images[:, :, 8:24, 8:24] += 0.8 * self.targets[:, 0].view(-1, 1, 1, 1)
        images[:, :, :, :6] += 0.8 * self.targets[:, 1].view(-1, 1, 1, 1)
        self.dataset = TensorDataset(images, self.targets)

    @property
    def positive_fraction(self) -> torch.Tensor:
        return self.targets.mean(0)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=32)

    def test_dataloader(self):
        return DataLoader(self.dataset, batch_size=32)


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    seed_everything(0)
    model = ClassifierModule(backbone="resnet10t", pretrained="none", task="multilabel", num_classes=2,
                             class_weighting="balanced")  # fmt: skip
    data = TwoFindings()
    report = TestReportPlots(dirpath=str(tmp_path_factory.mktemp("report")))
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[report])  # fmt: skip
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)[0]
    return model, data, results, report


def test_balanced_weighting_uses_training_label_frequencies(tested):
    model, data, _, _ = tested
    fraction = data.positive_fraction
    torch.testing.assert_close(model.pos_weight, (1 - fraction) / fraction)


def test_thresholds_and_band_are_fitted_per_label(tested):
    model, data, _, _ = tested
    assert model.decision_threshold.shape == (2,) and model.min_confidence.shape == (2,)
    probs = model.predict_proba(model(data.dataset.tensors[0]).detach())
    assert probs.shape == (96, 2) and model.abstains(probs).shape == (96, 2)
    decided_share = (~model.abstains(probs)).float().mean(0)
    assert (decided_share >= 0.9).all()  # default target_coverage, on the data it was fitted on


def test_test_logs_per_label_auroc_and_writes_the_table(tested):
    _, _, results, report = tested
    assert {"test/auroc", "test/auroc/centre", "test/auroc/edge", "test/aurc", "test/ece"} <= set(results)
    assert results["test/auroc"] == pytest.approx((results["test/auroc/centre"] + results["test/auroc/edge"]) / 2)
    table, evaluation, *figures = report.paths
    assert evaluation.name == "evaluation.csv"
    # docs/decisions.md's four figures: per label (ROC, decision counts) or pooled (risk-coverage, reliability)
    assert sorted(p.name for p in figures) == ["confusion.png", "reliability.png", "risk_coverage.png", "roc.png"]
    assert all(p.stat().st_size > 10_000 for p in figures)
    lines = table.read_text().splitlines()
    assert lines[0].startswith("label,auroc,aurc") and [line.split(",")[0] for line in lines[1:]] == ["centre", "edge"]


def test_test_logs_the_prevalence_estimate_and_the_adapted_decisions_beside_the_rest(tested):
    """A model with calibration shares adds, per finding, the true test shares, their EM estimate and interval and
    the calibration's, and the adapted decisions' accuracy, ECE and selective accuracy; every other metric is what
    the same model without the shares logs."""
    model, data, results, _ = tested
    for j, name in enumerate(data.class_names):
        assert results[f"test/prevalence/true/{name}"] == pytest.approx(float(data.targets[:, j].mean()))
        assert results[f"test/prevalence/calibration/{name}"] == pytest.approx(model.calibration["prevalence"][j])
        low, high = results[f"test/prevalence/estimated_low/{name}"], results[f"test/prevalence/estimated_high/{name}"]
        assert 0 < low <= results[f"test/prevalence/estimated/{name}"] <= high < 1
    assert all(0 <= results[f"test/adapted/{k}"] <= 1 for k in ("acc", "ece", "selective_acc_cov80"))
    added = {k for k in results if k.startswith(("test/prevalence/", "test/adapted/"))}
    assert len(added) == 5 * len(data.class_names) + 3
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with_shares = trainer.test(model, datamodule=data, verbose=False)[0]  # the model as other tests left it
    record = model.calibration
    model.calibration = {k: v for k, v in record.items() if k != "prevalence"}  # as calibrated before shares
    try:
        without = trainer.test(model, datamodule=data, verbose=False)[0]
    finally:
        model.calibration = record
    assert set(with_shares) - set(without) == added
    assert without == {k: v for k, v in with_shares.items() if k not in added}


def test_abstention_band_is_binary_only(tested):
    model, *_ = tested
    with pytest.raises(ValueError, match="binary"):
        _ = model.abstention_band


class WithAbsentFinding(TwoFindings):
    """TwoFindings plus a third finding that no image has (as Hernia in a small ChestX-ray14 split)."""

    class_names = ("centre", "edge", "absent")

    def __init__(self) -> None:
        super().__init__()
        images, targets = self.dataset.tensors
        self.targets = torch.cat([targets, torch.zeros(len(targets), 1)], 1)
        self.dataset = TensorDataset(images, self.targets)


@pytest.fixture(scope="module")
def absent(tmp_path_factory):
    seed_everything(0)
    model = ClassifierModule(backbone="resnet10t", pretrained="none", task="multilabel", num_classes=3,
                             class_weighting="balanced")  # fmt: skip
    report = TestReportPlots(dirpath=str(tmp_path_factory.mktemp("report")))
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[report])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=WithAbsentFinding())
        val_metrics = dict(trainer.callback_metrics)
        results = trainer.test(model, datamodule=WithAbsentFinding(), verbose=False)[0]
    return model, results, val_metrics, report, [str(w.message) for w in caught]


def test_balanced_weighting_gives_a_label_without_positives_weight_one_and_names_it(absent):
    model, *_, messages = absent
    assert model.pos_weight[2].item() == 1.0 and model.pos_weight[0].item() == pytest.approx(1.0, abs=0.5)
    assert any("class_weighting='balanced'" in m and "absent" in m for m in messages)


def test_undefined_label_is_left_out_of_means_and_named_once_per_stage(absent):
    _, results, val_metrics, _, messages = absent
    assert val_metrics["val/auroc_labels_defined"] == 2 and results["test/auroc_labels_defined"] == 2
    assert "test/auroc/absent" not in results and {"test/auroc/centre", "test/auroc/edge"} <= set(results)
    assert results["test/auroc"] == pytest.approx((results["test/auroc/centre"] + results["test/auroc/edge"]) / 2)
    for stage in ("val", "test"):  # two validation epochs, one warning
        assert sum(m.startswith(f"{stage}: 1 of 3 label(s)") and "absent" in m for m in messages) == 1
    assert not any("No positive samples in targets" in m for m in messages)


def test_test_writes_evaluates_table_with_the_same_means(absent):
    _, results, _, report, _ = absent
    table = pd.read_csv(next(p for p in report.paths if p.name == "evaluation.csv"), index_col="class")
    assert list(table.index) == ["centre", "edge", "absent", "mean"]
    assert table.loc["absent", ["auroc", "aurc", "sel_acc_90"]].isna().all() and table.loc["absent", "positives"] == 0
    assert table.loc["mean", "auroc"] == pytest.approx(results["test/auroc"], abs=1e-6)
    assert table.loc["mean", "aurc"] == pytest.approx(results["test/aurc"], abs=1e-6)
    per_label = pd.read_csv(next(p for p in report.paths if p.name == "per_label.csv"))
    assert per_label["auroc"].isna().tolist() == [False, False, True]  # NaN, never 0


def test_balanced_weight_is_bounded_for_labels_without_positives_or_negatives():
    from medtransfer.models.classifier import balanced_pos_weight

    with pytest.warns(UserWarning, match=r"2 label\(s\).*: never, always\..*weight is 1"):
        weight = balanced_pos_weight(torch.tensor([0.25, 0.0, 1.0]), ["rare", "never", "always"])
    assert weight.tolist() == [3.0, 1.0, 1.0]  # never the 1e6 of a clamped fraction
