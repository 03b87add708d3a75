"""Decision thresholds chosen on validation data by a named policy: a point on torchmetrics' ROC or
precision-recall curve (a case is positive when its probability is ``>=`` the threshold)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc
from torchmetrics.utilities import rank_zero_warn

__all__ = ["ThresholdPolicy", "fit_threshold", "fit_thresholds"]

ThresholdPolicy = Literal["fixed", "youden", "target_sensitivity", "target_specificity", "f1"]
_POLICIES = get_args(ThresholdPolicy)


def _check(probs: Tensor, target: Tensor, policy: str, target_value: float) -> None:
    if policy not in _POLICIES:
        raise ValueError(f"Expected argument `policy` to be one of {_POLICIES}, but got {policy!r}")
    if not 0.0 < target_value <= 1.0:
        raise ValueError(f"Expected argument `target_value` to be in (0, 1], but got {target_value}")
    if probs.numel() == 0:
        raise ValueError("Cannot fit a threshold on an empty batch")
    if probs.shape != target.shape:
        raise ValueError(f"Expected `probs` and `target` of the same shape, but got {probs.shape} and {target.shape}")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("Expected `probs` to be probabilities in [0, 1] without NaN")


def fit_threshold(
    probs: Tensor, target: Tensor, policy: ThresholdPolicy = "youden", target_value: float = 0.9, default: float = 0.5
) -> float:
    """Pick a threshold for one binary problem.

    ``fixed``: ``default`` (also when ``target`` holds one class); ``youden``: max sensitivity + specificity - 1;
    ``target_sensitivity``: the highest threshold whose sensitivity reaches ``target_value``;
    ``target_specificity``: the lowest whose specificity reaches it; ``f1``: max F1.
    """
    _check(probs, target, policy, target_value)
    target = target.long()
    if policy == "fixed" or target.min() == target.max():
        return float(default)
    if policy == "f1":
        precision, recall, thresholds = binary_precision_recall_curve(probs, target)
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clamp_min(1e-12)
        return float(thresholds[int(torch.argmax(f1))])
    fpr, tpr, thresholds = binary_roc(probs, target)  # thresholds decrease; tpr and fpr increase
    if policy == "youden":
        index = int(torch.argmax(tpr - fpr))
    elif policy == "target_sensitivity":
        index = int(torch.nonzero(tpr >= target_value - 1e-12)[0])
    else:  # target_specificity
        index = int(torch.nonzero(1 - fpr >= target_value - 1e-12)[-1])
    threshold = float(thresholds[index])
    if policy != "youden":
        called = probs >= threshold
        rate = "sensitivity" if policy == "target_sensitivity" else "specificity"
        reached = float((called[target == 1] if rate == "sensitivity" else ~called[target == 0]).double().mean())
        if reached < target_value - 1e-12:
            rank_zero_warn(
                f"No threshold reaches {rate} {target_value} on these {len(probs)} cases: the best, {threshold}, "
                f"gives {reached:.4f} ({int((probs >= 1).sum())} case(s) have probability 1.0).\n"
                "HINT: lower threshold_target, or calibrate the model (temperature_scaling) so fewer cases saturate."
            )
    return threshold


def fit_thresholds(
    probs: Tensor, target: Tensor, policy: ThresholdPolicy = "youden", target_value: float = 0.9, default: float = 0.5
) -> Tensor:
    """Thresholds for a binary ``(N,)`` task (returns shape ``(1,)``) or per label of a ``(N, L)`` task, in float64
    like the probabilities (a float32 copy of a case's probability may round above it and flip its decision)."""
    columns = [probs] if probs.ndim == 1 else [probs[:, j] for j in range(probs.shape[1])]
    targets = [target] if probs.ndim == 1 else [target[:, j] for j in range(probs.shape[1])]
    fitted = [fit_threshold(p, t, policy, target_value, default) for p, t in zip(columns, targets, strict=True)]
    return torch.tensor(fitted, dtype=torch.float64)
