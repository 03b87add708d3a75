"""The points of a learning curve (one fit each) and their figure: plain values, apart from the sweep that makes
them (:mod:`medtransfer.commands.curve_sweep`), so that ``learning-curve --help`` imports neither Optuna nor
Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CurvePoint", "plot_learning_curve"]


@dataclass(frozen=True)
class CurvePoint:
    """One fit of the learning curve: a config (its file stem) at one training fraction and seed."""

    config: str
    fraction: float
    seed: int
    train_images: int
    epoch: int
    train_metric: float
    val_metric: float
    test_metric: float
    run_id: str
    seconds: float


def plot_learning_curve(points: Sequence[CurvePoint], metric: str = "auroc"):
    """Train (dashed) and validation (solid) metric against training images (log scale), a colour per config;
    with several seeds, the mean per fraction and each seed's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    configs = list(dict.fromkeys(p.config for p in points))
    for index, config in enumerate(configs):
        colour = f"C{index}"
        mine = [p for p in points if p.config == config]
        sizes = sorted({p.train_images for p in mine})
        for attribute, style, stage in (("val_metric", "-", "val"), ("train_metric", "--", "train")):
            mean = [np.mean([getattr(p, attribute) for p in mine if p.train_images == n]) for n in sizes]
            ax.plot(sizes, mean, style, color=colour, marker="o" if stage == "val" else None,
                    label=f"{config} ({stage})")  # fmt: skip
            if len({p.seed for p in mine}) > 1:
                ax.scatter([p.train_images for p in mine], [getattr(p, attribute) for p in mine], color=colour,
                           s=8, alpha=0.4)  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="training images", ylabel=metric, title=f"Learning curve: {metric} vs training-set size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
