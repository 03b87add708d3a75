"""The one selective report of what a :class:`DecisionRule` does on labelled cases, written by the module's
``test``, by ``baseline`` and, per class, by ``evaluate``'s table (:func:`evaluation_table`); :func:`guarantee_report`
adds what the calibration promised and whether these cases look like the calibration data, and
:func:`prevalence_metrics` what adapting to the cases' estimated class shares would do."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, calibration_error, multilabel_auroc

from medtransfer.decisions.prevalence import adapt_probabilities, batch_prevalence
from medtransfer.decisions.risk_control import check_exchangeability
from medtransfer.decisions.rule import DecisionRule
from medtransfer.metrics import functional as F
from medtransfer.metrics.defined import defined_labels, mask_undefined
from medtransfer.task import Task

if TYPE_CHECKING:  # pandas (0.4 s) only when a table is made: predict imports this module
    import pandas as pd

__all__ = [
    "COVERAGES",
    "evaluation_table",
    "first_bad_probability",
    "guarantee_report",
    "prevalence_metrics",
    "report_metrics",
    "selective_report",
]

_logger = logging.getLogger(__name__)

#: Coverages of the selective accuracies (``selective_acc_cov80`` ..., ``evaluate``'s ``sel_acc_80`` ...).
COVERAGES: tuple[float, ...] = (0.80, 0.90, 0.95)
#: Accuracies of the coverages ``coverage_at_acc95`` and ``coverage_at_acc99``.
ACCURACIES: tuple[float, ...] = (0.95, 0.99)
_ECE_BINS = 15
#: Report entries that a label without positives or negatives does not have (NaN; means skip it).
_RANKING = ("aurc", "eaurc", "augrc", "selective_acc", "coverage_at_acc")


def selective_report(rule: DecisionRule, probs: Tensor, targets: Tensor, temperature: Any = 1.0) -> dict[str, Tensor]:
    """AURC, E-AURC, AUGRC, ECE, selective accuracy at :data:`COVERAGES`, coverage at 95/99 % accuracy, the
    abstention band's coverage and accuracy, the rule's threshold and cut-off, and ``temperature``.

    Float64 CPU tensors, per label for a multi-label rule; a label without positives or negatives gets NaN
    ranking entries, which the means skip.
    """
    task = rule.task
    confidence, correct = rule.confidence(probs), rule.decide(probs) == targets
    decided = ~rule.abstains(probs)
    if task == "multilabel":
        pairs = zip(probs.T, targets.T, strict=True)
        ece = torch.stack([calibration_error(p.contiguous(), y, "binary", n_bins=_ECE_BINS) for p, y in pairs])
    else:
        ece = calibration_error(probs, targets, task=task, num_classes=probs.shape[-1], n_bins=_ECE_BINS)
    accepted_correct = (correct & decided).sum(0).double()
    report = {
        "aurc": F.aurc(confidence, correct),
        "eaurc": F.eaurc(confidence, correct),
        "augrc": F.augrc(confidence, correct),
        "ece": ece,
        "coverage": decided.double().mean(0),
        "selective_acc": accepted_correct / decided.sum(0).double(),  # NaN when nothing is decided
        "threshold": rule.threshold,
        "min_confidence": rule.min_confidence,
        "temperature": temperature,
    }
    for coverage in COVERAGES:
        risk = F.selective_risk_at_coverage(confidence, correct, coverage)
        report[f"selective_acc_cov{round(coverage * 100)}"] = 1 - risk
    for accuracy in ACCURACIES:
        report[f"coverage_at_acc{round(accuracy * 100)}"] = F.coverage_at_accuracy(confidence, correct, accuracy)
    report = _as_float64(report)
    defined = defined_labels(targets) if task != "multiclass" else torch.tensor(True)
    return {k: mask_undefined(v, defined) if k.startswith(_RANKING) else v for k, v in report.items()}


def guarantee_report(
    rule: DecisionRule, calibration: dict[str, Any] | None, probs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """What the calibration promised (certified, risk bound, coverage; set coverage and size) and the
    exchangeability p-values on these cases; warns on a shift, or when there is no calibration record."""
    calibration, report = calibration or {}, {}
    control = calibration.get("risk_control")
    if control is not None:
        per_label = control["per_label"]
        for name in ("certified", "risk_bound", "coverage"):
            values = torch.tensor([float(r[name]) for r in per_label], dtype=torch.float64)
            report[f"calib_{name}"] = values if rule.task == "multilabel" else values[0]
        report["target_risk"], report["delta"] = control["target_risk"], control["delta"]
    if calibration.get("set_quantile") is not None:
        sets = rule.prediction_sets(probs)
        report["set_coverage"] = sets[torch.arange(len(targets)), targets].double().mean()
        report["set_size"] = sets.sum(-1).double().mean()
    scores = calibration.get("scores")
    if scores is None:
        rank_zero_warn(
            "This model holds no calibration data (trained before medtransfer recorded it): its abstention band "
            "is a validation point estimate and no guarantee is claimed. HINT: retrain to calibrate."
        )
        return _as_float64(report)
    check = check_exchangeability(scores, rule.confidence(probs).cpu(), rule.positives(probs).cpu())
    report["shift_ks_p"], report["shift_rate_p"] = check.ks_p_value, check.rate_p_value
    if check.shifted:
        rank_zero_warn(f"Exchangeability: {check.message()}. The calibration guarantee may not hold here.")
    return _as_float64(report)


def _as_float64(report: dict[str, Any]) -> dict[str, Tensor]:
    return {name: torch.as_tensor(value, dtype=torch.float64).cpu() for name, value in report.items()}


def report_metrics(
    report: dict[str, Tensor], probs: Tensor, targets: Tensor, names: Sequence[str], task: str, stage: str = "test"
) -> tuple[dict[str, float], dict[str, list] | None]:
    """The report as logged metrics (``<stage>/<name>``: the mean over labels), and for multi-label tasks each
    defined label's AUROC (``<stage>/auroc/<label>``) and the per-label table (``per_label.csv``)."""
    metrics = {f"{stage}/{name}": float(value.nanmean()) for name, value in report.items()}
    if task == "multiclass":
        return metrics, None
    defined = defined_labels(targets).reshape(-1)
    metrics[f"{stage}/auroc_labels_defined"] = float(defined.sum())
    if task != "multilabel":
        return metrics, None
    with warnings.catch_warnings():  # undefined labels are named once by the caller, and left out here
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
        auroc = mask_undefined(multilabel_auroc(probs, targets, probs.shape[1], average=None), defined).tolist()
    per_label = {"label": list(names), "auroc": auroc}
    per_label |= {name: value.tolist() for name, value in report.items() if value.ndim}
    for label, value, ok in zip(names, auroc, defined.tolist(), strict=True):
        if ok:  # undefined labels are left out, never logged as 0
            metrics[f"{stage}/auroc/{label}"] = value
    return metrics, per_label


