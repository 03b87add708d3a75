"""``medtransfer lr-find``: Lightning's finder swept over the right parameters for each phase, logged to MLflow."""

from __future__ import annotations

import pytest
from helpers import DEFAULT_CONFIG
from mlflow.tracking import MlflowClient

from medtransfer.commands.command_line import run_command
from medtransfer.entry import COMMANDS
from medtransfer.tracking.mlflow import resolve_tracking_uri

TINY = [
    f"--config={DEFAULT_CONFIG}",
    "--data.image_size=32",
    "--trainer.enable_progress_bar=false",
    "--lr_find.num_training=16",
    "--lr_find.min_lr=1e-5",
    "--lr_find.max_lr=1e-1",
]


def _run(pneumonia_npz, *extra):
    return run_command(COMMANDS["lr-find"], [*TINY, f"--data.path={pneumonia_npz}", *extra])


def test_head_phase_sweeps_only_the_head_and_logs_plot_and_suggestion(workdir, pneumonia_npz, capsys):
    result = _run(pneumonia_npz)
    assert result.phase == "head" and result.config_key == "model.optimizer.init_args.lr"
    assert result.trainable_parameters == 1281  # Lite0's 1280 features -> one logit
    assert len(result.lrs) == 16 and result.lrs[0] == pytest.approx(1e-5) and result.lrs[-1] > 1e-2
    assert result.suggestion is not None and 1e-5 <= result.suggestion <= 1e-1
    run = MlflowClient(resolve_tracking_uri()).get_run(result.run_id)
    assert run.data.metrics["lr_find/suggestion"] == pytest.approx(result.suggestion)
    assert run.data.params["lr_find.phase"] == "head"
    artifacts = [a.path for a in MlflowClient(resolve_tracking_uri()).list_artifacts(result.run_id, "plots")]
    assert artifacts == ["plots/lr_find_head.png"]
    out = capsys.readouterr().out
    assert "set model.optimizer.init_args.lr" in out
    link = f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"See it in the MLflow UI (make ui): http://127.0.0.1:5000{link}" in out


def test_finetune_phase_sweeps_the_blocks_finetuning_unfreezes(workdir, pneumonia_npz):
    top = _run(pneumonia_npz, "--lr_find.phase=finetune", "--finetuning.unfreeze_blocks=1")
    everything = _run(pneumonia_npz, "--lr_find.phase=finetune")
    assert 1281 < top.trainable_parameters < everything.trainable_parameters
    assert everything.config_key == "finetuning.finetune_lr"


def test_an_empty_range_is_a_one_line_error(workdir, pneumonia_npz, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(pneumonia_npz, "--lr_find.min_lr=1e-2", "--lr_find.max_lr=1e-3")
    assert exit_info.value.code != 0
    assert "min_lr < max_lr" in capsys.readouterr().err
