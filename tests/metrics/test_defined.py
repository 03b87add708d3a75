"""Labels without positives or negatives are undefined: NaN per label, left out of macro means, never 0."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import AUROC, BinaryAUROC
from torchmetrics.functional.classification import binary_auroc

from medtransfer.metrics.defined import DefinedMean, defined_labels, mask_undefined, undefined_names


def _data():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(40, 3, generator=g) < 0.4).long()
    target[:, 1] = 0  # no positive
    target[:, 2] = 1  # no negative
    target[:2, 2] = 0  # ... now two negatives: defined
    probs = (0.5 * target + 0.5 * torch.rand(40, 3, generator=g)).clamp(0, 1)
    return probs, target


def test_defined_labels_need_a_positive_and_a_negative():
    _, target = _data()
    assert defined_labels(target).tolist() == [True, False, True]
    assert defined_labels(torch.zeros(5)).item() is False
    assert undefined_names(defined_labels(target), ["a", "b", "c"]) == ["b"]


def test_macro_mean_covers_defined_labels_only():
    probs, target = _data()
    metric = DefinedMean(AUROC(task="multilabel", num_labels=3, average=None), 3)
    for rows in (slice(0, 25), slice(25, 40)):  # state accumulates over batches
        metric.update(probs[rows], target[rows])
    per_label = metric.per_label()
    assert math.isnan(per_label[1]) and not per_label[[0, 2]].isnan().any()
    expected = [float(binary_auroc(probs[:, j], target[:, j])) for j in (0, 2)]
    assert per_label[[0, 2]].tolist() == pytest.approx(expected)
    assert float(metric.compute()) == pytest.approx(sum(expected) / 2)  # torchmetrics' macro would count 0
    metric.reset()
    assert metric.count == 0


def test_binary_metric_without_positives_is_nan_not_zero():
    metric = DefinedMean(BinaryAUROC(), 1)
    metric.update(torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0, 0, 0]))
    assert math.isnan(float(metric.compute()))


def test_mask_undefined_keeps_defined_values():
    out = mask_undefined(torch.tensor([0.3, 0.0]), torch.tensor([True, False]))
    assert out[0].item() == pytest.approx(0.3) and math.isnan(out[1])
