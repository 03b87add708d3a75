"""Fixtures for tracking tests: a tiny CLI fit, and a real MLflow tracking server on PostgreSQL.

PostgreSQL and the server start once per session (the server alone takes ~20 s to import and migrate its
schema) and are stopped, with every process they spawned, when the session ends.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import DEFAULT_CONFIG, tiny_fit_args
from servers import PostgresServer, mlflow_process, postgres_server

from medtransfer.commands.fit import MedTransferCLI, build_cli

TINY = tuple(tiny_fit_args(train_batches=2, val_batches=2, test_batches=2))


@dataclass(frozen=True)
class TrackingServer:
    """A running ``mlflow server``: its URL, its PostgreSQL backend and the folder it stores artifacts in."""

    url: str
    postgres: PostgresServer
    artifacts: Path


@pytest.fixture(scope="session")
def tiny_fit_args(pneumonia_npz: Path) -> list[str]:
    """``medtransfer`` arguments for a tiny fit of the default config on the real PneumoniaMNIST file."""
    return ["fit", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY]


@pytest.fixture
def tiny_fit(workdir: Path, tiny_fit_args: list[str]) -> Callable[..., MedTransferCLI]:
    """``tiny_fit(*overrides)`` runs a tiny fit in ``workdir`` and returns the LightningCLI."""
    return lambda *overrides: build_cli([*tiny_fit_args, *overrides])


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def tracking_server(postgres: PostgresServer) -> Iterator[TrackingServer]:
    """``mlflow server`` on 127.0.0.1 with PostgreSQL as its backend store, serving artifacts from a folder."""
    with tempfile.TemporaryDirectory(prefix="medtransfer-mlflow-server-") as folder:
        artifacts = Path(folder) / "artifacts"
        args = ("--backend-store-uri", postgres.uri, "--artifacts-destination", str(artifacts), "--workers", "1")
        with mlflow_process("server", *args, cwd=Path(folder)) as url:
            yield TrackingServer(url=url, postgres=postgres, artifacts=artifacts)
