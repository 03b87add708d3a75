"""Test-time augmentation: logits averaged over small shifts and scalings of each image, no flips (a radiograph's
sides are not interchangeable); fixed affine warps, so validation, test, predict and export see the same views."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["TestTimeAugmentation", "augmented_views"]

TestTimeAugmentation = Literal["none", "shift_scale"]

#: ``shift_scale``: identity; shifts by 5 % of the side left, right, up and down; zoom in and out by 10 %.
_SHIFT, _ZOOM = 0.1, 1.1  # affine_grid works in [-1, 1], so 0.1 is 5 % of the side
_VIEWS = ((1.0, 0.0, 0.0), (1.0, _SHIFT, 0.0), (1.0, -_SHIFT, 0.0), (1.0, 0.0, _SHIFT), (1.0, 0.0, -_SHIFT),
          (1 / _ZOOM, 0.0, 0.0), (_ZOOM, 0.0, 0.0))  # fmt: skip
#: Per kind, the ``(V, 2, 3)`` affine matrices of its views (scale, x shift, y shift).
_THETAS = {"shift_scale": torch.tensor([[[s, 0.0, x], [0.0, s, y]] for s, x, y in _VIEWS])}


def augmented_views(x: Tensor, kind: TestTimeAugmentation) -> Tensor:
    """``(V * N, C, H, W)``: every view of the batch ``x``, view by view (the first view is ``x`` itself)."""
    if kind == "none":
        return x
    thetas = _THETAS[kind].to(dtype=x.dtype, device=x.device)
    n = x.shape[0]
    theta = thetas.repeat_interleave(n, dim=0)
    grid = F.affine_grid(theta, [theta.shape[0], *x.shape[1:]], align_corners=False)
    return F.grid_sample(x.repeat(len(thetas), 1, 1, 1), grid, padding_mode="border", align_corners=False)


def average_views(logits: Tensor, batch_size: int) -> Tensor:
    """Mean over views of ``(V * N, ...)`` logits, back to ``(N, ...)``."""
    return logits.reshape(-1, batch_size, *logits.shape[1:]).mean(dim=0)
