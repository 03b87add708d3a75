"""Argument checks shared by the metric functions: one ``ValueError`` template naming the argument and the first
bad value."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from medtransfer.task import Task

Score = Literal["decision_prob", "max_prob", "margin"]
TASKS, SCORES = get_args(Task), get_args(Score)


def _first_bad(x: Tensor, bad: Tensor) -> str:
    index = tuple(bad.nonzero()[0].tolist())
    return f"{x[index].item()} at index {index}"


def _check_nonempty(name: str, x: Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"Expected a non-empty batch, but got an empty batch (`{name}` has shape {tuple(x.shape)})")


def _check_finite(name: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(f"Expected argument `{name}` to hold finite values, but got {_first_bad(x, bad)}")


def _check_probs(probs: Tensor, task: Task) -> None:
    if task not in TASKS:
        raise ValueError(f"Expected argument `task` to be one of {TASKS}, but got {task!r}")
    if not probs.is_floating_point():
        raise ValueError(f"Expected argument `probs` to be a floating point tensor, but got {probs.dtype}")
    ndim = 1 if task == "binary" else 2
    if probs.ndim != ndim or (task == "multiclass" and probs.shape[1] < 2):
        shape = {"binary": "(N,)", "multiclass": "(N, C) with C >= 2", "multilabel": "(N, L)"}[task]
        raise ValueError(f"Expected argument `probs` of shape {shape} for a {task} task, but got {tuple(probs.shape)}")
    _check_nonempty("probs", probs)
    _check_unit_interval("probs", probs)


def _check_unit_interval(name: str, x: Tensor) -> None:
    _check_finite(name, x)
    bad = (x < 0) | (x > 1)
    if bad.any():
        raise ValueError(f"Expected argument `{name}` to hold probabilities in [0, 1], but got {_first_bad(x, bad)}")


def _check_unit(name: str, value: float, low_open: bool = False) -> None:
    inside = 0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0
    if not inside:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"Expected argument `{name}` to be in {interval}, but got {value}")


def _check_threshold(threshold: float | Tensor, probs: Tensor | None = None) -> None:
    """Range always; one value per label when ``threshold`` is a sequence and ``probs`` is given."""
    t = torch.as_tensor(threshold, dtype=torch.float64)
    if t.ndim > 1 or t.numel() == 0 or not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(
            f"Expected argument `threshold` to be in [0, 1] (a float or one per label), but got {threshold}"
        )
    if t.ndim == 1 and probs is not None and (probs.ndim != 2 or t.numel() != probs.shape[1]):
        got = f"{probs.shape[1]} labels" if probs.ndim == 2 else f"`probs` of shape {tuple(probs.shape)}"
        raise ValueError(f"Expected argument `threshold` to hold one value per label, but got {t.numel()} for {got}")


def _check_binary(name: str, x: Tensor) -> None:
    bad = (x != 0) & (x != 1)
    if bad.any():
        raise ValueError(f"Expected argument `{name}` to hold 0/1 values, but got {_first_bad(x, bad)}")


def _check_pair(confidence: Tensor, correct: Tensor, name: str = "correct") -> None:
    if confidence.ndim not in (1, 2):
        raise ValueError(f"Expected argument `confidence` of shape (N,) or (N, L), but got {tuple(confidence.shape)}")
    if correct.shape != confidence.shape:
        raise ValueError(
            f"Expected argument `{name}` of the same shape as `confidence` {tuple(confidence.shape)}, "
            f"but got {tuple(correct.shape)}"
        )
    _check_nonempty("confidence", confidence)
    _check_finite("confidence", confidence)
    _check_binary(name, correct)
