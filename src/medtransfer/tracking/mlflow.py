"""Lightning's ``MLFlowLogger`` with medtransfer's defaults: an embedded store under ``mlruns/``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import MLFlowLogger

__all__ = ["DEFAULT_TRACKING_URI", "MLflowLogger", "local_sqlite_path"]

_logger = logging.getLogger(__name__)

#: The embedded store: a SQLite database in ``mlruns/`` (artifacts go to ``mlruns/artifacts``).
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def local_sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or ``None`` for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` that defaults to the embedded store and can continue an existing run.

    The tracking URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``
    (relative to the working directory, as ``make ui`` expects, and made absolute here). For a local SQLite
    store the folder is created and new experiments keep their artifacts in ``<folder>/artifacts``.

    Args:
        experiment_name: MLflow experiment that runs are grouped under.
        run_name: shown in the MLflow UI; ``None`` lets the CLI name it ``<backbone>-<dataset>-<time>``.
        tracking_uri: MLflow store or server URI.
        tags: extra run tags.
        log_model: as in ``MLFlowLogger``; medtransfer logs the best checkpoint itself, so the default is off.
        artifact_location: artifact root for a newly created experiment.
        run_id: continue this run instead of creating one (set automatically from a checkpoint).
    """

    def __init__(
        self,
        experiment_name: str = "medtransfer",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        database = local_sqlite_path(tracking_uri)
        if database is not None:  # absolute, so the store does not depend on later changes of directory
            database = database.resolve()
            database.parent.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{database}"
            if artifact_location is None:
                artifact_location = (database.parent / "artifacts").resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            log_model=log_model,
            artifact_location=artifact_location,
            run_id=run_id,
        )

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def started(self) -> bool:
        """Whether the MLflow run exists yet (runs are created lazily, on first use)."""
        return self._initialized

    def continue_run(self, run_id: str) -> None:
        """Log into ``run_id`` instead of a new run; only possible before the run is first used."""
        if self._initialized and self._run_id != run_id:
            raise RuntimeError(f"The logger already writes to run {self._run_id}; cannot switch to {run_id}.")
        self._run_id = run_id

    def name_run(self, run_name: str) -> None:
        """Name the run to be created, unless the user named it."""
        if self._run_name is None and not self._initialized:
            self._run_name = run_name
