"""``medtransfer learning-curve``: how a metric grows with the training set, for several recipes.

Every config x training fraction x seed is one ``fit`` on a stratified, seeded subset of the training split
(``data.train_fraction``, ``data.subset_seed``; nested across fractions; validation and test stay whole), a
child run of one parent run that receives the CSV and the plot. A point holds the train and validation metric
at the epoch the checkpoint callback selected (else the last), and the test metric of that checkpoint when the
config tests after fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medtransfer.commands.curve_points import CurvePoint, plot_learning_curve
from medtransfer.errors import MedtransferError

__all__ = ["CurvePoint", "LearningCurveResult", "plot_learning_curve", "run_learning_curve"]


@dataclass(frozen=True)
class LearningCurveResult:
    """The points of a curve in run order, its MLflow parent run, and the CSV and plot written."""

    points: list[CurvePoint]
    parent_run_id: str
    csv: Path
    plot: Path


def run_learning_curve(
    *,
    configs: list[str],
    fractions: list[float] = [0.05, 0.1, 0.25, 0.5, 1.0],  # noqa: B006 (jsonargparse shows the default)
    seeds: list[int] = [0],  # noqa: B006
    metric: str = "auroc",
    output_dir: str = "learning_curve",
    base_config: str | None = None,
    fit_args: list[str] = [],  # noqa: B006
) -> LearningCurveResult:
    """Fit every config at every training fraction and seed: a grid study on ``search``'s engine
    (:mod:`medtransfer.commands.sweep`). Writes ``<output_dir>/learning_curve.csv`` after every fit and
    ``learning_curve.png`` at the end, logged to the parent run with ``<config>/<stage>_<metric>`` by image count.

    Args:
        configs: LightningCLI config files, one curve each, labelled by the file stem.
        fractions: shares of the training split (0 < f <= 1); stratified subsets, nested for one seed.
        seeds: each seed sets both the subset (``data.subset_seed``) and training (``seed_everything``).
        metric: the metric logged as ``train/<metric>`` and ``val/<metric>`` (``auroc``, ``acc``, ``loss``).
        output_dir: folder for the CSV and the plot.
        base_config: a config stacked under every one of ``configs`` (e.g. the default, with recipe overlays).
        fit_args: extra ``medtransfer fit`` arguments for every fit, e.g. ``["--trainer.max_epochs=5"]``.
    """
    from medtransfer.commands.curve_sweep import sweep_curve  # here, not at the top: --help needs no Optuna

    stacks = _config_stacks(configs, fractions, seeds, base_config)
    csv = Path(output_dir) / "learning_curve.csv"
    logged = {"fractions": fractions, "seeds": seeds, "metric": metric, "configs": list(configs),
              "base_config": base_config, "fit_args": fit_args}  # fmt: skip
    points, parent_run_id, png = sweep_curve(stacks, fractions, seeds, metric, fit_args, csv, logged)
    return LearningCurveResult(points, parent_run_id, csv, png)


def _config_stacks(configs: list[str], fractions: list[float], seeds: list[int], base_config: str | None) \
        -> dict[str, list[str]]:  # fmt: skip
    """The config files of each curve by label (the file stem), all checked before any fit."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise MedtransferError(f"Expected argument `fractions` to be in (0, 1], but got {fractions}")
    if not configs or not seeds:
        raise MedtransferError("learning-curve needs at least one config and one seed")
    stacks = {Path(c).stem: [base_config, c] if base_config else [c] for c in configs}
    missing = [path for stack in stacks.values() for path in stack if not Path(path).is_file()]
    if missing:
        raise MedtransferError(f"Config file not found: {missing[0]}")
    if len(stacks) != len(configs):
        raise MedtransferError(f"Config file stems label the curves and must differ: {configs}")
    return stacks
