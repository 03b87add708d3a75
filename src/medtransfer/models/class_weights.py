"""Class weighting of the loss: CheXNet's balanced weight of positives per label."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medtransfer.metrics.defined import undefined_names

__all__ = ["balanced_pos_weight"]


def balanced_pos_weight(fraction: Tensor | Any, names: list[str] | None = None) -> Tensor:
    """CheXNet's weight of positives, ``negatives / positives`` per label, from the training positive fractions.

    A label without positive (or negative) training cases gets weight 1 and a warning naming it, not a clamped
    ``1e6`` that makes the validation loss explode.
    """
    fraction = torch.as_tensor(fraction, dtype=torch.float32).reshape(-1)
    present = (fraction > 0) & (fraction < 1)
    weight = torch.where(present, (1 - fraction) / fraction.clamp(1e-12, 1), torch.ones_like(fraction))
    missing = undefined_names(present, names)
    if missing:
        rank_zero_warn(
            f"class_weighting='balanced': {len(missing)} label(s) have no positive or no negative training case: "
            f"{', '.join(missing)}. Their positive weight is 1 (unweighted), not negatives/positives.\n"
            "HINT: the model cannot learn these labels from this training split; drop them or enlarge the split."
        )
    return weight