def prevalence_metrics(
    rule: DecisionRule, calibration: dict[str, Any] | None, probs: Tensor, targets: Tensor, names: Sequence[str],
    stage: str = "test",
) -> dict[str, float]:  # fmt: skip
    """What ``predict --prevalence estimate`` would do on these labelled cases, as logged metrics: the true class
    shares (``<stage>/prevalence/true``), their EM estimate from the probabilities alone (``.../estimated``, with
    its 95 % bootstrap interval ``.../estimated_low``, ``.../estimated_high``) and the calibration's
    (``.../calibration``): the positive share for a binary task, else one per class or finding (``.../<name>``);
    and the accuracy, ECE and selective accuracy at 80 % coverage of the rule's decisions on the probabilities
    adapted to the estimate (``<stage>/adapted/...``, means over labels). Nothing without calibration shares in the
    model; the true shares alone when no estimate is possible (a warning says why)."""
    if "prevalence" not in (calibration or {}):
        return {}
    task, probs, targets = rule.task, probs.cpu(), targets.cpu()
    if task == "multiclass":
        true = torch.bincount(targets, minlength=probs.shape[-1]).double() / len(targets)
    else:
        true = targets.double().mean(0)  # the positive share (binary), per finding (multi-label)
    metrics = _shares(f"{stage}/prevalence/true", true, names)
    estimate = batch_prevalence(probs, calibration, task, "estimate")
    if estimate is None:
        return metrics
    positive = 1 if task == "binary" else slice(None)  # binary shares are [negative, positive]
    for key, value in (("estimated", estimate.estimated), ("estimated_low", estimate.interval[..., 0]),
                       ("estimated_high", estimate.interval[..., 1]), ("calibration", estimate.source)):  # fmt: skip
        metrics |= _shares(f"{stage}/prevalence/{key}", value[positive], names)
    adapted = adapt_probabilities(probs, estimate.source, estimate.estimated, task)
    report = selective_report(rule, adapted, targets)
    report["acc"] = (rule.decide(adapted) == targets).double().mean(0)
    for name in ("acc", "ece", "selective_acc_cov80"):
        metrics[f"{stage}/adapted/{name}"] = float(report[name].nanmean())
    return metrics


def _shares(key: str, shares: Tensor, names: Sequence[str]) -> dict[str, float]:
    """One share as ``key``, or one per class or finding as ``key/<name>``."""
    if shares.ndim == 0:
        return {key: float(shares)}
    return {f"{key}/{name}": float(share) for name, share in zip(names, shares, strict=True)}


