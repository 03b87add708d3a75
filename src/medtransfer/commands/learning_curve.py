"""``medtransfer learning-curve``: how a metric grows with the training set, for several recipes.

For every config x training fraction x seed it runs one in-process ``medtransfer fit`` on a stratified, seeded
subset of the training split (``data.train_fraction``, ``data.subset_seed``; nested across fractions for one
seed; validation and test stay whole). Each fit is an MLflow child run (tag ``mlflow.parentRunId``) of one
parent run ``learning-curve-<dataset>-<time>``, which receives the table (CSV) and the plot (PNG).

Per fit the table holds the train and validation metric at the **selected epoch**, the one the checkpoint
callback kept as best (``val/auroc``, max, in the shipped configs): the validation value is the best one, the
train value is that epoch's (epoch-level ``train/<metric>``); without a checkpoint callback, the last epoch.
When the config tests after fit (``test_after_fit: true``, as the shipped configs do), the test metric of
that best checkpoint is added.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from medtransfer.errors import MedtransferError, exit_on_user_error
from medtransfer.files import write_text_atomic
from medtransfer.tracking.redaction import redact
from medtransfer.upstream import mlflow_logger_settings

if TYPE_CHECKING:
    from medtransfer.commands.run_fit import FitResult

__all__ = ["CurvePoint", "learning_curve", "main", "plot_learning_curve", "read_curve_csv"]

_logger = logging.getLogger(__name__)


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


def _config_stack(config: str, base_config: str | None) -> list[str]:
    stack = [base_config, config] if base_config else [config]
    for path in stack:
        if not Path(path).is_file():
            raise MedtransferError(f"Config file not found: {path}")
    return stack


def _at_selected_epoch(client, run_id: str, metric: str, trainer) -> tuple[int, float, float]:
    """``(epoch, train, val)`` of ``metric`` at the epoch the checkpoint callback selected (else the last)."""
    histories = {}
    for stage in ("train", "val"):
        histories[stage] = sorted(client.get_metric_history(run_id, f"{stage}/{metric}"), key=lambda m: m.step)
        if not histories[stage]:
            raise MedtransferError(f"Run {run_id} logged no {stage}/{metric}; choose a metric the model logs")
    val, train = histories["val"], histories["train"]
    checkpoint = trainer.checkpoint_callback
    index = len(val) - 1
    if checkpoint is not None and checkpoint.monitor:
        monitored = sorted(client.get_metric_history(run_id, checkpoint.monitor), key=lambda m: m.step)
        if len(monitored) == len(val):
            values = [m.value for m in monitored]
            index = values.index(max(values) if checkpoint.mode == "max" else min(values))
    step = val[index].step
    # epoch-level train metrics are logged at the same global step as that epoch's validation
    train_value = next((m.value for m in train if m.step == step), train[min(index, len(train) - 1)].value)
    return index, train_value, val[index].value


def _point(
    result: FitResult, label: str, fraction: float, seed: int, metric: str, seconds: float, client
) -> CurvePoint:
    """The curve's point of one finished fit: its metrics at the selected epoch."""
    if result.interrupted:
        raise KeyboardInterrupt
    epoch, train_value, val_value = _at_selected_epoch(client, result.run_id, metric, result.trainer)
    return CurvePoint(
        config=label,
        fraction=fraction,
        seed=seed,
        train_images=len(result.datamodule.datasets["train"]),
        epoch=epoch,
        train_metric=train_value,
        val_metric=val_value,
        test_metric=client.get_run(result.run_id).data.metrics.get(f"test/{metric}", math.nan),
        run_id=result.run_id,
        seconds=round(seconds, 1),
    )


def _probe(stack: list[str], fit_args: list[str]) -> tuple[tuple[str, str, str | None], str]:
    """The first config's MLflow settings (tracking URI, experiment, artifact location) and dataset name, without
    fitting: the parent run goes in the same store and experiment as the children."""
    import yaml
    from jsonargparse import ArgumentParser

    from medtransfer.commands.run_fit import resolve_fit_config
    from medtransfer.data.base import ClassificationDataModule
    from medtransfer.tracking.mlflow import MLflowLogger

    config = yaml.safe_load(resolve_fit_config(stack, fit_args=fit_args))
    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, dict) or "MLflowLogger" not in str(logger.get("class_path", "")):
        raise MedtransferError("learning-curve needs the MLflow logger (trainer.logger) in its configs")
    parser = ArgumentParser()
    parser.add_subclass_arguments(ClassificationDataModule, "data")
    data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    settings = mlflow_logger_settings(MLflowLogger(**logger.get("init_args") or {}))
    return settings, getattr(data, "name", type(data).__name__)


