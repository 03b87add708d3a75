"""A fit leaves a complete MLflow run: tags, resolved params, per-epoch metrics with the phase, artifacts;
a resumed fit keeps the run's original tags."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import DEFAULT_CONFIG, tiny_fit_args
from mlflow import MlflowClient

from medtransfer.commands.fit import build_cli
from medtransfer.tracking.callbacks import find_mlflow_logger, flatten_config

TINY = tiny_fit_args(train_batches=3, val_batches=2, test_batches=2)


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, pneumonia_npz):
    """One tiny fit + test of the default config, run inside a fresh git repository (its working directory)."""
    folder = tmp_path_factory.mktemp("project")
    _git(folder, "init", "-q")
    (folder / "README.md").write_text("experiments\n")
    _git(folder, "add", "README.md")
    _git(folder, "commit", "-q", "-m", "first")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("sys.argv", ["medtransfer"])
        cli = build_cli(["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY])
        logger = find_mlflow_logger(cli.trainer)
        yield {"folder": folder, "cli": cli, "client": MlflowClient(logger.tracking_uri), "run_id": logger.run_id}


@pytest.mark.slow
def test_run_is_tagged_with_commit_dataset_hash_versions_and_devices(fitted, pneumonia_npz):
    tags = fitted["client"].get_run(fitted["run_id"]).data.tags
    assert tags["git.commit"] == _git(fitted["folder"], "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"  # mlruns/ is untracked
    assert tags["dataset.name"] == "pneumoniamnist"
    assert tags["dataset.sha256"] == hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest()
    assert tags["version.torch"] == torch.__version__
    assert {"version.lightning", "version.timm", "version.medtransfer", "version.python"} <= set(tags)
    assert tags["host"] == socket.gethostname()
    assert (tags["accelerator"], tags["devices"], tags["world_size"]) == ("cpu", "1", "1")
    assert tags["mlflow.runName"].startswith("tf_efficientnet_lite0-pneumoniamnist-")


@pytest.mark.slow
def test_run_params_hold_the_config_and_the_resolved_input_pipeline(fitted):
    params = fitted["client"].get_run(fitted["run_id"]).data.params
    config = flatten_config(fitted["cli"].config.fit.as_dict())
    for key in ("model.backbone", "model.pretrained", "finetuning.finetune_lr", "model.optimizer.lr"):
        assert params[key] == config[key], key
    assert params["data.resolved.image_size"] == "32"
    train = params["data.resolved.train_pipeline"]
    assert train.startswith("Resize(height=32, interpolation=2, width=32) > Affine(p=1, rotate=(-10, 10)")  # bicubic
    assert "CLAHE" not in train and "RandomBrightnessContrast" not in train  # the config turns both off
    assert "Affine" not in params["data.resolved.eval_pipeline"]


@pytest.mark.slow
def test_every_epoch_logs_train_and_val_metrics_with_its_finetuning_phase(fitted):
    client, run_id = fitted["client"], fitted["run_id"]
    phases = [m.value for m in client.get_metric_history(run_id, "finetune/phase")]
    assert phases[:2] == [1.0, 2.0]  # unfreeze_at_epoch=1: head only, then the backbone too
    for metric in ("train/loss", "train/auroc", "val/loss", "val/auroc"):
        assert len(client.get_metric_history(run_id, metric)) >= 2, metric
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "config", "plots"} <= artifacts
    assert "config/fit.yaml" in [a.path for a in client.list_artifacts(run_id, "config")]


@pytest.mark.slow
def test_resumed_fit_keeps_the_runs_original_tags(fitted, pneumonia_npz):
    client, run_id = fitted["client"], fitted["run_id"]
    client.set_tag(run_id, "host", "the-original-host")
    original = client.get_run(run_id).data.tags
    last = next(Path(fitted["folder"]).glob("mlruns/*/*/checkpoints/last.ckpt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fitted["folder"])
        mp.setattr("sys.argv", ["medtransfer"])
        (fitted["folder"] / "README.md").write_text("edited: the resumed fit runs on a dirty tree\n")
        cli = build_cli(
            ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY, "--trainer.max_epochs=3",
             "--test_after_fit=false", f"--ckpt_path={last}"]
        )  # fmt: skip
    assert find_mlflow_logger(cli.trainer).run_id == run_id
    tags = client.get_run(run_id).data.tags
    assert tags["host"] == "the-original-host" and tags["git.dirty"] == "false"
    placing = [k for k in original if k.startswith(("git.", "dataset.", "version.")) or k in ("accelerator", "devices")]
    assert len(placing) > 10 and {k: tags[k] for k in placing} == {k: original[k] for k in placing}
    assert len(client.get_metric_history(run_id, "val/auroc")) == 3
