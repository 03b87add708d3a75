"""torchmetrics ``Metric`` shells over :mod:`medtransfer.metrics.functional` for selective prediction.

Each metric keeps the confidence score, predicted label and target of every case (``dist_reduce_fx="cat"``,
so DDP ranks are gathered by torchmetrics, with no manual ``all_gather``) and computes its value from all
cases at once: ranking metrics cannot be summed per batch. ``update(probs, target)`` takes probabilities:
``(N,)`` (binary), ``(N, C)`` (multiclass) or ``(N, L)`` (multilabel, one result per label, shape ``(L,)``).

No installed library provides these metrics (torchmetrics 1.9 has none; torch-uncertainty, not a
dependency, covers multiclass AURC/AUGRC only, breaking ties by sort order): see the functional module.
For the expected calibration error use torchmetrics' ``CalibrationError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

from medtransfer.metrics import functional as F
from medtransfer.metrics.functional import Score, Task

__all__ = [
    "AUGRC",
    "AURC",
    "EAURC",
    "CoverageAtAccuracy",
    "CoverageAtRisk",
    "RiskCoverageCurve",
    "SelectiveAccuracy",
    "SelectiveMetricsAtCoverage",
]


class _SelectiveMetric(Metric):
    """Stores confidence, prediction and target per case; subclasses implement ``_compute`` only.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        score: how confident a decision is: ``max_prob`` or ``margin`` (see ``functional.confidence_scores``).
        threshold: decision threshold for binary/multilabel tasks (one float, or one per label); ignored for
            multiclass, which predicts the argmax.
        validate_args: check arguments here and inputs in every ``update``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better: bool | None = False
    full_state_update = False

    confidence: list[Tensor]
    preds: list[Tensor]
    target: list[Tensor]

    def __init__(
        self,
        task: Task = "binary",
        score: Score = "max_prob",
        threshold: float | Sequence[float] = 0.5,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if validate_args:
            _check_options(task, score, threshold)
        self.task = task
        self.score = score
        self.threshold: float | Tensor = threshold if isinstance(threshold, float | int) else torch.as_tensor(threshold)
        self.validate_args = validate_args
        for name in ("confidence", "preds", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: probabilities (see the module docstring) and 0/1 labels or class indices."""
        if self.validate_args:
            F._check_probs(probs, self.task)
            F._check_threshold(self.threshold, probs)
            F._check_target(target, probs, self.task)
        self.confidence.append(F.confidence_scores(probs, self.task, self.threshold, self.score, validate_args=False))
        self.preds.append(F.predictions(probs, self.task, self.threshold, validate_args=False))
        self.target.append(target.long())

    def compute(self) -> Any:
        """The metric over every case seen since the last ``reset``, on all DDP ranks."""
        confidence, preds, target = dim_zero_cat(self.confidence), dim_zero_cat(self.preds), dim_zero_cat(self.target)
        return self._compute(confidence, preds, target)

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Any:
        raise NotImplementedError


def _check_options(task: str, score: str, threshold: float | Sequence[float]) -> None:
    if task not in F._TASKS:
        raise ValueError(f"Expected argument `task` to be one of {F._TASKS}, but got {task!r}")
    if score not in F._SCORES:
        raise ValueError(f"Expected argument `score` to be one of {F._SCORES}, but got {score!r}")
    F._check_threshold(torch.as_tensor(threshold))  # the label count is checked against `probs` in `update`
    if task != "multilabel" and torch.as_tensor(threshold).ndim > 0:
        raise ValueError(f"Expected argument `threshold` to be a float for a {task} task, but got {threshold}")
    if task != "multiclass" and score == "max_prob" and bool((torch.as_tensor(threshold) != 0.5).any()):
        rank_zero_warn(
            f"score='max_prob' ranks cases by max(p, 1 - p), which ignores threshold={threshold}."
            " HINT: use score='margin' to rank by the distance |p - threshold| to the decision actually made."
        )


class RiskCoverageCurve(_SelectiveMetric):
    """Coverage, selective risk and thresholds at each distinct confidence (``functional.risk_coverage_curve``).

    ``compute`` returns a tuple of three ``(K,)`` tensors, or a list of such tuples (one per label).
    """

    higher_is_better = None

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Any:
        correct = preds == target
        if self.task != "multilabel":
            return F.risk_coverage_curve(confidence, correct)
        return [F.risk_coverage_curve(confidence[:, j], correct[:, j]) for j in range(confidence.shape[1])]


class AURC(_SelectiveMetric):
    r"""Area under the risk-coverage curve, :math:`\int_0^1 G(\phi)/\phi\, d\phi` (``functional.aurc``).

    Example:
        >>> metric = AURC(task="multiclass")
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), torch.tensor([0, 0, 0]))
        >>> metric.compute()
        tensor(0.2374)
    """

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return F.aurc(confidence, preds == target)


class EAURC(_SelectiveMetric):
    """AURC minus the AURC of an oracle ranking with the same error rate (``functional.eaurc``); 0 is perfect."""

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return F.eaurc(confidence, preds == target)


class AUGRC(_SelectiveMetric):
    """Area under the generalized risk-coverage curve, Traub et al. 2024 (``functional.augrc``)."""

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return F.augrc(confidence, preds == target)


class SelectiveAccuracy(_SelectiveMetric):
    """Accuracy on the most confident cases, at the smallest achievable coverage ``>= coverage``.

    Args:
        coverage: share of cases the model decides on, in (0, 1]; tie groups are kept whole.
        kwargs: see ``_SelectiveMetric`` (``task``, ``score``, ``threshold``, ``validate_args``, ...).

    Example:
        >>> metric = SelectiveAccuracy(coverage=0.5)
        >>> metric.update(torch.tensor([0.95, 0.1, 0.6, 0.45]), torch.tensor([1, 0, 0, 0]))
        >>> metric.compute()
        tensor(1.)
    """

    higher_is_better = True

    def __init__(self, coverage: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.validate_args:
            F._check_unit("coverage", coverage, low_open=True)
        self.coverage = coverage

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return 1 - F.selective_risk_at_coverage(confidence, preds == target, self.coverage)


class SelectiveMetricsAtCoverage(SelectiveAccuracy):
    """Achieved coverage, risk, accuracy, sensitivity and specificity at a target coverage (binary, multilabel).

    ``compute`` returns the dict of ``functional.selective_metrics_at_coverage`` (tensors of shape ``(L,)`` for
    a multilabel task).
    """

    higher_is_better = None

    def __init__(self, coverage: float = 0.9, **kwargs: Any) -> None:
        super().__init__(coverage, **kwargs)
        if self.task == "multiclass":
            raise ValueError("Expected argument `task` to be 'binary' or 'multilabel', but got 'multiclass'")

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> dict[str, Tensor]:
        return F.selective_metrics_at_coverage(confidence, preds, target, self.coverage)


class CoverageAtAccuracy(_SelectiveMetric):
    """Largest coverage whose selective accuracy is ``>= min_accuracy``, or 0 (``functional.coverage_at_accuracy``).

    Args:
        min_accuracy: the accuracy the accepted cases must reach, in [0, 1].
        kwargs: see ``_SelectiveMetric``.
    """

    higher_is_better = True

    def __init__(self, min_accuracy: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.validate_args:
            F._check_unit("min_accuracy", min_accuracy)
        self.min_accuracy = min_accuracy

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return F.coverage_at_accuracy(confidence, preds == target, self.min_accuracy)


class CoverageAtRisk(_SelectiveMetric):
    """Largest coverage whose selective risk is ``<= max_risk``, or 0 (``functional.coverage_at_risk``).

    Args:
        max_risk: the error rate the accepted cases may have, in [0, 1].
        kwargs: see ``_SelectiveMetric``.
    """

    higher_is_better = True

    def __init__(self, max_risk: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.validate_args:
            F._check_unit("max_risk", max_risk)
        self.max_risk = max_risk

    def _compute(self, confidence: Tensor, preds: Tensor, target: Tensor) -> Tensor:
        return F.coverage_at_risk(confidence, preds == target, self.max_risk)
