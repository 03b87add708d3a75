"""The quickstart notebook runs top to bottom on the real data, so it never rots: its fit, MLflow run,
figures, predictions and heatmaps are all checked."""

from __future__ import annotations

from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _outputs(notebook: nbformat.NotebookNode, mime: str) -> list:
    return [out for cell in notebook.cells for out in cell.get("outputs", []) if mime in out.get("data", {})]


def _this_interpreters_kernel(folder: Path) -> KernelManager:
    """A ``python3`` kernel on ``sys.executable`` (this venv), whatever ``python3`` kernels a user has installed."""
    write_kernel_spec(folder / "python3")
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def test_the_committed_quickstart_has_no_stored_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, pneumonia_npz):
    """The quickstart executed by a real Jupyter kernel in an empty folder, as a user would run it."""
    folder = tmp_path_factory.mktemp("quickstart")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTRANSFER_DATA_DIR", str(pneumonia_npz.parent))
    mp.setenv("MEDTRANSFER_REPO", str(REPO))
    mp.setenv("QUICKSTART_WORKDIR", str(folder / "runs"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        kernel = _this_interpreters_kernel(folder / "kernels")
        NotebookClient(notebook, km=kernel, timeout=600, resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        mp.undo()
    return notebook, folder / "runs"


@pytest.mark.slow
def test_quickstart_runs_without_errors_and_draws_its_figures(executed):
    notebook, _ = executed
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors  # nbclient raises on the first one; this guards allow_errors changes
    # learning curve, risk-coverage, heatmap grid
    assert len(_outputs(notebook, "image/png")) >= 3
    printed = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "are referred" in printed and "same decisions as the checkpoint: True" in printed


@pytest.mark.slow
def test_quickstart_leaves_one_finished_tracked_run_with_test_metrics(executed):
    _, workdir = executed
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")  # undone after the test (conftest)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert 0.0 <= run["metrics.test/auroc"] <= 1.0
    assert run["params.model.backbone"] == "tf_efficientnet_lite0"
    assert run["tags.model_uri"] == f"runs:/{run.run_id}/model"


@pytest.mark.slow
def test_quickstart_writes_predictions_and_heatmaps(executed):
    _, workdir = executed
    checkpoint = pd.read_csv(workdir / "predictions.csv")
    from_mlflow = pd.read_csv(workdir / "predictions_mlflow.csv")
    assert len(checkpoint) == len(from_mlflow) == 8
    assert set(checkpoint["decision"]) <= {"positive", "negative", "abstain"}
    assert list(checkpoint["decision"]) == list(from_mlflow["decision"])
    assert from_mlflow["model"].str.startswith("runs:/").all()
    heatmaps = sorted((workdir / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 8
    assert {Path(p) for p in checkpoint["heatmap"]} == set(heatmaps)
