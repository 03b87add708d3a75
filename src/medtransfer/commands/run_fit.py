"""``run_fit``: one ``medtransfer fit`` from Python, config and typed overrides in, metrics and MLflow run out;
and ``run_child_fit``, a fit under a parent MLflow run: the engine of ``search`` and ``learning-curve``.

Fits go through the same LightningCLI (:func:`~medtransfer.commands.fit.build_cli`) as the command, so a fit
run this way behaves exactly as ``medtransfer fit``, without building its argv or reading its output.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser

from medtransfer.commands.fit import MedTransferCLI, build_cli
from medtransfer.errors import MedtransferError
from medtransfer.tracking.callbacks import find_mlflow_logger
from medtransfer.tracking.mlflow import MLflowLogger

__all__ = ["FitResult", "resolve_fit_config", "run_child_fit", "run_fit", "sweep_tracking"]


#: Config files and mappings of dotted options, applied in order (see :func:`run_fit`).
_ConfigLayers = str | Path | Mapping[str, Any] | Sequence[str | Path | Mapping[str, Any]]


@dataclass(frozen=True)
class FitResult:
    """What one :func:`run_fit` produced: its MLflow run, the last logged metrics and the best checkpoint."""

    run_id: str | None
    metrics: dict[str, float]
    best_model_path: str
    interrupted: bool
    trainer: Trainer = field(repr=False)
    datamodule: LightningDataModule = field(repr=False)


def run_fit(
    config: _ConfigLayers,
    overrides: Mapping[str, Any] | None = None,
    *,
    fit_args: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    test_after_fit: bool | None = None,
) -> FitResult:
    """One ``medtransfer fit`` from Python, through the same CLI, so it behaves exactly as the command.

    Args:
        config: config files stacked in order like repeated ``--config``; a mapping among them sets its dotted
            options at that point (``{"mlflow_model.enabled": False}``: off unless ``fit_args`` turn it on).
        overrides: typed values by dotted ``fit`` option (``{"model.optimizer.lr": 1e-3}``; ``init_args`` may be
            left out as on the command line), set after ``fit_args``; the fit parser checks them like any option.
        fit_args: ``fit`` command-line options as a user gave them (``["--trainer.max_epochs=2"]``).
        callbacks: callback instances run besides the config's (e.g. Optuna's pruning callback).
        run_name: the MLflow run's name.
        tags: the MLflow run's extra tags.
        test_after_fit: replaces the config's ``test_after_fit``.
    """
    typed = dict(overrides or {})
    named = {"trainer.logger.init_args.run_name": run_name, "test_after_fit": test_after_fit,
             "trainer.logger.init_args.tags": dict(tags) if tags else None}  # fmt: skip
    typed.update({key: value for key, value in named.items() if value is not None})
    cli = build_cli(_FitRequest(config, typed, fit_args, callbacks), cli_class=_TypedFitCLI)  # type: ignore[arg-type]
    logger, checkpoint = find_mlflow_logger(cli.trainer), cli.trainer.checkpoint_callback
    return FitResult(
        run_id=logger.run_id if logger is not None else None,
        metrics={key: float(value) for key, value in cli.trainer.callback_metrics.items()},
        best_model_path=checkpoint.best_model_path if checkpoint else "",
        interrupted=cli.trainer.interrupted,
        trainer=cli.trainer,
        datamodule=cli.datamodule,
    )


def resolve_fit_config(
    config: _ConfigLayers,
    overrides: Mapping[str, Any] | None = None,
    *,
    fit_args: Sequence[str] = (),
) -> str:
    """The config :func:`run_fit` would run, as the fit parser dumps it (what ``fit --print_config`` prints),
    without instantiating anything."""
    request = _FitRequest(config, dict(overrides or {}), fit_args, (), parse_only=True)
    cli = build_cli(request, run=False, cli_class=_TypedFitCLI)  # type: ignore[arg-type]
    return cli.parser.dump(cli.config, skip_none=False)


@dataclass(frozen=True)
class _FitRequest:
    config: _ConfigLayers
    overrides: dict[str, Any]
    fit_args: Sequence[str]
    callbacks: Sequence[Callback]
    parse_only: bool = False


class _TypedFitCLI(MedTransferCLI):
    """``MedTransferCLI`` given a :class:`_FitRequest` as ``args``: the config layers (files parsed as
    ``--config``, mappings set by dotted key), then the user's ``fit_args`` as on the command line, then the typed
    overrides; the parser checks the whole config at the end."""

    def parse_arguments(self, parser: LightningArgumentParser, args: _FitRequest) -> None:  # type: ignore[override]
        self._parse_only = args.parse_only
        subcommand, prefix = ([], "") if args.parse_only else (["fit"], "fit.")
        layers = [args.config] if isinstance(args.config, (str, Path, Mapping)) else list(args.config)
        config = None
        for layer in [*layers, args.fit_args, args.overrides]:
            if isinstance(layer, Mapping):
                for key, value in layer.items():
                    config[_nested_key(config, prefix + key)] = value
            else:
                options = [f"--config={layer}"] if isinstance(layer, (str, Path)) else list(layer)
                config = parser.parse_args([*subcommand, *options], namespace=config)
        config.pop(f"{prefix}config", None)
        callbacks = [*self.trainer_defaults.get("callbacks", []), *args.callbacks]
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}
        with warnings.catch_warnings():  # the calling command's own sys.argv is no mistake here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, config)

    def instantiate_classes(self) -> None:
        if not self._parse_only:
            super().instantiate_classes()


def _nested_key(config: Any, key: str) -> str:
    """``key`` as ``config`` nests it: ``data.path`` -> ``data.init_args.path``, as the command line accepts."""
    node, parts = config, []
    for part in key.split("."):
        if hasattr(node, "init_args") and part not in node:
            node, parts = node["init_args"], [*parts, "init_args"]
        node, parts = node.get(part) if hasattr(node, "get") else None, [*parts, part]
    return ".".join(parts)


def sweep_tracking(config: Mapping[str, Any], command: str) -> dict[str, Any]:
    """``experiment_name``, ``tracking_uri`` (resolved) and ``artifact_location`` of the MLflow logger of a
    resolved fit config: where a sweep's parent run goes (``open_run(**sweep_tracking(...))``), beside its child
    fits. An unreachable tracking server is an error here, before a study or a parent run is created."""
    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, Mapping) or "MLflowLogger" not in str(logger.get("class_path", "")):
        raise MedtransferError(f"medtransfer {command} needs the MLflow logger (trainer.logger: MLflowLogger)")
    init = logger.get("init_args") or {}
    tracking_uri = MLflowLogger(tracking_uri=init.get("tracking_uri")).tracking_uri  # a server must answer, now
    return {"experiment_name": init.get("experiment_name") or "medtransfer", "tracking_uri": tracking_uri,
            "artifact_location": init.get("artifact_location")}  # fmt: skip


def run_child_fit(parent: MLflowLogger, config: _ConfigLayers, overrides: Mapping[str, Any], *, run_name: str,
                  tags: Mapping[str, str], **kwargs: Any) -> FitResult:  # fmt: skip
    """:func:`run_fit` as an MLflow child run of ``parent`` (tag ``mlflow.parentRunId``), in its store and
    experiment: how ``search`` runs its trials and ``learning-curve`` its points. ``kwargs`` are ``run_fit``'s."""
    experiment = parent.experiment.get_experiment(parent.experiment_id).name
    where = {"trainer.logger.init_args.tracking_uri": parent.tracking_uri,
             "trainer.logger.init_args.experiment_name": experiment}  # fmt: skip
    tags = {"mlflow.parentRunId": parent.run_id, **tags}
    return run_fit(config, {**overrides, **where}, run_name=run_name, tags=tags, **kwargs)
