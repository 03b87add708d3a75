"""The private attributes of Lightning that ``medtransfer.upstream`` reads or writes still exist and mean what
it assumes: each test fails loudly on the upgrade that renames one, pointing at the one function to fix."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.upstream import batches_that_stepped, mlflow_logger_settings


def test_mlflow_logger_settings_reads_what_lightnings_mlflow_logger_keeps_privately(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="exp", tracking_uri=uri, artifact_location=str(tmp_path / "art"))
    assert mlflow_logger_settings(logger) == (uri, "exp", str(tmp_path / "art"))


class _Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batches_that_stepped_counts_the_optimizer_steps_lightning_logs_at(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)
    trainer = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=3)  # fmt: skip
    trainer.fit(_Linear(), data)
    assert batches_that_stepped(trainer) == trainer.global_step == 2  # 3 batches an epoch, one step each


def test_mlflow_logger_run_settings_are_set_before_the_run_starts_and_used_when_it_does(tmp_path):
    from medtransfer.upstream import mlflow_logger_run, mlflow_logger_started, set_mlflow_logger_run

    logger = MLFlowLogger(experiment_name="exp", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert not mlflow_logger_started(logger) and mlflow_logger_run(logger) == (None, None)
    set_mlflow_logger_run(logger, run_name="named-late")
    run = logger.experiment.get_run(logger.run_id)  # creates the run
    assert mlflow_logger_started(logger) and run.info.run_name == "named-late"
    again = MLFlowLogger(experiment_name="exp", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    set_mlflow_logger_run(again, run_id=logger.run_id)
    assert again.run_id == logger.run_id and mlflow_logger_run(again)[0] == logger.run_id


def test_attached_trainer_is_none_until_a_trainer_holds_the_module(tmp_path):
    from medtransfer.upstream import attached_trainer

    module = _Linear()
    assert attached_trainer(module) is None
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
    assert attached_trainer(module) is trainer
