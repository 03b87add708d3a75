"""Fit options for GPUs, run end to end on the CPU: mixed precision (``bf16-mixed`` autocast), channels_last
memory format and ``torch.compile`` of the backbone."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from helpers import DEFAULT_CONFIG, tiny_fit_args

from medtransfer.checkpoints import load_checkpoint
from medtransfer.commands.fit import build_cli


def _only_run(workdir):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["medtransfer"])
    assert len(runs) == 1
    return runs.iloc[0]


@pytest.mark.slow
def test_bf16_mixed_fit_and_test_run_end_to_end_on_cpu(workdir, pneumonia_npz):
    cli = build_cli(
        ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *tiny_fit_args(3, 2, 2),
         "--trainer.precision=bf16-mixed", "--test_after_fit=true"]
    )  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"
    run = _only_run(workdir)
    assert run["status"] == "FINISHED"
    for metric in ("train/loss", "val/loss", "val/auroc", "test/auroc", "test/ece"):
        assert math.isfinite(run[f"metrics.{metric}"]), metric
    checkpoint = load_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    stored = [v.dtype for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    assert set(stored) <= {torch.float32, torch.float64} and torch.float32 in stored  # full precision, never bf16


@pytest.mark.slow
def test_channels_last_and_compile_fit_a_tiny_model_end_to_end(workdir, pneumonia_npz):
    cli = build_cli(
        ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *tiny_fit_args(2, 2, 1),
         "--model.backbone=resnet10t", "--model.pretrained=none", "--model.channels_last=true",
         "--model.compile=true", "--test_after_fit=true"]
    )  # fmt: skip
    model = cli.model
    assert model.backbone._compiled_call_impl is not None  # nn.Module.compile: compiled in place
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert _only_run(workdir)["status"] == "FINISHED"
    state = load_checkpoint(cli.trainer.checkpoint_callback.best_model_path)["state_dict"]
    assert not [key for key in state if "_orig_mod" in key]  # loads into an uncompiled model
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled = model(x)
        model.backbone._compiled_call_impl = None  # the same weights, eagerly
        eager = model(x)
    assert torch.allclose(compiled, eager, atol=1e-4)
