"""Diagnostics callbacks: gradient norms per block, activation statistics on sampled steps only, the YAML file
that switches them on next to the default callbacks, and the overfit-one-batch sanity mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEFAULT_CONFIG, tiny_fit_args, tiny_loaders
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch import nn

from medtransfer.callbacks.diagnostics import (
    ActivationStats,
    GradientStats,
    activation_layers,
    activation_stats,
    parameter_blocks,
)
from medtransfer.callbacks.epoch_summary import EpochSummary
from medtransfer.callbacks.worst_errors import WorstErrorsGallery
from medtransfer.commands.fit import build_cli
from medtransfer.models.classifier import ClassifierModule
from medtransfer.tracking import report
from medtransfer.tracking.callbacks import MLflowRunTracking, find_mlflow_logger

REPO = Path(__file__).resolve().parents[2]
DIAGNOSTICS_CONFIG = REPO / "configs" / "callbacks" / "diagnostics.yaml"
SMALL = tiny_fit_args()
LITE0_BLOCKS = [
    "backbone.conv_stem-bn1",
    "backbone.blocks.0.0",
    *(f"backbone.blocks.{i}" for i in range(1, 6)),
    "backbone.blocks.6.0-conv_head-bn2",
    "head",
]


@pytest.fixture(scope="module")
def lite0() -> ClassifierModule:
    return ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="none")


# -- grouping ----------------------------------------------------------------------------------------------------


def test_parameter_blocks_follow_timm_blocks_and_hold_every_parameter_once(lite0):
    blocks = parameter_blocks(lite0)
    assert list(blocks) == LITE0_BLOCKS
    grouped = [name for names in blocks.values() for name in names]
    assert sorted(grouped) == sorted(name for name, _ in lite0.named_parameters())
    assert len(grouped) == len(set(grouped))


def test_blocks_that_share_a_prefix_get_distinct_names():
    densenet = ClassifierModule(backbone="densenet121", pretrained="none")
    names = list(parameter_blocks(densenet))
    assert names == [
        "backbone.features.conv0-norm0",
        "backbone.features.denseblock1-transition1",
        "backbone.features.denseblock2-transition2",
        "backbone.features.denseblock3-transition3",
        "backbone.features.denseblock4",
        "backbone.features.norm5",
        "head",
    ]


def test_a_module_without_backbone_is_grouped_by_its_children():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 1), nn.GELU())
    assert parameter_blocks(net) == {"0": ["0.weight", "0.bias"], "3": ["3.weight", "3.bias"]}
    assert activation_layers(net) == ["1", "4"]


def test_activation_layers_are_the_last_activation_of_each_block(lite0):
    layers = activation_layers(lite0)
    assert layers == [
        "backbone.bn1.act",
        "backbone.blocks.0.0.bn1.act",
        "backbone.blocks.1.1.bn2.act",
        "backbone.blocks.2.1.bn2.act",
        "backbone.blocks.3.2.bn2.act",
        "backbone.blocks.4.2.bn2.act",
        "backbone.blocks.5.3.bn2.act",
        "backbone.bn2.act",
    ]
    modules = dict(lite0.named_modules())
    assert all(isinstance(modules[name], nn.ReLU6) for name in layers)  # EfficientNet-Lite uses ReLU6
    assert activation_layers(lite0, max_layers=3) == [layers[0], layers[4], layers[-1]]
    with pytest.raises(ValueError, match="Expected argument `max_layers` to be at least 1, but got 0"):
        activation_layers(lite0, max_layers=0)


# -- statistics --------------------------------------------------------------------------------------------------


def test_a_dead_unit_is_a_channel_that_is_zero_for_every_image_and_position():
    output = torch.rand(4, 3, 2, 2) + 0.1
    output[:, 0] = 0  # dead
    output[1:, 1] = 0  # alive: image 0 activates it
    stats = activation_stats(output, relu_like=True)
    assert stats["dead_frac"] == pytest.approx(1 / 3)
    assert stats["mean"] == pytest.approx(float(np.mean(output.numpy())))
    assert stats["std"] == pytest.approx(float(np.std(output.numpy(), ddof=1)), rel=1e-5)
    assert set(activation_stats(output, relu_like=False)) == {"mean", "std"}
    assert activation_stats(torch.zeros(8, 5), relu_like=True)["dead_frac"] == 1.0  # (N, features)


def test_gradient_norms_per_block_agree_with_torch():
    model = ClassifierModule(backbone="resnet10t", pretrained="none")
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    norms = GradientStats().norms(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert norms["diag/grad_norm/total"] == pytest.approx(float(torch.nn.utils.get_total_norm(grads.values())))
    for block, names in parameter_blocks(model).items():
        expected = torch.nn.utils.get_total_norm([grads[name] for name in names])
        assert norms[f"diag/grad_norm/{block}"] == pytest.approx(float(expected), rel=1e-5)
    inf_norm = GradientStats(norm_type=float("inf")).norms(model)["diag/grad_norm/total"]
    assert inf_norm == pytest.approx(max(float(g.abs().max()) for g in grads.values()))


def test_frozen_blocks_have_no_gradient_norm():
    model = ClassifierModule(backbone="resnet10t", pretrained="none")
    model.backbone.requires_grad_(False)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert set(GradientStats().norms(model)) == {"diag/grad_norm/total", "diag/grad_norm/head"}


@pytest.mark.parametrize("callback", [GradientStats, ActivationStats])
def test_an_interval_below_one_is_refused(callback):
    with pytest.raises(ValueError, match="Expected argument `every_n_steps` to be None or at least 1, but got 0"):
        callback(every_n_steps=0)


# -- in a Trainer ------------------------------------------------------------------------------------------------


class HookCount(Callback):
    """After each forward pass: how many forward hooks the model holds."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.counts.append(sum(len(module._forward_hooks) for module in pl_module.modules()))


