"""Shared fixtures: the real data files, found where the CLI finds them (``$MEDTRANSFER_DATA_DIR``, then
``~/.cache/medtransfer/data``), else in the shared copy beside the repository (``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medtransfer.data.medmnist import default_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_file(name: str) -> Path:
    """``name`` in the CLI's data folder (``$MEDTRANSFER_DATA_DIR``, else ``~/.cache/medtransfer/data``) when it
    is there (``make fit`` downloads PneumoniaMNIST to it), else in ``../shared/data`` beside the repository."""
    found = default_data_dir() / name
    return (found if found.exists() else REPO_ROOT.parent / "shared" / "data" / name).resolve()


def require_file(path: Path) -> Path:
    """Skip when a shared data file is missing on a user's machine; fail in CI, where it must exist."""
    if not path.is_file():
        message = f"test data {path} is not available (set MEDTRANSFER_DATA_DIR to the folder holding it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    """The real PneumoniaMNIST file (official val/test splits)."""
    return require_file(data_file("pneumoniamnist.npz"))


@pytest.fixture(scope="session")
def chexnet_dir() -> Path:
    """The CheXNet reproduction: its predictions, its published per-finding AUROCs and the full label file."""
    folder = data_file("chexnet_reproduction")
    for name in ("preds.csv", "aucs.csv", "Data_Entry_2017_v2020.csv.gz"):
        require_file(folder / name)
    return folder


@pytest.fixture(scope="session")
def chestxray14_sample_dir() -> Path:
    """The real 500-image ChestX-ray14 sample: ``Data_Entry_2017_v2020.csv`` and ``images/*.png``."""
    folder = data_file("chestxray14_sample")
    require_file(folder / "Data_Entry_2017_v2020.csv")
    return folder


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder with no ``MLFLOW_TRACKING_URI``, so ``mlruns/`` (MLflow and Optuna stores) is the
    test's own; ``sys.argv`` holds no pytest arguments, which the CLI would otherwise see."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    return tmp_path


@pytest.fixture(autouse=True)
def _isolated_mlflow_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``; undo it after each test, so no test's store
    leaks into the next one."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    mlflow.set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
