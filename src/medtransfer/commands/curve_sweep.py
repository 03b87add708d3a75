"""The sweep of ``medtransfer learning-curve``: every config x training fraction x seed as a trial of a grid study on
``search``'s engine (:mod:`medtransfer.commands.sweep`), each a child run of one parent run that receives the CSV,
the points as metrics and the plot.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml

from medtransfer.commands.curve_points import CurvePoint, plot_learning_curve
from medtransfer.commands.run_fit import FitResult, resolve_fit_config, sweep_tracking
from medtransfer.commands.search_space import SearchParam, plan_trials
from medtransfer.commands.sweep import Sweep, open_study, run_trials, study_parent
from medtransfer.errors import MedtransferError
from medtransfer.files import write_text_atomic
from medtransfer.tracking.mlflow import MLflowLogger, open_run
from medtransfer.tracking.redaction import redact
from medtransfer.tracking.ui import ui_hint

__all__ = ["sweep_curve"]


@dataclass(frozen=True)
class _CurveSweep(Sweep):
    """The curve as a grid study: a trial's ``config`` picks a recipe's config stack, its ``fraction`` and
    ``seed`` the training subset and the seed; every finished point is written to the CSV and the parent run."""

    stacks: dict[str, list[str]] = field(default_factory=dict)
    curve_metric: str = "auroc"
    csv: Path = Path("learning_curve.csv")

    def fit_of(self, study: optuna.Study, trial: optuna.Trial, values: dict[str, Any]) \
            -> tuple[list[Any], dict[str, Any], str, dict[str, str]]:  # fmt: skip
        label, fraction, seed = values["config"], values["fraction"], values["seed"]
        overrides = {"data.init_args.train_fraction": fraction, "data.init_args.subset_seed": seed,
                     "seed_everything": seed}  # fmt: skip
        tags = {"curve.config": label, "curve.fraction": str(fraction), "curve.seed": str(seed)}
        return [*self.stacks[label], {"mlflow_model.enabled": False}], overrides, f"{label}-f{fraction:g}-s{seed}", tags

    def record(self, trial: optuna.Trial, result: FitResult, parent: MLflowLogger) -> None:
        """The point: the metrics at the selected epoch, the test metric when the config tests after fit."""
        client, metric = parent.experiment, self.curve_metric
        epoch, train_value, val_value = _at_selected_epoch(client, result.run_id, metric, result.trainer)
        point = CurvePoint(
            config=trial.params["config"],
            fraction=trial.params["fraction"],
            seed=trial.params["seed"],
            train_images=len(result.datamodule.datasets["train"]),
            epoch=epoch,
            train_metric=train_value,
            val_metric=val_value,
            test_metric=client.get_run(result.run_id).data.metrics.get(f"test/{metric}", math.nan),
            run_id=result.run_id,
            seconds=round((datetime.now() - trial.datetime_start).total_seconds(), 1),
        )
        trial.set_user_attr("point", asdict(point))

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, ran: int, seconds: float) -> None:
        """Rewrite the CSV (an interrupted curve keeps its finished points) and report the point."""
        points = _points(study)
        write_text_atomic(self.csv, pd.DataFrame(points).to_csv(index=False, na_rep="nan"))
        _report_point(study_parent(study), points[-1], f"{len(points)}/{len(study.trials)}", self.curve_metric)


def _points(study: optuna.Study) -> list[CurvePoint]:
    return [CurvePoint(**t.user_attrs["point"]) for t in study.get_trials(deepcopy=False) if "point" in t.user_attrs]


def sweep_curve(
    stacks: dict[str, list[str]],
    fractions: list[float],
    seeds: list[int],
    metric: str,
    fit_args: list[str],
    csv: Path,
    logged: dict[str, Any],
) -> tuple[list[CurvePoint], str, Path]:
    """Fit every config stack (by label) at every fraction and seed, in a study whose parent run gets ``logged``
    as params; returns the points, the parent run's id and the plot written beside ``csv``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking, dataset = _probe(next(iter(stacks.values())), fit_args)
    params = [SearchParam(key, "categorical", choices=list(grid), grid=list(grid))
              for key, grid in (("config", stacks), ("fraction", fractions), ("seed", seeds))]  # fmt: skip
    direction = "minimize" if metric == "loss" else "maximize"
    sweep = _CurveSweep([], params, fit_args, f"val/{metric}", direction, None, stacks, metric, csv)
    name = f"learning-curve-{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    settings = {"seed": 0, "direction": direction, "tracking_uri": tracking["tracking_uri"],
                "experiment": tracking["experiment_name"], "plan": plan_trials(params, "grid", None)}  # fmt: skip
    create_parent = functools.partial(_create_parent, tracking, name, logged)
    study = open_study(name, optuna.storages.InMemoryStorage(), settings, create_parent, optuna.pruners.NopPruner())
    with study_parent(study) as parent:  # FINISHED, KILLED on an interrupt, FAILED on an error
        run_trials(study, sweep)
        png = _plot(parent, _points(study), metric, csv)
    return _points(study), parent.run_id, png


