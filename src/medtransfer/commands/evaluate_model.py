"""What ``medtransfer evaluate --model`` adds to the table, from the model that made the predictions: whether they
look like its calibration data (the exchangeability check), and with ``--prevalence`` the table of the
probabilities adapted to another prevalence (:mod:`medtransfer.decisions.prevalence`, as ``predict`` adapts them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from medtransfer.commands.predictor import Predictor, load_predictor
from medtransfer.decisions import prevalence as shift
from medtransfer.decisions.report import evaluation_table
from medtransfer.decisions.risk_control import guarantee_verdict
from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = ["adapted_report", "guarantee", "load_model"]


def load_model(model: str, task: Task, class_names: list[str], shares: str | list[float] | None) -> Predictor:
    """The model that made the predictions; to adapt them (``shares``), predictions of its task and classes: else a
    DataError, before any scoring."""
    predictor = load_predictor(model)
    names = predictor.share_names
    if shares is not None and (task != predictor.task or (task != "binary" and class_names != names)):
        raise DataError(f"--prevalence: these are {task} predictions of {class_names}, but {predictor.label} is a "
                        f"{predictor.task} model of {names}; give its --task and probability columns")  # fmt: skip
    return predictor


def _positive_scores(probs: np.ndarray, task: str) -> torch.Tensor:
    """The probabilities as the model states them: a binary task's positive column (the last), else all."""
    return torch.as_tensor(probs[:, -1] if task == "binary" else probs, dtype=torch.float64)


def guarantee(predictor: Predictor, probs: np.ndarray, task: str) -> dict[str, Any]:
    """The exchangeability verdict of these probabilities against the model's calibration scores, printed."""
    verdict = guarantee_verdict(predictor.rule, predictor.calibration, [_positive_scores(probs, task).float()])
    print(f"Guarantee of {predictor.label}: {verdict.get('message', 'calibrated')}")
    return verdict


def adapted_report(
    predictor: Predictor, report: pd.DataFrame, probs: np.ndarray, targets: np.ndarray, class_names: list[str],
    task: Task, threshold: float | list[float], shares: str | list[float], method: shift.PrevalenceMethod,
) -> tuple[pd.DataFrame | None, dict[str, Any]]:  # fmt: skip
    """The table of the probabilities adapted to the class shares (estimated from them, or given: predict's
    ``--prevalence``), ``None`` when none could be, and predict's ``prevalence`` entry plus the ``true`` shares of
    the labels (from ``report``'s positives); the predictions are of the model's task and classes
    (:func:`load_model`)."""
    names = predictor.share_names
    scores = _positive_scores(probs, task)
    chosen = shift.batch_prevalence(scores, predictor.calibration, task, shares, method, predictor.label)
    true = (report["positives"] / report["n"]).drop(index="mean").to_numpy(dtype=np.float64)
    true = np.concatenate([1 - true, true]) if task == "binary" else true
    entry = {**shift.summary_entry(chosen, names, shares, method),
             "true": {name: round(float(share), 4) for name, share in zip(names, true, strict=True)}}  # fmt: skip
    if chosen is None:
        return None, entry
    adapted = shift.adapt_probabilities(scores, chosen.source, chosen.estimated, task).numpy()
    if task == "binary":
        adapted, class_names = adapted[:, None], class_names[-1:]
    return evaluation_table(adapted, targets, class_names, task, threshold), entry
