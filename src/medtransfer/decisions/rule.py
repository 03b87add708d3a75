"""How probabilities become decisions: threshold(s) and the abstention band that refers a case. Kept apart from
the network so an exported model (probabilities only) decides exactly as the checkpoint does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from medtransfer.decisions.risk_control import aps_sets
from medtransfer.metrics import functional as F
from medtransfer.task import Task

__all__ = ["DecisionRule"]


@dataclass(frozen=True)
class DecisionRule:
    """Decisions and referrals from probabilities: ``threshold`` (binary, or per label; unused for multi-class),
    ``min_confidence`` below which a case (label) is referred, and the multi-class conformal ``set_quantile``
    (a case whose set holds more than one class is referred; ``None``: no sets)."""

    task: Task
    threshold: Tensor
    min_confidence: Tensor
    confidence_score: F.Score = "decision_prob"
    set_quantile: float | None = None

    def decide(self, probs: Tensor) -> Tensor:
        """Predicted labels: ``probs >= threshold`` (per label), or the most probable class."""
        if self.task == "multiclass":
            return probs.argmax(dim=-1)
        return (probs >= self.threshold.to(probs.device)).long()

    def confidence(self, probs: Tensor) -> Tensor:
        """How sure each decision is (see ``confidence_score``), around the threshold(s)."""
        threshold = self.threshold.to(probs.device) if self.task == "multilabel" else float(self.threshold)
        return F.confidence_scores(probs, self.task, threshold, self.confidence_score)

    def abstains(self, probs: Tensor) -> Tensor:
        """True where the case (label) is referred: in the abstention band, or a set of several classes."""
        referred = self.confidence(probs) < self.min_confidence.to(probs.device)
        if self.task == "multiclass" and self.set_quantile is not None:
            referred |= self.prediction_sets(probs).sum(dim=-1) > 1
        return referred

    @property
    def abstention_band(self) -> tuple[float, float]:
        """Binary tasks: probabilities strictly between ``(low, high)`` are referred."""
        if self.task != "binary":
            raise ValueError("abstention_band describes a binary task; use `abstains(probs)` for the others")
        t, m = float(self.threshold), float(self.min_confidence)
        if self.confidence_score == "margin":
            return max(0.0, t - m), min(1.0, t + m)
        centre = t if self.confidence_score == "decision_prob" else 0.5
        return min(centre, 1.0 - m), max(centre, m)

    def prediction_sets(self, probs: Tensor) -> Tensor:
        """Multi-class: ``(N, C)`` booleans, the conformal set of each case."""
        if self.task != "multiclass" or self.set_quantile is None:
            raise ValueError("prediction_sets needs a multi-class rule fitted with `set_alpha` (a set_quantile)")
        sets = aps_sets(probs.detach().double().cpu().numpy(), self.set_quantile)
        return torch.from_numpy(sets).to(probs.device)

    def positives(self, probs: Tensor) -> Tensor:
        """0/1 decisions per column (one-hot class for multi-class), for the exchangeability check."""
        decisions = self.decide(probs)
        return torch.nn.functional.one_hot(decisions, probs.shape[-1]) if self.task == "multiclass" else decisions

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, for MLflow model metadata."""
        values = {
            "task": self.task,
            "threshold": self.threshold.tolist(),
            "min_confidence": self.min_confidence.tolist(),
            "confidence_score": self.confidence_score,
        }
        if self.set_quantile is not None:
            values["set_quantile"] = self.set_quantile
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecisionRule:
        """The rule ``to_dict`` wrote."""
        return cls(
            task=values["task"],
            threshold=torch.tensor(values["threshold"], dtype=torch.float64),
            min_confidence=torch.tensor(values["min_confidence"], dtype=torch.float64),
            confidence_score=values.get("confidence_score", "margin"),
            set_quantile=values.get("set_quantile"),
        )
