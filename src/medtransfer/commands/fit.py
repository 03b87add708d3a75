"""``medtransfer fit|validate|test``: LightningCLI over ``ClassifierModule`` and the data modules, with the
project's defaults (MLflow, checkpoints on validation AUROC, freeze-then-finetune), ``--test_after_fit``,
continuation of a checkpoint's MLflow run, and one-line errors.
"""

from __future__ import annotations

import logging
import sys
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from medtransfer.callbacks.epoch_summary import EpochSummary
from medtransfer.callbacks.finetuning import FreezeThenFinetune
from medtransfer.callbacks.finite_check import FiniteCheck
from medtransfer.callbacks.last_checkpoint import LastCheckpoint
from medtransfer.checkpoints import load_checkpoint
from medtransfer.data.base import ClassificationDataModule
from medtransfer.errors import MedtransferError, exit_on_user_error
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.input_spec import backbone_input_spec
from medtransfer.tracking.callbacks import (
    LogConfigToMLflow,
    MLflowRunTracking,
    find_mlflow_logger,
    read_run_info,
    redacted,
)
from medtransfer.tracking.mlflow import MLflowLogger
from medtransfer.tracking.model_logging import LogModelToMLflow
from medtransfer.tracking.report import TestReportPlots
from medtransfer.tracking.system_metrics import LogSystemMetrics
from medtransfer.tracking.ui import ui_hint
from medtransfer.upstream import mlflow_logger_settings

__all__ = [
    "SIGTERM_EXIT_STATUS",
    "MedTransferCLI",
    "build_cli",
    "main",
]

_logger = logging.getLogger(__name__)


def _input_spec_link(backbone: str, in_chans: int) -> dict[str, Any]:
    """The backbone's input spec as plain values, which jsonargparse serialises and turns back into an InputSpec."""
    return backbone_input_spec(backbone, in_chans).to_dict()