# ------------------------------------------------------------------------------------------ evaluate's table
def evaluation_table(
    probs: np.ndarray | Tensor,
    targets: np.ndarray | Tensor,
    class_names: Sequence[str],
    task: Task = "multilabel",
    threshold: float | Sequence[float] = 0.5,
    score: F.Score = "decision_prob",
) -> pd.DataFrame:
    """Per-class metrics, one-vs-rest, plus a macro ``mean`` row (ignoring NaN), indexed by ``class``.

    Each class is scored as a binary problem by :func:`selective_report` of a rule at ``threshold`` (one, or one
    per scored class) ranking by ``score``: columns ``n``, ``positives``, ``auroc``, ``aurc``, ``ece``, ``accuracy`` and
    ``sel_acc_80/90/95``; a class without positives or negatives gets NaN, never 0. ``probs`` are ``(N, C)``, or
    for ``binary`` ``(N,)``, ``(N, 1)`` or ``(N, 2)`` (the last column positive); ``targets`` 0/1 like ``probs``
    or ``(N,)`` class indices.
    """
    probs = np.asarray(probs.cpu() if isinstance(probs, Tensor) else probs, dtype=np.float64)
    targets = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
    scores, labels, names = _one_vs_rest(probs, targets, list(class_names), task)
    scores, labels = torch.from_numpy(scores.copy()), torch.from_numpy(labels.copy())
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64).reshape(-1), (len(names),))
    rule = DecisionRule("multilabel", torch.tensor(thresholds.copy()), torch.zeros(len(names)), score)
    report = selective_report(rule, scores, labels)
    defined = defined_labels(labels)
    auroc = [float(binary_auroc(scores[:, k], labels[:, k])) if ok else math.nan for k, ok in enumerate(defined)]
    columns = {
        "n": np.full(len(names), len(scores)),
        "positives": labels.sum(0).numpy(),
        "auroc": np.asarray(auroc),
        "aurc": report["aurc"].numpy(),
        "ece": report["ece"].numpy(),
        "accuracy": (rule.decide(scores) == labels).double().mean(0).numpy(),
        **{f"sel_acc_{round(c * 100)}": report[f"selective_acc_cov{round(c * 100)}"].numpy() for c in COVERAGES},
    }
    import pandas as pd

    table = pd.DataFrame(columns, index=pd.Index(names, name="class"))
    mean = table.mean(numeric_only=True, skipna=True)
    mean["n"], mean["positives"] = len(scores), np.nan
    table.loc["mean"] = mean
    table["n"] = table["n"].astype("Int64")
    table["positives"] = table["positives"].round().astype("Int64")
    return table


def first_bad_probability(probs: np.ndarray) -> tuple[int, int, int] | None:
    """``(row, column, count)`` of the first value of ``(N, C)`` ``probs`` that is NaN or outside [0, 1], and how
    many there are; ``None`` when all are probabilities. The one check for ``evaluate``'s files and table."""
    bad = ~((probs >= 0.0) & (probs <= 1.0))
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(row), int(col), int(bad.sum())


def _one_vs_rest(
    probs: np.ndarray, targets: np.ndarray, class_names: list[str], task: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores (N, K) and 0/1 labels (N, K) of the K binary problems the table scores, and their names."""
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(
            f"Expected argument `probs` to have shape (N, {len(class_names)}) for {len(class_names)} class names, "
            f"but got {probs.shape}"
        )
    n, num_classes = probs.shape
    if (bad := first_bad_probability(probs)) is not None:
        row, col, count = bad
        raise ValueError(
            f"Expected argument `probs` to hold probabilities in [0, 1], but got {probs[row, col]} "
            f"at row {row}, class {class_names[col]!r} ({count} bad value(s) in all)"
        )
    if len(targets) != n:
        raise ValueError(f"Expected argument `targets` to have {n} rows like `probs`, but got {len(targets)}")
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if task == "binary":
        if num_classes > 2:
            raise ValueError(
                f"Expected argument `probs` to have 1 or 2 columns for task 'binary', but got {num_classes}"
            )
        positive = targets[:, -1] if targets.ndim == 2 else targets
        labels = positive[:, None]
        probs, class_names = probs[:, -1:], class_names[-1:]
    elif task in ("multilabel", "multiclass"):
        if targets.ndim == 1:
            if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
                raise ValueError(f"Expected argument `targets` to hold class indices 0..{num_classes - 1}")
            labels = np.eye(num_classes, dtype=np.int64)[targets]
        elif targets.shape == probs.shape:
            labels = targets
            if task == "multiclass" and not (labels.sum(axis=1) == 1).all():
                raise ValueError("Expected argument `targets` to have exactly one positive per row for 'multiclass'")
        else:
            raise ValueError(
                f"Expected argument `targets` to have shape (N,) or {probs.shape}, but got {targets.shape}"
            )
        if task == "multiclass" and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            _logger.warning(
                "Multiclass probabilities do not sum to 1 in every row.\n"
                "HINT: were they made with a sigmoid? Then the task is 'multilabel'."
            )
    else:
        raise ValueError(
            f"Expected argument `task` to be one of 'multilabel', 'binary', 'multiclass', but got {task!r}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("Expected argument `targets` to hold 0/1 labels")
    return probs, labels.astype(np.int64), class_names
