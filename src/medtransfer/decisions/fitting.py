"""Fit a :class:`DecisionRule` on held-out probabilities and record what it guarantees: one fitting for the network
(after every validation epoch) and ``baseline``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from medtransfer.decisions.prevalence import calibration_shares
from medtransfer.decisions.risk_control import (
    RiskControl,
    calibration_summary,
    control_selective_risk,
    fit_aps_quantile,
)
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.thresholds import ThresholdPolicy, fit_thresholds
from medtransfer.metrics import functional as F
from medtransfer.task import Task

__all__ = ["DecisionFitting", "calibration_metrics"]


@dataclass(frozen=True)
class DecisionFitting:
    """How a rule is fitted; the fields mean what ``ClassifierModule``'s arguments of the same names do, and are
    checked on construction."""

    task: Task
    threshold_policy: ThresholdPolicy = "youden"
    threshold_target: float = 0.9
    confidence_score: F.Score = "decision_prob"
    target_coverage: float = 0.9
    target_risk: float | None = None
    delta: float | None = None
    set_alpha: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.target_coverage <= 1.0:
            raise ValueError(f"Expected argument `target_coverage` to be in (0, 1], but got {self.target_coverage}")
        if self.target_risk is not None and not 0.0 <= self.target_risk <= 1.0:
            raise ValueError(f"Expected argument `target_risk` to be in [0, 1], but got {self.target_risk}")
        for name, value in (("delta", self.delta), ("set_alpha", self.set_alpha)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"Expected argument `{name}` to be in (0, 1), but got {value}")
        if self.delta is not None and (self.target_risk is None or not 0.0 < self.target_risk < 1.0):
            raise ValueError(
                f"Expected argument `target_risk` to be in (0, 1) with `delta`, but got {self.target_risk}"
            )
        if self.set_alpha is not None and self.task != "multiclass":
            raise ValueError(f"Expected argument `set_alpha` only for a multiclass task, but got task={self.task!r}")

    def fit(self, probs: Tensor, targets: Tensor, source: str = "val") -> tuple[DecisionRule, dict[str, Any]]:
        """The rule fitted on ``probs`` and ``targets``, and its calibration record (saved with a model, naming
        the ``source`` split)."""
        targets = targets.long()
        shape = (probs.shape[1],) if self.task == "multilabel" else ()
        threshold = torch.full(shape, 0.5, dtype=torch.float64)
        if self.task != "multiclass":
            threshold = fit_thresholds(probs, targets, self.threshold_policy, self.threshold_target).reshape(shape)
        rule = DecisionRule(self.task, threshold, torch.zeros(shape, dtype=torch.float64), self.confidence_score)
        min_confidence, controls = self.fit_min_confidence(rule, probs, targets)
        return self._record(replace(rule, min_confidence=min_confidence), probs, targets, source, controls)

    def fit_min_confidence(
        self, rule: DecisionRule, probs: Tensor, targets: Tensor
    ) -> tuple[Tensor, list[RiskControl] | None]:
        """The abstention cut-off(s) around ``rule``'s decisions for ``target_coverage`` (or ``target_risk``); with
        ``delta``, the certified cut-off (per label) of ``control_selective_risk`` and its results."""
        confidence, correct = rule.confidence(probs), rule.decide(probs) == targets
        shape = (probs.shape[1],) if self.task == "multilabel" else ()
        if self.delta is not None:
            columns = confidence.reshape(len(confidence), -1).cpu().numpy()
            hits = correct.reshape(len(correct), -1).cpu().numpy()
            controls = [
                control_selective_risk(columns[:, j], hits[:, j], self.target_risk, self.delta)
                for j in range(columns.shape[1])
            ]
            return torch.tensor([r.cutoff for r in controls], dtype=torch.float64).reshape(shape), controls
        if self.task == "multilabel":
            cutoffs = [self._cutoff(confidence[:, j], correct[:, j]) for j in range(shape[0])]
            return torch.tensor(cutoffs, dtype=torch.float64), None
        return torch.tensor(self._cutoff(confidence, correct), dtype=torch.float64), None

    def _cutoff(self, confidence: Tensor, correct: Tensor) -> float:
        coverage, risk, cutoffs = F.risk_coverage_curve(confidence, correct)
        if self.target_risk is not None:
            ok = torch.nonzero(risk <= self.target_risk + 1e-12)
            index = int(ok[-1]) if len(ok) else 0  # none meets it: keep only the most confident group
        else:
            index = int(torch.nonzero(coverage >= self.target_coverage - 1e-9)[0])
        return float(cutoffs[index])

    def _record(
        self, rule: DecisionRule, probs: Tensor, targets: Tensor, source: str, controls: list[RiskControl] | None
    ) -> tuple[DecisionRule, dict[str, Any]]:
        """The calibration record: class shares and soft confusion matrix (for prevalence estimation),
        exchangeability scores, risk control, and the sets' quantile (put in the rule)."""
        record: dict[str, Any] = {"source": source, "n": len(targets), **calibration_shares(probs, targets, self.task)}
        if self.set_alpha is not None:
            quantile = fit_aps_quantile(probs.cpu(), targets.cpu(), self.set_alpha)
            record |= {"set_alpha": self.set_alpha, "set_quantile": quantile}
            rule = replace(rule, set_quantile=float(quantile))
        record["scores"] = calibration_summary(rule.confidence(probs).cpu(), rule.positives(probs).cpu())
        if self.delta is not None:
            results = [asdict(r) for r in controls or []]
            record["risk_control"] = {"target_risk": self.target_risk, "delta": self.delta, "per_label": results}
        if self.set_alpha is not None:
            sets = rule.prediction_sets(probs)
            record["set_coverage"] = float(sets[torch.arange(len(targets)), targets].double().mean())
            record["set_size"] = float(sets.sum(-1).double().mean())
        return rule, record


def calibration_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The guarantee's numbers to log: ``calib/certified_coverage``, ``calib/certified``, ``calib/set_size``."""
    metrics: dict[str, float] = {}
    control = record.get("risk_control")
    if control is not None:
        results = control["per_label"]
        metrics["calib/certified_coverage"] = sum(r["coverage"] for r in results) / max(len(results), 1)
        metrics["calib/certified"] = float(all(r["certified"] for r in results))
    if "set_size" in record:
        metrics["calib/set_size"] = record["set_size"]
    return metrics
