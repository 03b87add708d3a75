"""``medtransfer lr-find``: Lightning's ``Tuner.lr_find`` for either phase of freeze-then-finetune, on ``fit``'s
options plus ``--lr_find.*``.

The finder runs with its own callback only, so the phase is set up here: ``head`` trains the new head on the
frozen backbone (``model.optimizer``'s lr); ``finetune`` also the blocks ``finetuning`` would unfreeze
(``finetuning.finetune_lr``), best from phase-1 weights (``--lr_find.weights``). Plot and suggestion go to MLflow.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from medtransfer.errors import MedtransferError
from medtransfer.tracking.ui import ui_hint
from medtransfer.upstream import mlflow_logger_settings

__all__ = ["LrFindOptions", "LrFindResult", "run_lr_find"]

Phase = Literal["head", "finetune"]

#: The configuration key that each phase's suggestion belongs in.
CONFIG_KEYS = {"head": "model.optimizer.init_args.lr", "finetune": "finetuning.finetune_lr"}


@dataclasses.dataclass
class LrFindOptions:
    """What ``lr-find`` sweeps.

    Args:
        phase: ``head`` (backbone frozen) or ``finetune`` (the blocks ``finetuning`` unfreezes train too).
        min_lr: first learning rate of the sweep.
        max_lr: last learning rate of the sweep.
        num_training: training steps of the sweep (one learning rate each).
        weights: checkpoint whose weights the sweep starts from (for ``finetune``: one from the end of phase 1).
    """

    phase: Phase = "head"
    min_lr: float = 1e-7
    max_lr: float = 1.0
    num_training: int = 100
    weights: str | None = None


@dataclasses.dataclass
class LrFindResult:
    """The suggestion, the configuration key it belongs in, the plot and the MLflow run holding both."""

    phase: Phase
    suggestion: float | None
    config_key: str
    trainable_parameters: int
    lrs: list[float]
    losses: list[float]
    plot: Path
    run_id: str | None
    ui_hint: str | None = None


def _set_up_phase(model: Any, callbacks: list[Any], options: LrFindOptions) -> None:
    """Freeze the model's backbone; for ``finetune``, make trainable what the fit's ``FreezeThenFinetune`` (among
    the Trainer's ``callbacks``) would unfreeze, or the whole backbone without one."""
    from lightning.pytorch.callbacks import BaseFinetuning

    from medtransfer.callbacks.finetuning import FreezeThenFinetune

    FreezeThenFinetune.freeze_parameters(model.backbone)
    if options.phase == "finetune":
        finetuning = next((c for c in callbacks if isinstance(c, FreezeThenFinetune)), None)
        modules = finetuning.unfrozen_modules(model) if finetuning else [model.backbone]
        BaseFinetuning.make_trainable(modules)


def run_lr_find(lr_find: LrFindOptions = LrFindOptions(), fit_args: Sequence[str] = ()) -> LrFindResult:  # noqa: B008
    """Lightning's learning-rate finder for one phase of freeze-then-finetune, on a fit config; plot to MLflow.

    Args:
        lr_find: what to sweep.
        fit_args: ``fit``'s options as on its command line (``--config``, ``--model.*``, ``--data.*``, ...).
    """
    from lightning.pytorch.tuner import Tuner  # here, not at the top: --help needs no torch or Lightning

    from medtransfer.checkpoints import load_checkpoint
    from medtransfer.commands.fit import build_cli

    options = lr_find
    cli = build_cli(list(fit_args), run=False)
    if not 0 < options.min_lr < options.max_lr:
        raise MedtransferError(f"lr_find: need 0 < min_lr < max_lr, got {options.min_lr} and {options.max_lr}")
    model, trainer = cli.model, cli.trainer
    if options.weights:
        model.load_state_dict(load_checkpoint(options.weights)["state_dict"])
    _set_up_phase(model, trainer.callbacks, options)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=cli.datamodule,
        min_lr=options.min_lr,
        max_lr=options.max_lr,
        num_training=options.num_training,
        update_attr=False,
    )
    if finder is None:
        raise MedtransferError("lr_find: the sweep did not run (fast_dev_run?)")
    suggestion = finder.suggestion()
    figure = finder.plot(suggest=suggestion is not None, show=False)
    plot = Path(tempfile.mkdtemp(prefix="lr-find-")) / f"lr_find_{options.phase}.png"
    figure.savefig(plot, dpi=120, bbox_inches="tight")
    run_id, hint = _log_to_mlflow(cli, options, suggestion, trainable, plot)
    result = LrFindResult(
        phase=options.phase,
        suggestion=suggestion,
        config_key=CONFIG_KEYS[options.phase],
        trainable_parameters=trainable,
        lrs=[float(x) for x in finder.results["lr"]],
        losses=[float(x) for x in finder.results["loss"]],
        plot=plot,
        run_id=run_id,
        ui_hint=hint,
    )
    _print_result(result)
    return result


def _log_to_mlflow(
    cli: Any, options: LrFindOptions, suggestion: float | None, trainable: int, plot: Path
) -> tuple[str | None, str | None]:
    """Log the sweep to the MLflow run of the fit's CLI (a ``MedTransferCLI``): its run id and the line linking to
    it in the UI."""
    from medtransfer.tracking.callbacks import find_mlflow_logger

    logger = find_mlflow_logger(cli.trainer)
    if logger is None:
        return None, None
    dataset = getattr(cli.datamodule, "name", type(cli.datamodule).__name__)
    logger.name_run(f"lr-find-{options.phase}-{cli.model.hparams.backbone}-{dataset}")
    params = {f"lr_find.{k}": v for k, v in dataclasses.asdict(options).items()}
    logger.log_hyperparams(params | {"lr_find.dataset": dataset})
    metrics = {"lr_find/trainable_params": float(trainable)}
    if suggestion is not None:
        metrics["lr_find/suggestion"] = float(suggestion)
    logger.log_metrics(metrics)
    logger.experiment.log_artifact(logger.run_id, str(plot), "plots")
    logger.experiment.set_terminated(logger.run_id, "FINISHED")
    return logger.run_id, ui_hint(mlflow_logger_settings(logger)[0], logger.experiment_id, logger.run_id)


def _print_result(result: LrFindResult) -> None:
    if result.suggestion is None:
        print(f"lr-find ({result.phase}): no suggestion (too few steps or a flat curve); see {result.plot}")
    else:
        print(
            f"lr-find ({result.phase}, {result.trainable_parameters:,} trainable parameters): suggested learning "
            f"rate {result.suggestion:.2e}  ->  set {result.config_key}: {result.suggestion:.2e}"
        )
    if result.run_id:
        print(f"MLflow run {result.run_id}: the plot is plots/{result.plot.name}", flush=True)
    if result.ui_hint:
        print(result.ui_hint, flush=True)
