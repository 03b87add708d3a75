"""Figures for evaluation reports (ROC, risk-coverage, reliability, confusion with abstentions): pure drawing of
numbers computed elsewhere, as matplotlib ``Figure`` s (Agg backend); ``save_figure`` writes PNG atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from medtransfer.files import atomic_open

__all__ = [
    "plot_confusion",
    "plot_label_counts",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_roc",
    "plot_roc_per_label",
    "save_figure",
]


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    auroc: float,
    operating_point: tuple[float, float] | None = None,
    threshold: float | None = None,
) -> Figure:
    """ROC curve with the chosen operating point (``(1 - specificity, sensitivity)``) marked."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    if operating_point is not None:
        label = "operating point" + (f" (threshold {threshold:.3f})" if threshold is not None else "")
        ax.scatter(*operating_point, c="crimson", zorder=3, label=label)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_roc_per_label(curves: dict[str, tuple[Sequence[float], Sequence[float], float]], mean: float) -> Figure:
    """Multi-label ROC: one curve per label (``name: (fpr, tpr, auroc)``), the macro AUROC in the title."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} {auroc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC per label (macro AUROC {mean:.3f}, {len(curves)} labels)")  # fmt: skip
    ax.legend(loc="lower right", fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


def plot_label_counts(counts: np.ndarray, label_names: Sequence[str], columns: Sequence[str]) -> Figure:
    """Per-label decision counts (rows: labels; columns such as true/false positive/negative and abstain)."""
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2.5, 0.4 * len(label_names) + 1.5))
    _count_grid(ax, np.asarray(counts), label_names, columns, aspect="auto", fontsize="small")
    ax.set(title="Decisions per label at its threshold")
    fig.tight_layout()
    return fig


def plot_risk_coverage(coverage: Sequence[float], risk: Sequence[float], aurc: float,
                       marks: dict[str, tuple[float, float]] | None = None,
                       guarantee: tuple[float, float, float] | None = None) -> Figure:  # fmt: skip
    """Selective risk against coverage, with labelled ``marks`` and the certified bound of ``guarantee`` =
    ``(target_risk, delta, certified calibration coverage)``."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(coverage, risk, where="post", lw=2, label=f"AURC {aurc:.4f}")
    if guarantee is not None:
        target, delta, certified = guarantee
        label = f"guaranteed risk <= {target:g} (prob. {1 - delta:.0%}) up to coverage {certified:.0%}"
        ax.hlines(target, 0, max(certified, 1e-3), colors="darkgreen", linestyles="--", lw=1.5, label=label)
        ax.axvline(certified, c="darkgreen", ls=":", lw=1)
    for name, (cov, rsk) in (marks or {}).items():
        ax.scatter(cov, rsk, c="crimson", zorder=3, label=f"{name}: coverage {cov:.0%}, risk {rsk:.3f}")
    ax.set(xlabel="coverage (share of cases decided)", ylabel="selective risk (error rate)", xlim=(0, 1.01),
           title="Risk-coverage")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def plot_reliability(confidence: Sequence[float], accuracy: Sequence[float], count: Sequence[float],
                     ece: float) -> Figure:  # fmt: skip
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin sizes below."""
    confidence, accuracy, count = (np.asarray(a, dtype=float) for a in (confidence, accuracy, count))
    filled = count > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    top.plot(confidence[filled], accuracy[filled], marker="o", lw=2, label=f"ECE {ece:.4f}")
    top.set(ylabel="observed frequency", ylim=(0, 1.01), title="Reliability")
    top.legend(loc="upper left")
    bottom.bar(confidence[filled], count[filled], width=0.04, color="grey")
    bottom.set(xlabel="predicted probability", ylabel="cases", xlim=(0, 1))
    fig.tight_layout()
    return fig


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], abstained: Sequence[int] | None = None) -> Figure:
    """Confusion matrix (rows: truth, columns: decision), with an ``abstain`` column when given."""
    matrix = np.asarray(matrix)
    columns = list(class_names)
    if abstained is not None:
        matrix = np.column_stack([matrix, np.asarray(abstained)])
        columns.append("abstain")
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 1.5, 1.2 * len(class_names) + 1.2))
    _count_grid(ax, matrix, class_names, columns)
    ax.set(xlabel="decision", ylabel="truth", title="Confusion at the decision threshold")
    fig.tight_layout()
    return fig


def _count_grid(ax: Any, counts: np.ndarray, rows: Sequence[str], columns: Sequence[str], aspect: str = "equal",
                fontsize: str = "medium") -> None:  # fmt: skip
    """Counts as a blue grid, each cell's number written on it (white on the dark half)."""
    ax.imshow(counts, cmap="Blues", aspect=aspect)
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(int(value)), ha="center", va="center", fontsize=fontsize,
                color="white" if value > counts.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG via a temporary file and rename, so a crash never leaves half an image."""
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