def test_statistics_are_logged_on_sampled_steps_and_hooks_exist_only_there(tmp_path):
    seed_everything(0)
    model = ClassifierModule(backbone="resnet10t", pretrained="none")
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    probe = HookCount()
    trainer = Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[GradientStats(every_n_steps=2), ActivationStats(every_n_steps=2), probe],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, tiny_loaders()[0])
    layers = activation_layers(model)
    assert probe.counts == [len(layers), 0, len(layers), 0]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    metrics = client.get_run(logger.run_id).data.metrics
    for block in parameter_blocks(model):
        assert f"diag/grad_norm/{block}" in metrics, block
    for layer in layers:
        assert {f"diag/act/{layer}/{s}" for s in ("mean", "std", "dead_frac")} <= set(metrics), layer
    for key in ("diag/grad_norm/total", f"diag/act/{layers[-1]}/dead_frac"):
        assert [m.step for m in client.get_metric_history(logger.run_id, key)] == [0, 2]
    assert all(not module._forward_hooks for module in model.modules())


# -- switched on in YAML -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_diagnostics_config_adds_its_callbacks_and_keeps_the_defaults(workdir, pneumonia_npz, capsys):
    cli = build_cli(
        ["fit", f"--config={DEFAULT_CONFIG}", f"--config={DIAGNOSTICS_CONFIG}", f"--data.path={pneumonia_npz}", *SMALL]
    )
    kinds = {type(callback) for callback in cli.trainer.callbacks}
    assert {GradientStats, ActivationStats, WorstErrorsGallery} <= kinds
    assert {MLflowRunTracking, EpochSummary, report.TestReportPlots} <= kinds
    run_id = find_mlflow_logger(cli.trainer).run_id
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert "diag/grad_norm/total" in metrics and "diag/grad_norm/head" in metrics
    assert "diag/act/backbone.bn2.act/dead_frac" in metrics
    diagnostics = {Path(a.path).name for a in client.list_artifacts(run_id, "diagnostics")}
    assert diagnostics == {f"worst_errors_{stage}.{ext}" for stage in ("val", "test") for ext in ("png", "csv")}
    # the defaults still ran: test report plots, best checkpoint logged, one line per epoch
    assert {"plots", "checkpoints"} <= {a.path for a in client.list_artifacts(run_id)}
    assert "epoch 2/2" in capsys.readouterr().out


@pytest.mark.slow
def test_overfit_one_batch_drives_the_training_loss_to_zero(workdir, pneumonia_npz):
    """docs/fine-tuning.md's sanity mode: with Lightning's ``overfit_batches=1`` a healthy pipeline memorises one batch.

    PneumoniaMNIST's training split is sorted by class (its first 3477 images are all pneumonia), so the first
    batch alone would hold one class and a constant output would "overfit" it; a stratified 0.5 % subset
    (18 pneumonia, 7 normal) in one batch of 32 holds both.
    """
    cli = build_cli(
        [
            "fit",
            f"--config={DEFAULT_CONFIG}",
            f"--data.path={pneumonia_npz}",
            "--trainer.overfit_batches=1",
            "--trainer.max_epochs=30",
            "--trainer.enable_progress_bar=false",
            "--finetuning.unfreeze_at_epoch=0",
            "--finetuning.finetune_lr=1e-3",
            "--data.image_size=32",
            "--data.train_fraction=0.005",
            "--data.batch_size=32",
            "--data.rotate_degrees=0",
            "--data.translate=0",
            "--data.scale=0",
            "--checkpoint.save_last=false",
            "--test_after_fit=false",
        ]
    )
    labels = next(iter(cli.datamodule.train_dataloader()))[1]
    assert set(labels.tolist()) == {0, 1}
    assert float(cli.trainer.callback_metrics["train/loss"]) < 0.05
    # Lightning 2 validates on the first *validation* batch (not the training batch), so val/auroc exists and
    # the checkpoint callback that monitors it works
    assert 0.0 <= float(cli.trainer.callback_metrics["val/auroc"]) <= 1.0
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()
