"""ClassifierModule: outputs, losses and optimizer groups for binary and multi-class tasks."""

from __future__ import annotations

import pytest
import torch

from medtransfer.models.classifier import ClassifierModule, probabilities


def test_binary_task_has_one_logit_and_probabilities_in_unit_interval():
    model = ClassifierModule(backbone="resnet18", pretrained="none", task="binary", num_classes=2)
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4,)
    loss, logits, _ = model.model_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])))
    probs = model.predict_proba(logits)
    assert loss.ndim == 0 and probs.shape == (4,) and bool(((probs >= 0) & (probs <= 1)).all())


def test_multiclass_task_has_softmax_over_classes():
    model = ClassifierModule(backbone="resnet18", pretrained="none", task="multiclass", num_classes=5)
    _, logits, _ = model.model_step((torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])))
    probs = model.predict_proba(logits)
    assert probs.shape == (3, 5) and probs.dtype == torch.float64  # float64: see the next test
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, dtype=torch.float64))


def test_confident_cases_keep_the_order_of_their_logits():
    """float32 sigmoid rounds every logit above about 17 to 1.0, a tie block that ranking could not split."""
    logits = torch.tensor([17.0, 20.0, 25.0, 30.0, -20.0, -25.0])
    assert len(set(torch.sigmoid(logits).tolist())) < 6  # the float32 tie this guards against
    probs = probabilities(logits, torch.tensor(1.0), "binary")
    assert len(set(probs.tolist())) == 6 and bool((probs[:4].diff() > 0).all() and probs[5] < probs[4])


def test_grayscale_input_with_one_channel_backbone():
    model = ClassifierModule(backbone="resnet18", pretrained="none", in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2,)


def test_optimizer_groups_are_named_and_skip_frozen_parameters():
    model = ClassifierModule(backbone="resnet18", pretrained="none")
    assert [g["name"] for g in model.configure_optimizers().param_groups] == ["head", "backbone"]
    for p in model.backbone.parameters():
        p.requires_grad = False
    assert [g["name"] for g in model.configure_optimizers().param_groups] == ["head"]


def test_input_spec_comes_from_timm():
    model = ClassifierModule(backbone="resnet18", pretrained="none")
    assert model.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize(("task", "num_classes"), [("binary", 3), ("multiclass", 1)])
def test_inconsistent_task_and_class_count_is_rejected(task, num_classes):
    with pytest.raises(ValueError, match="Expected argument `num_classes`"):
        ClassifierModule(backbone="resnet18", pretrained="none", task=task, num_classes=num_classes)


def test_temperature_and_threshold_shape_probabilities_and_decisions():
    model = ClassifierModule(backbone="resnet18", pretrained="none")
    logits = torch.tensor([-1.0, 0.2, 2.0])
    model.temperature.fill_(2.0)
    torch.testing.assert_close(model.predict_proba(logits), (logits.double() / 2).sigmoid())
    model.decision_threshold.fill_(0.6)
    assert model.decide(torch.tensor([0.3, 0.6, 0.9])).tolist() == [0, 1, 1]
    assert {"decision_threshold", "temperature"} <= set(model.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"target_coverage": 0.0}, "target_coverage"), ({"target_coverage": 1.2}, "target_coverage"),
                          ({"target_risk": -0.1}, "target_risk")],
)  # fmt: skip
def test_out_of_range_selection_targets_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=f"Expected argument `{match}`"):
        ClassifierModule(backbone="resnet18", pretrained="none", **kwargs)
