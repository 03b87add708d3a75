"""The internals of Lightning, torch and MLflow that ``medtransfer.upstream`` reads or writes still exist and mean
what it assumes: each test fails loudly on the upgrade that renames one (or fixes the issue a helper waits for),
pointing at the one function to fix or remove."""

from __future__ import annotations

import pytest
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


_LR = torch.optim.lr_scheduler
_SCHEDULERS = {
    "LambdaLR": lambda opt: _LR.LambdaLR(opt, lambda epoch: 0.5**epoch),
    "OneCycleLR": lambda opt: _LR.OneCycleLR(opt, max_lr=0.1, total_steps=4),
    "ReduceLROnPlateau": lambda opt: _LR.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=[0.0]),
}


def _scheduled_lrs(name: str, extend: bool) -> tuple[float, float] | None:
    """The learning rates of the first group and of one added after the scheduler, after three steps; ``None``
    when the scheduler fails on the added group."""
    from medtransfer.upstream import extend_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    scheduler = _SCHEDULERS[name](optimizer)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01})
    if extend:
        extend_scheduler(scheduler, optimizer.param_groups[1])
    try:
        for _ in range(3):
            optimizer.step()
            scheduler.step(1.0) if name == "ReduceLROnPlateau" else scheduler.step()
    except (IndexError, KeyError, RuntimeError, ValueError):
        return None
    return optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_extend_scheduler_makes_a_torch_scheduler_schedule_a_group_added_after_it(name):
    first, added = _scheduled_lrs(name, extend=True)
    assert first != 0.1 and added == pytest.approx(first / 10)  # scheduled like the first group, at its own scale
    unextended = _scheduled_lrs(name, extend=False)  # when torch learns this itself, extend_scheduler can go
    assert unextended is None or unextended[1] != pytest.approx(unextended[0] / 10), "pytorch/pytorch#53712 fixed?"


def test_system_metrics_sampler_logs_a_last_sample_into_an_existing_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from medtransfer.upstream import start_system_metrics, stop_system_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("exp"))
    monitor = start_system_metrics(run.info.run_id, uri, interval_s=600, samples_before_logging=1)
    stop_system_metrics(monitor)  # long before the first sample of the interval
    assert "system/cpu_utilization_percentage" in client.get_run(run.info.run_id).data.metrics