class MedTransferCLI(LightningCLI):
    """LightningCLI with medtransfer's callbacks, links and MLflow run handling."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands without its ``predict``: ``medtransfer predict`` is the batch-inference command
        (``medtransfer.commands.predict``), so Lightning's generic one would only be a second, different command."""
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FreezeThenFinetune, "finetuning")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LogModelToMLflow, "mlflow_model")
        parser.add_lightning_class_args(LogSystemMetrics, "system_metrics")  # rank 0's CPU/memory/GPU into the run
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/auroc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # LastCheckpoint keeps last.ckpt current every epoch
                "checkpoint.filename": "epoch={epoch:02d}-val_auroc={val/auroc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # the model's input spec, to the data module; at parse time, since on instantiation the links above
        # (data -> model) and this one (model -> data) would make a cycle, which jsonargparse refuses
        parser.link_arguments(("model.backbone", "model.in_chans"), "data.init_args.input_spec", _input_spec_link)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run test on the best checkpoint and log to the same MLflow run (fit only).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then load ``--ckpt_path`` with ``weights_only=True`` once: a checkpoint carrying pickled code is
        one clear error naming it (Lightning's own pre-load refuses it too, but with a raw traceback)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path)

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` among this experiment's runs, whose run continues
        (Lightning looks in the new run's empty folder, and would silently start from scratch)."""
        config = self.config[self.subcommand]
        logger = find_mlflow_logger(self.trainer)
        if config.get("ckpt_path") != "last" or logger is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(logger.tracking_uri)
        experiment_name = mlflow_logger_settings(logger)[1]
        experiment = client.get_experiment_by_name(experiment_name)
        folder = Path(self.trainer.default_root_dir, experiment.experiment_id if experiment else "?")
        found = sorted(folder.glob("*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
        if experiment is not None:
            _refuse_if_newest_run_has_no_checkpoint(client, experiment.experiment_id, folder)
        if not found:
            raise MedtransferError(
                f"--ckpt_path last: no run of experiment {experiment_name!r} has a last.ckpt in "
                f"{folder}/<run>/checkpoints/; pass a checkpoint file, or leave --ckpt_path out to start afresh"
            )
        path = str(found[-1])
        load_checkpoint(path)
        config["ckpt_path"] = self.config_init[self.subcommand]["ckpt_path"] = path
        _report(f"--ckpt_path last: {path}")

    def _checkpoint_run(self) -> str | None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return None
        info = read_run_info(ckpt_path)
        return info["run_id"] if info else None

    def _prepare_logger(self) -> None:
        """Continue the checkpoint's MLflow run, else name the new run ``<backbone>-<dataset>-<time>``."""
        self._resolve_last_checkpoint()
        logger = find_mlflow_logger(self.trainer)
        if not isinstance(logger, MLflowLogger):
            return
        run_id = self._checkpoint_run()
        if run_id is not None:
            logger.continue_run(run_id)
            if self.subcommand == "fit":  # a resumed fit replays what followed its checkpoint: log it once
                logger.skip_logged_steps()
            elif self.subcommand in ("validate", "test"):  # evaluated again: after the run's last step, no duplicate
                logger.append_after_logged_steps()
        else:
            stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"  # fits started together differ
            dataset = getattr(self.datamodule, "name", type(self.datamodule).__name__)
            logger.name_run(f"{self.model.hparams.backbone}-{dataset}-{stamp}")

    # LightningCLI calls ``before_<subcommand>``; its ``predict`` is removed (``subcommands``), so no hook for it
    before_fit = before_validate = before_test = _prepare_logger

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit") and not self.trainer.interrupted:
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            _report(f"Testing the best checkpoint (by {self.trainer.checkpoint_callback.monitor}): {best}")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
        self._print_run()

    @rank_zero_only
    def _print_run(self) -> None:
        logger = find_mlflow_logger(self.trainer)
        if logger is None or logger.run_id is None:
            return
        tracking_uri = mlflow_logger_settings(logger)[0]
        lines = [f"MLflow run {logger.run_id} (experiment {logger.experiment_id}) in {redacted('uri', tracking_uri)}"]
        if self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path:
            lines.append(f"Best checkpoint: {self.trainer.checkpoint_callback.best_model_path}")
        hint = ui_hint(tracking_uri, logger.experiment_id, logger.run_id)
        _report("\n".join(lines + ([hint] if hint else [])))

    after_validate = after_test = _print_run


def _refuse_if_newest_run_has_no_checkpoint(client: Any, experiment_id: str, folder: Path) -> None:
    """``--ckpt_path last`` must continue the newest fit: refuse when the newest unfinished fit run has no
    ``last.ckpt`` (stopped in its first epoch), rather than reopen an older run with other settings."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=20)
    newest = next((run for run in runs if "medtransfer.command" not in run.data.tags), None)
    if newest is None or newest.info.status == "FINISHED":
        return
    if not (folder / newest.info.run_id / "checkpoints" / "last.ckpt").is_file():
        raise MedtransferError(
            f"--ckpt_path last: the newest run {newest.info.run_id} ({newest.info.run_name}, {newest.info.status}) "
            "has no last.ckpt: it stopped before its first epoch ended, so there is nothing of it to resume. Start "
            "it afresh (leave out --ckpt_path), or name an older run's checkpoint file to continue that run"
        )


class _DropAdvertisements(logging.Filter):
    """Lightning advertises its cloud logger on every run; medtransfer logs to MLflow, so drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_DROP_ADVERTISEMENTS = _DropAdvertisements()


_FITS_BUILT: list[bool] = []  # non-empty once this process has built a CLI (see _quiet_third_party_noise)


def _quiet_third_party_noise() -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_ADVERTISEMENTS)  # once: same object
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; users can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
    # LastCheckpoint is a second ModelCheckpoint by design; `test` after fit uses the configured (first) one.
    warnings.filterwarnings("ignore", message=r".*called with Trainer configured with multiple `ModelCheckpoint`")
    # albumentations' tuple defaults (CLAHE's tile_grid_size=(8, 8)) are saved as YAML lists, which the same
    # transforms accept: the config round-trips in effect, and the user has nothing to change.
    warnings.filterwarnings("ignore", message=r"\s*Dump of a value that does not round-trip: a tuple is serialized")
    # Said at the first fit of a process, not again at every fit of a search or learning curve.
    if _FITS_BUILT:
        warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")


@rank_zero_only  # under DDP every rank runs the CLI's hooks; one copy of each message is enough
def _report(message: str) -> None:
    print(message, flush=True)


#: Exit status of a fit, validate or test stopped by SIGTERM: 128 + 15, as a shell reports a process it killed.
SIGTERM_EXIT_STATUS = 143


def main(args: list[str] | None = None) -> None:
    """``medtransfer fit|validate|test``: Lightning's CLI, with SIGTERM as exit status 143 and one-line errors."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stop(signum: int, frame: Any) -> None:  # SIGTERM between Lightning's own handlers (e.g. fit -> test)
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with exit_on_user_error():
            build_cli(args)
    except SIGTERMException:  # Lightning raises it as SystemExit(None), which would exit 0: a scheduler's "success"
        print(
            f"medtransfer: stopped by SIGTERM (exit status {SIGTERM_EXIT_STATUS}); the MLflow run is marked KILLED. "
            "Resume it with the same command plus --ckpt_path last",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(SIGTERM_EXIT_STATUS)
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[MedTransferCLI] = MedTransferCLI
) -> MedTransferCLI:
    """The project's LightningCLI over ``args`` (``["fit", "--config", ...]``); runs the subcommand if ``run``.
    ``cli_class`` lets a command add its own options to fit's (``lr-find``)."""
    _quiet_third_party_noise()
    _FITS_BUILT.append(True)
    return cli_class(
        ClassifierModule,
        ClassificationDataModule,
        subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults={
            "logger": {"class_path": "medtransfer.tracking.mlflow.MLflowLogger"},
            "callbacks": [MLflowRunTracking(), EpochSummary(), TestReportPlots(), FiniteCheck(), LastCheckpoint()],
            "default_root_dir": "mlruns",
            "plugins": {"class_path": "medtransfer.callbacks.atomic_checkpoint.AtomicCheckpointIO"},
        },
        seed_everything_default=0,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
