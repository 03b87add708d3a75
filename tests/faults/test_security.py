"""Security basics: a checkpoint carrying pickled code never runs it, servers bind 127.0.0.1, secrets stay out of
MLflow.

The payload checkpoint's pickle calls ``os.system("touch <marker>")`` when unpickled without
``weights_only=True``; every way medtransfer loads a checkpoint must refuse it with one clear error, and the
marker file must never appear, even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which flips torch's default for
loads that do not pass ``weights_only`` themselves, as Lightning's ``ckpt_path`` loads do).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medtransfer.commands.predict import load_predictor
from medtransfer.entry import main
from medtransfer.errors import MedtransferError
from medtransfer.tracking.callbacks import find_mlflow_logger, flatten_config, read_run_info

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
SMALL = [
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--data.image_size=32",
]  # fmt: skip
SECRETS = {"AWS_SECRET_ACCESS_KEY": "abcSECRETabc", "MY_API_TOKEN": "xyzTOKENxyz", "DB_PASSWORD": "hunter2hunter"}


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a checkpoint shaped like medtransfer's whose pickle would create ``marker``."""
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"payload": _Payload(marker)}, "pytorch-lightning_version": "2.6.0",
         "mlflow": {"run_id": "0" * 32, "experiment_id": "0", "tracking_uri": "sqlite:///x.db"}},
        checkpoint,
    )  # fmt: skip
    return checkpoint, marker


@pytest.fixture
def images(tmp_path, pneumonia_npz) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    with np.load(pneumonia_npz) as data:
        for i, image in enumerate(data["test_images"][:4]):
            Image.fromarray(image).save(folder / f"case{i}.png")
    return folder


def _load_paths(checkpoint: Path, images: Path, npz: Path, tmp_path: Path) -> dict[str, callable]:
    """Every way a user or the project loads a checkpoint, each as a call."""
    common = [f"--config={CONFIG}", f"--data.path={npz}", *SMALL, f"--ckpt_path={checkpoint}"]
    return {
        "load_predictor": lambda: load_predictor(checkpoint),
        "read_run_info": lambda: read_run_info(checkpoint),
        "medtransfer predict": lambda: main(["predict", str(images), str(checkpoint), f"--output={tmp_path}/p.csv"]),
        "medtransfer test --ckpt_path": lambda: main(["test", *common]),
        "medtransfer fit --ckpt_path (resume)": lambda: main(["fit", *common]),
        "Lightning's own load (no MLflow logger)": lambda: main(["test", *common, "--trainer.logger=false"]),
    }


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    return tmp_path


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["torch-default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_no_checkpoint_load_runs_a_pickled_payload(payload, images, pneumonia_npz, in_tmp, monkeypatch, force_unsafe):
    checkpoint, marker = payload
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for name, load in _load_paths(checkpoint, images, pneumonia_npz, in_tmp).items():
        with pytest.raises((Exception, SystemExit)):
            load()
        assert not marker.exists(), f"{name} ran the checkpoint's pickled code"


def test_a_pickled_payload_is_refused_with_one_clear_error_naming_the_file(
    payload, images, pneumonia_npz, in_tmp, capsys
):
    checkpoint, marker = payload
    for name, load in _load_paths(checkpoint, images, pneumonia_npz, in_tmp).items():
        if not name.startswith(("load_predictor", "read_run_info")):  # a command: one line on stderr, status 2
            with pytest.raises(SystemExit) as exited:
                load()
            err = capsys.readouterr().err
            assert exited.value.code == 2 and err.startswith("medtransfer: error:"), (name, err[-300:])
            assert str(checkpoint) in err and "Traceback" not in err, name
        else:
            with pytest.raises(MedtransferError, match=re.escape(str(checkpoint))):
                load()
    assert not marker.exists()


def test_make_ui_binds_127_0_0_1_unless_the_user_sets_host():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.MULTILINE)
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1)
    assert "--host $(HOST)" in recipe
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "ui"], capture_output=True, text=True, check=True).stdout
    assert "--host 127.0.0.1" in next(line for line in dry.splitlines() if "mlflow ui" in line)
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "ui", "HOST=0.0.0.0"], capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in dry  # only when the user says so


def test_no_server_the_project_or_its_tests_start_listens_beyond_localhost():
    sources = [*(REPO / "src").rglob("*.py"), REPO / "tests" / "servers.py", *(REPO / "bench").glob("*.py")]
    serve = REPO / "src" / "medtransfer" / "commands" / "serve.py"
    for path in sources:
        text = path.read_text()
        assert "0.0.0.0" not in text or path == serve, path  # serve offers it, only when the user names it:
        for host in re.findall(r"""["']--host["'],\s*["']([^"']+)""", text):
            assert host == "127.0.0.1", path
    assert '"--host", "127.0.0.1"' in (REPO / "tests" / "servers.py").read_text()
    from medtransfer.commands.serve import run_serve

    assert inspect.signature(run_serve).parameters["host"].default == "127.0.0.1"


@pytest.mark.slow
def test_secret_environment_values_never_reach_mlflow_params_or_tags(pneumonia_npz, in_tmp, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    from medtransfer.commands.fit import build_cli

    cli = build_cli(["fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", *SMALL])
    run = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlruns/mlflow.db").get_run(find_mlflow_logger(cli.trainer).run_id)
    recorded = [*run.data.params.items(), *run.data.tags.items()]
    assert len(run.data.params) > 20
    for key, value in recorded:
        assert not any(secret in value for secret in SECRETS.values()), key
    config = Path(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/config/fit.yaml", dst_path=str(in_tmp)))
    assert not any(secret in config.read_text() for secret in SECRETS.values())


def test_credentials_in_config_values_are_redacted_from_params():
    config = yaml.safe_load(
        """
        trainer:
          logger:
            class_path: medtransfer.tracking.mlflow.MLflowLogger
            init_args:
              tracking_uri: http://alice:s3cretpass@mlflow.example.org:5000
              tags: {db_password: hunter2hunter, api_token: xyzTOKENxyz, team: radiology}
        """
    )
    params = flatten_config(config)
    assert "mlflow.example.org:5000" in params["trainer.logger.tracking_uri"]
    assert params["trainer.logger.tags.team"] == "radiology"
    for value in params.values():
        assert not any(secret in value for secret in ("s3cretpass", "hunter2hunter", "xyzTOKENxyz")), params
