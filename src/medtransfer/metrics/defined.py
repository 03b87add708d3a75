"""Per-label metrics that exist only where a label has both positive and negative cases.

torchmetrics scores a label without positives (ChestX-ray14's Hernia in a small split) 0 and averages that 0
into the macro mean; here such labels are *undefined*: NaN, left out of the mean, and counted
(``val/auroc_labels_defined``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import AUROC, Accuracy, Recall, Specificity

__all__ = ["DefinedMean", "defined_labels", "mask_undefined", "stage_metrics", "undefined_names"]

#: torchmetrics' warnings for a label without positives/negatives: replaced by one warning that names the labels.
_TORCHMETRICS_EMPTY_CLASS = r"No (positive|negative) samples in targets"


def defined_labels(target: Tensor) -> Tensor:
    """``(L,)`` bool for ``(N, L)`` 0/1 targets, or ``()`` for ``(N,)``: True where a label has a positive and a
    negative case.

    Example:
        >>> defined_labels(torch.tensor([[1, 0, 1], [0, 0, 1]]))
        tensor([ True, False, False])
    """
    positives = target.to(torch.float64).sum(0)
    return (positives > 0) & (positives < target.shape[0])


def mask_undefined(values: Tensor, defined: Tensor) -> Tensor:
    """``values`` (per label, or a scalar) as float64 with NaN where the label is not ``defined``."""
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    return torch.where(defined.cpu(), values, torch.full_like(values, math.nan))


def undefined_names(defined: Tensor, names: Sequence[Any] | None) -> list[str]:
    """Names of the labels that are not defined (indices when ``names`` is None)."""
    flags = defined.reshape(-1).tolist()
    names = list(names) if names is not None and len(names) == len(flags) else list(range(len(flags)))
    return [str(name) for name, ok in zip(names, flags, strict=True) if not ok]


class DefinedMean(Metric):
    """Macro mean of a per-label torchmetrics ``metric`` (``average=None``, or binary) over the ``num_labels``
    labels defined in the data seen (NaN when none is); ``per_label()`` gives the values, NaN where undefined."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    positives: Tensor
    count: Tensor

    def __init__(self, metric: Metric, num_labels: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric = metric
        self.add_state("positives", torch.zeros(num_labels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.metric.update(preds, target)
        self.positives += target.to(torch.float64).reshape(len(target), -1).sum(0)
        self.count += len(target)

    @property
    def defined(self) -> Tensor:
        return (self.positives > 0) & (self.positives < self.count)

    def per_label(self) -> Tensor:
        with warnings.catch_warnings():  # named once by the module instead, see undefined_names
            warnings.filterwarnings("ignore", message=_TORCHMETRICS_EMPTY_CLASS)
            values = self.metric.compute().reshape(-1)
        return mask_undefined(values, self.defined.to(values.device))

    def compute(self) -> Tensor:
        values = self.per_label()
        return values.nanmean() if bool(self.defined.any()) else torch.tensor(math.nan, dtype=torch.float64)

    def reset(self) -> None:
        super().reset()
        self.metric.reset()


def stage_metrics(
    task: Literal["binary", "multiclass", "multilabel"], num_classes: int, stage: str
) -> MetricCollection:
    """The metrics of one stage (``train``, ``val``, ``test``) of the module and ``baseline``: AUROC over
    probabilities; accuracy (and, for binary and multi-label tasks, sensitivity/specificity) over decisions."""
    kwargs: dict[str, Any] = {"task": task}
    if task == "multiclass":
        kwargs["num_classes"] = num_classes
    elif task == "multilabel":
        kwargs["num_labels"] = num_classes  # macro averages over labels
    metrics = {"auroc": AUROC(**kwargs), "acc": Accuracy(**kwargs)}
    if task != "multiclass":
        # a label without positives (or negatives) has no AUROC/sensitivity/specificity: left out of the mean
        per_label = {"average": None} if task == "multilabel" else {}
        labels = num_classes if task == "multilabel" else 1
        for name, metric in (("auroc", AUROC), ("sensitivity", Recall), ("specificity", Specificity)):
            metrics[name] = DefinedMean(metric(**kwargs, **per_label), labels)
    # no compute groups: the DefinedMean wrappers hold equal states and would be merged into one
    return MetricCollection(metrics, prefix=f"{stage}/", compute_groups=False)
