"""End to end: the risk-control overlay on the default config calibrates on a held-out split, and the guarantee
reaches the checkpoint, the MLflow run and the MLflow model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from helpers import DEFAULT_CONFIG, REPO, tiny_fit_args

from medtransfer.commands.fit import build_cli
from medtransfer.tracking.callbacks import find_mlflow_logger

OVERLAY = REPO / "configs" / "decisions" / "risk_control.yaml"


def test_overlay_calibrates_on_held_out_data_and_records_the_guarantee(tmp_path, pneumonia_npz, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    cli = build_cli(["fit", f"--config={DEFAULT_CONFIG}", f"--config={OVERLAY}", f"--data.path={pneumonia_npz}",
                     *tiny_fit_args(), "--mlflow_model.registered_model_name="])  # fmt: skip
    assert len(cli.datamodule.datasets["calib"]) + len(cli.datamodule.datasets["val"]) == 524
    checkpoint = torch.load(tmp_path / cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    calibration = checkpoint["calibration"]
    assert calibration["source"] == "calib" and calibration["n"] == len(cli.datamodule.datasets["calib"])
    assert calibration["risk_control"]["target_risk"] == 0.05 and calibration["risk_control"]["delta"] == 0.1
    run_id = find_mlflow_logger(cli.trainer).run_id
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    metrics = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    for key in ("calib/certified", "calib/certified_coverage", "test/calib_risk_bound", "test/shift_ks_p"):
        assert key in metrics, key
    mlflow.set_tracking_uri(store)  # undone after the test (conftest)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.metadata["calibration"]["risk_control"] == calibration["risk_control"]
    assert Path(OVERLAY).is_file()