def _create_parent(tracking: dict[str, Any], name: str, logged: dict[str, Any]) -> str:
    """Open the curve's MLflow parent run, with its arguments as params."""
    tags = {"medtransfer.command": "learning-curve", "curve.configs": json.dumps(logged["configs"])}
    parent = open_run(run_name=name, tags=tags, **tracking)
    for key, value in logged.items():
        parent.experiment.log_param(parent.run_id, key, json.dumps(redact(value))[:6000])
    hint = ui_hint(parent.tracking_uri, parent.experiment_id, parent.run_id)
    print(f"Learning curve: parent MLflow run {parent.run_id} (experiment {parent.experiment_id}) in "
          f"{redact(parent.tracking_uri)}" + (f"\n{hint}" if hint else ""))  # fmt: skip
    return parent.run_id


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


def _probe(stack: list[str], fit_args: list[str]) -> tuple[dict[str, Any], str]:
    """The first config's MLflow settings (:func:`sweep_tracking`) and dataset name, for the parent run."""
    from jsonargparse import ArgumentParser

    from medtransfer.data.base import ClassificationDataModule

    config = yaml.safe_load(resolve_fit_config(stack, fit_args=fit_args))
    tracking = sweep_tracking(config, "learning-curve")
    parser = ArgumentParser()
    parser.add_subclass_arguments(ClassificationDataModule, "data")
    data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    return tracking, getattr(data, "name", type(data).__name__)


def _report_point(parent: MLflowLogger, point: CurvePoint, progress: str, metric: str) -> None:
    """Log the point's metrics to the parent run (the step: training images) and print them."""
    for stage in ("train", "val", "test"):
        value = getattr(point, f"{stage}_metric")
        if not math.isnan(value):
            parent.experiment.log_metric(parent.run_id, f"{point.config}/{stage}_{metric}", value,
                                         step=point.train_images)  # fmt: skip
    print(f"[{progress}] {point.config} fraction {point.fraction:g} seed {point.seed}: {point.train_images} train "
          f"images, train {metric} {point.train_metric:.4f}, val {point.val_metric:.4f}, test {point.test_metric:.4f} "
          f"({point.seconds:.0f} s)", flush=True)  # fmt: skip


def _plot(parent: MLflowLogger, points: list[CurvePoint], metric: str, csv_path: Path) -> Path:
    """Write the plot beside the CSV, and log both to the parent run."""
    from medtransfer.plots import save_figure

    png_path = save_figure(plot_learning_curve(points, metric), csv_path.with_name("learning_curve.png"))
    for path in (csv_path, png_path):
        parent.experiment.log_artifact(parent.run_id, str(path), "learning_curve")
    print(f"Wrote {csv_path} and {png_path}")
    return png_path
