"""Links into the MLflow UI open its model-training view (``workflowType=machine_learning``), on ``make ui``'s
address for a local store and on the tracking server itself, without credentials, for a remote one."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from medtransfer.tracking.ui import (
    HEADLINE_METRICS,
    LOCAL_UI_URL,
    experiment_link,
    share_headline_view,
    ui_hint,
    ui_link,
)

VIEW = "?workflowType=machine_learning"


@pytest.mark.parametrize("store", ["sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns",
                                   "postgresql://bob:pw@db/mlflow"])  # fmt: skip
def test_a_local_store_links_to_the_local_ui(store):
    assert ui_link(store, "3", "abc") == f"{LOCAL_UI_URL}/#/experiments/3/runs/abc{VIEW}"
    assert ui_link(store, "3") == f"{LOCAL_UI_URL}/#/experiments/3/runs{VIEW}"


@pytest.mark.parametrize(
    ("server", "shown"),
    [
        ("http://mlflow.example:5000", "http://mlflow.example:5000"),
        ("https://alice:s3cret@mlflow.example/", "https://mlflow.example"),
        ("https://alice:p@ss/w#rd@mlflow.example/base/", "https://mlflow.example/base"),
    ],
)
def test_a_tracking_server_links_to_itself_without_credentials(server, shown):
    link = ui_link(server, "7", "abc")
    assert link == f"{shown}/#/experiments/7/runs/abc{VIEW}"
    assert "s3cret" not in link and "alice" not in link
    assert ui_hint(server, "7", "abc") == f"See it in the MLflow UI: {link}"


def test_databricks_has_no_local_link():
    assert ui_link("databricks", "1", "abc") is None and ui_hint("databricks", "1", "abc") is None


def test_the_hint_names_what_serves_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    link = f"{LOCAL_UI_URL}/#/experiments/1/runs/r{VIEW}"
    assert ui_hint(default, "1", "r") == f"See it in the MLflow UI (make ui): {link}"
    other = "postgresql://bob:pw@db/mlflow"
    hint = ui_hint(other, "1", "r")
    assert hint.startswith("See it in the MLflow UI (mlflow ui --backend-store-uri postgresql://***@db/mlflow): ")


def _store_with(tmp_path: Path, experiments: dict[str, int]) -> str:
    database = tmp_path / "mlflow.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT)")
        connection.executemany("INSERT INTO experiments VALUES (?, ?)", [(i, n) for n, i in experiments.items()])
    connection.close()
    return f"sqlite:///{database}"


def test_make_ui_links_to_the_experiment_runs_table(tmp_path):
    store = _store_with(tmp_path, {"Default": 0, "medtransfer": 4})
    assert experiment_link(store, "medtransfer", "http://0.0.0.0:5001") == (
        f"http://0.0.0.0:5001/#/experiments/4/runs{VIEW}"
    )
    # no such experiment, or no store yet (and none is created): the experiment list, in the same view
    assert experiment_link(store, "other") == f"{LOCAL_UI_URL}/#/experiments{VIEW}"
    missing = tmp_path / "none" / "mlflow.db"
    assert experiment_link(f"sqlite:///{missing}", "medtransfer") == f"{LOCAL_UI_URL}/#/experiments{VIEW}"
    assert not missing.parent.exists()


def test_the_module_prints_the_link_make_ui_shows_with_the_headline_columns(tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = MlflowClient(store).create_experiment("medtransfer")
    out = subprocess.run([sys.executable, "-m", "medtransfer.tracking.ui", LOCAL_UI_URL, store, "medtransfer"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    key = "medtransfer-headline"
    assert out.strip().endswith(f"{LOCAL_UI_URL}/#/experiments/{experiment_id}/runs{VIEW}&viewStateShareKey={key}")
    view = json.loads(MlflowClient(store).get_experiment(experiment_id).tags[f"mlflow.sharedViewState.{key}"])
    assert view == {"selectedColumns": [f"metrics.`{name}`" for name in HEADLINE_METRICS]}
    # no store: no view to share, and none is created
    missing = tmp_path / "none" / "mlflow.db"
    assert share_headline_view(f"sqlite:///{missing}", "medtransfer") is None and not missing.parent.exists()


def test_make_ui_asks_this_module_for_its_link():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = makefile.split("\nui:", 1)[1].split("\n\n", 1)[0]
    assert "-m medtransfer.tracking.ui http://$(HOST):$(PORT) sqlite:///mlruns/mlflow.db medtransfer" in recipe
