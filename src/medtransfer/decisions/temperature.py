"""Temperature scaling (Guo et al. 2017): one scalar fitted on validation logits to calibrate probabilities (no
installed library fits one; torch-uncertainty would be a heavy dependency for a dozen lines)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medtransfer.task import Task

__all__ = ["fit_temperature"]


def fit_temperature(logits: Tensor, target: Tensor, task: Task, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``logits / T`` on ``target`` (softmax cross-entropy for
    multi-class, sigmoid BCE otherwise), by ``max_iter`` L-BFGS iterations."""
    if logits.numel() == 0:
        raise ValueError("Cannot fit a temperature on an empty batch")
    if not torch.isfinite(logits).all():
        raise ValueError("Expected finite `logits`, but got NaN or inf")
    with torch.inference_mode(False), torch.enable_grad():  # callers may sit in Lightning's evaluation loops
        # clones are normal tensors: inference tensors (from `validate`/`test`) cannot enter autograd
        return _fit(logits.detach().double().clone(), target.detach().clone(), task, max_iter)


def _fit(logits: Tensor, target: Tensor, task: Task, max_iter: int) -> float:
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    if task == "multiclass":
        loss_fn: nn.Module = nn.CrossEntropyLoss()
        target = target.long()
    else:
        loss_fn = nn.BCEWithLogitsLoss()
        target = target.double()
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
