"""Links into the MLflow UI in its model-training view (``workflowType=machine_learning``; without it MLflow 3
opens its GenAI view). Imports nothing heavy, so ``make ui`` asks it for a link (``python -m medtransfer.tracking.ui``).
"""

from __future__ import annotations

import json
import sys
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

from medtransfer.tracking.redaction import redact

__all__ = ["HEADLINE_METRICS", "LOCAL_UI_URL", "experiment_link", "share_headline_view", "ui_hint", "ui_link",
           "ui_server"]  # fmt: skip

#: Where ``make ui`` (and ``mlflow ui``'s defaults) serve a local store.
LOCAL_UI_URL = "http://127.0.0.1:5000"

_VIEW = "workflowType=machine_learning"

#: The runs table's columns in the view ``make ui`` opens: what a user compares runs by.
HEADLINE_METRICS = ("val/auroc", "test/auroc", "test/acc", "test/coverage")
_HEADLINE_VIEW = "medtransfer-headline"


def ui_server(tracking_uri: str) -> str | None:
    """The UI address for ``tracking_uri``: a server's own (without ``user:password@``), :data:`LOCAL_UI_URL` for a
    local store, ``None`` for Databricks."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        # the userinfo runs to the last "@" (a password may hold "/", "#" or "@"), as in redaction.redact
        address = tracking_uri.split("://", 1)[1].rpartition("@")[2]
        return f"{parts.scheme}://{address.split('?')[0].split('#')[0].rstrip('/')}"
    if tracking_uri.startswith("databricks"):
        return None
    return LOCAL_UI_URL


def ui_link(
    tracking_uri: str, experiment_id: str, run_id: str | None = None, *, server: str | None = None
) -> str | None:
    """The MLflow UI link to run ``run_id`` (else to the experiment's runs table) in the model-training view, on
    ``server`` (default :func:`ui_server` of ``tracking_uri``); ``None`` when there is no UI to link to.

    >>> ui_link("sqlite:///mlruns/mlflow.db", "1", "abc")
    'http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning'
    >>> ui_link("https://alice:pw@mlflow.example/", "2")
    'https://mlflow.example/#/experiments/2/runs?workflowType=machine_learning'
    """
    server = server or ui_server(tracking_uri)
    if server is None:
        return None
    page = f"/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}{page}?{_VIEW}"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The line a command prints after a run: how to open it in the MLflow UI, with its link (or ``None``)."""
    link = ui_link(tracking_uri, experiment_id, run_id)
    if link is None:
        return None
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return f"See it in the MLflow UI: {link}"
    served_by = (
        "make ui" if tracking_uri == _default_store() else f"mlflow ui --backend-store-uri {redact(tracking_uri)}"
    )
    return f"See it in the MLflow UI ({served_by}): {link}"


def _default_store() -> str:
    """The store ``make ui`` serves, as :func:`~medtransfer.tracking.mlflow.resolve_tracking_uri` spells it."""
    return f"sqlite:///{(Path('mlruns') / 'mlflow.db').resolve()}"


def experiment_link(store: str, experiment_name: str, server: str = LOCAL_UI_URL, view: str | None = None) -> str:
    """The link to ``experiment_name``'s runs in the SQLite ``store`` (in the shared ``view``, when given), else to
    the experiment list (read-only)."""
    database = Path(store.removeprefix("sqlite:///"))
    if store.startswith("sqlite:///") and database.is_file():
        import sqlite3

        with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            query = "SELECT experiment_id FROM experiments WHERE name = ?"
            row = connection.execute(query, (experiment_name,)).fetchone()
        if row is not None:
            return f"{ui_link(store, str(row[0]), server=server)}" + (f"&viewStateShareKey={view}" if view else "")
    return f"{server.rstrip('/')}/#/experiments?{_VIEW}"


def share_headline_view(store: str, experiment_name: str) -> str | None:
    """Store in the experiment a runs-table view with the :data:`HEADLINE_METRICS` columns, as the UI's own "Share"
    button does, and return its key for :func:`experiment_link` (``None`` without such an experiment; no store is
    created). The format (an experiment tag ``mlflow.sharedViewState.<key>`` holding the view's JSON) is the UI's,
    not a public API: tests/tracking/test_mlflow_ui.py fails when it changes."""
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        return None
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    columns = [f"metrics.`{name}`" for name in HEADLINE_METRICS]
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{_HEADLINE_VIEW}",
                              json.dumps({"selectedColumns": columns}))  # fmt: skip
    return _HEADLINE_VIEW


if __name__ == "__main__":  # make ui: python -m medtransfer.tracking.ui SERVER STORE EXPERIMENT
    server, store, experiment = sys.argv[1:4]
    link = experiment_link(store, experiment, server, share_headline_view(store, experiment))
    print(f"MLflow UI, {experiment} runs in the model-training view: {link}")