def _csv_text(points: Sequence[CurvePoint]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, [f.name for f in fields(CurvePoint)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(p) for p in points)
    return stream.getvalue()


def read_curve_csv(path: str | Path) -> list[CurvePoint]:
    """The points of a ``learning_curve.csv`` written by :func:`learning_curve`."""
    types = {f.name: f.type for f in fields(CurvePoint)}
    casts = {"str": str, "float": float, "int": int}
    with open(path, newline="", encoding="utf-8") as stream:
        return [CurvePoint(**{k: casts[types[k]](v) for k, v in row.items()}) for row in csv.DictReader(stream)]


def plot_learning_curve(points: Sequence[CurvePoint], metric: str = "auroc"):
    """Train (dashed) and validation (solid) metric against the number of training images (log scale), one
    colour per config; with several seeds, the mean per fraction and each seed's points."""
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


def learning_curve(
    *,
    configs: list[str],
    fractions: list[float] = [0.05, 0.1, 0.25, 0.5, 1.0],  # noqa: B006 (jsonargparse shows the default)
    seeds: list[int] = [0],  # noqa: B006
    metric: str = "auroc",
    output_dir: str = "learning_curve",
    base_config: str | None = None,
    fit_args: list[str] = [],  # noqa: B006
) -> list[CurvePoint]:
    """Fit every config at every training fraction and seed, as MLflow child runs of one parent run.

    Writes ``<output_dir>/learning_curve.csv`` (atomically, rewritten after every fit, so an interrupted curve
    keeps its finished points) and, at the end, ``learning_curve.png``; logs both to the parent run, plus
    ``<config>/train_<metric>`` and ``<config>/val_<metric>`` with the number of training images as the step, to
    the parent run.

    Args:
        configs: LightningCLI config files, one curve each, labelled by the file stem.
        fractions: shares of the training split (0 < f <= 1); stratified subsets, nested for one seed.
        seeds: each seed sets both the subset (``data.subset_seed``) and training (``seed_everything``).
        metric: the metric logged as ``train/<metric>`` and ``val/<metric>`` (``auroc``, ``acc``, ``loss``).
        output_dir: folder for the CSV and the plot.
        base_config: a config stacked under every one of ``configs`` (e.g. the default, with recipe overlays).
        fit_args: extra ``medtransfer fit`` arguments for every fit, e.g. ``["--trainer.max_epochs=5"]``.

    Returns:
        One point per fit, in run order.
    """
    from mlflow.tracking import MlflowClient

    from medtransfer.commands.run_fit import run_fit

    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise MedtransferError(f"Expected argument `fractions` to be in (0, 1], but got {fractions}")
    if not configs or not seeds:
        raise MedtransferError("learning-curve needs at least one config and one seed")
    stacks = {Path(c).stem: _config_stack(c, base_config) for c in configs}
    if len(stacks) != len(configs):
        raise MedtransferError(f"Config file stems label the curves and must differ: {configs}")
    (tracking_uri, experiment_name, artifact_location), dataset = _probe(next(iter(stacks.values())), fit_args)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(experiment_name, artifact_location=artifact_location)
    )
    parent = client.create_run(
        experiment_id,
        run_name=f"learning-curve-{dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
        tags={"medtransfer.command": "learning-curve", "curve.configs": json.dumps(list(configs))},
    ).info.run_id
    for key, value in {"fractions": fractions, "seeds": seeds, "metric": metric, "configs": list(configs),
                       "base_config": base_config, "fit_args": fit_args}.items():  # fmt: skip
        client.log_param(parent, key, json.dumps(redact(value))[:6000])
    print(f"Learning curve: parent MLflow run {parent} (experiment {experiment_id}) in {redact(tracking_uri)}")
    points: list[CurvePoint] = []
    csv_path = Path(output_dir) / "learning_curve.csv"
    status = "FAILED"
    try:
        for label, stack in stacks.items():
            for fraction in fractions:
                for seed in seeds:
                    tags = {"mlflow.parentRunId": parent, "curve.config": label, "curve.fraction": str(fraction),
                            "curve.seed": str(seed)}  # fmt: skip
                    overrides = {"data.init_args.train_fraction": fraction, "data.init_args.subset_seed": seed,
                                 "seed_everything": seed, "trainer.logger.init_args.tracking_uri": tracking_uri,
                                 "trainer.logger.init_args.experiment_name": experiment_name}  # fmt: skip
                    start = time.perf_counter()
                    result = run_fit(
                        [*stack, {"mlflow_model.enabled": False}],
                        overrides,
                        fit_args=fit_args,
                        run_name=f"{label}-f{fraction:g}-s{seed}",
                        tags=tags,
                    )  # no model export per point
                    point = _point(result, label, fraction, seed, metric, time.perf_counter() - start, client)
                    points.append(point)
                    write_text_atomic(csv_path, _csv_text(points))  # an interrupted curve keeps its finished fits
                    for stage in ("train", "val", "test"):
                        value = getattr(point, f"{stage}_metric")
                        if not math.isnan(value):
                            client.log_metric(parent, f"{label}/{stage}_{metric}", value, step=point.train_images)
                    print(
                        f"[{len(points)}/{len(stacks) * len(fractions) * len(seeds)}] {label} fraction {fraction:g} "
                        f"seed {seed}: {point.train_images} train images, train {metric} {point.train_metric:.4f}, "
                        f"val {point.val_metric:.4f}, test {point.test_metric:.4f} ({point.seconds:.0f} s)",
                        flush=True,
                    )
        from medtransfer.plots import save_figure

        png_path = save_figure(plot_learning_curve(points, metric), Path(output_dir) / "learning_curve.png")
        client.log_artifact(parent, str(csv_path), "learning_curve")
        client.log_artifact(parent, str(png_path), "learning_curve")
        print(f"Wrote {csv_path} and {png_path}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    return points


def main(args: list[str] | None = None) -> None:
    """``medtransfer learning-curve``: the typed ``learning_curve`` as a command line (jsonargparse)."""
    from jsonargparse import auto_cli

    with exit_on_user_error():
        auto_cli(learning_curve, args=args, prog="medtransfer learning-curve")


if __name__ == "__main__":
    main()
