"""A remote MLflow tracking server: a fit logs everything to it (and so to its PostgreSQL database), and an
unreachable server stops the CLI before training with one line."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import CONSOLE_SCRIPT
from mlflow import MlflowClient
from servers import free_port

from medtransfer.tracking.mlflow import MLflowLogger

pytestmark = pytest.mark.slow  # a real fit against a server that takes ~20 s to start


@dataclass(frozen=True)
class RemoteRun:
    run_id: str
    experiment_id: str
    workdir: Path
    output: str


#: The password in the server URI (percent-encoded there: ``/``, ``#`` and ``?`` would end the URI's userinfo);
#: the server does not check it, but ``requests`` sends it as basic auth, as it would to a real proxy.
PASSWORD = "pa/ss#w0rd?Q"


@pytest.fixture(scope="module")
def remote_run(tracking_server, tiny_fit_args: list[str], tmp_path_factory) -> RemoteRun:
    """One tiny fit (+ test of its best checkpoint) through the console script, as a user runs it, tracked on the
    server through a URI that holds a user and password; its output is kept to grep for the password."""
    workdir = tmp_path_factory.mktemp("remote-fit")
    host = tracking_server.url.removeprefix("http://")
    uri = f"http://carol:{quote(PASSWORD, safe='')}@{host}"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), *tiny_fit_args,
         f"--trainer.logger.init_args.tracking_uri={uri}", "--trainer.logger.init_args.run_name=remote-tiny"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_server.url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, filter_string="attributes.run_name = 'remote-tiny'")
    return RemoteRun(run.info.run_id, run.info.experiment_id, workdir, done.stdout + done.stderr)


def test_a_fit_logs_params_metrics_and_artifacts_to_the_server(tracking_server, remote_run):
    client = MlflowClient(tracking_server.url)
    run = client.get_run(remote_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "remote-tiny"
    assert run.data.params["model.backbone"] == "tf_efficientnet_lite0"
    assert run.data.params["data.image_size"] == "32"
    assert {"train/loss", "val/auroc", "val/threshold", "test/auroc", "test/ece"} <= run.data.metrics.keys()
    assert len(client.get_metric_history(remote_run.run_id, "val/auroc")) == 2  # one per epoch
    assert {"checkpoints", "config", "plots"} <= {a.path for a in client.list_artifacts(remote_run.run_id)}
    assert {a.path for a in client.list_artifacts(remote_run.run_id, "config")} >= {"config/fit.yaml"}
    figures = {Path(a.path).name for a in client.list_artifacts(remote_run.run_id, "plots")}
    assert figures == {"roc.png", "risk_coverage.png", "reliability.png", "confusion.png", "evaluation.csv"}
    [checkpoint] = client.list_artifacts(remote_run.run_id, "checkpoints")
    assert checkpoint.path.endswith(".ckpt") and checkpoint.file_size > 0


def test_the_server_keeps_the_artifacts_and_no_embedded_store_is_created(tracking_server, remote_run):
    stored = tracking_server.artifacts / remote_run.experiment_id / remote_run.run_id / "artifacts"
    assert len(list((stored / "checkpoints").glob("*.ckpt"))) == 1
    assert (stored / "plots" / "roc.png").is_file()
    assert not (remote_run.workdir / "mlruns" / "mlflow.db").exists()


def test_the_run_is_in_the_servers_postgresql_database(tracking_server, remote_run):
    connection = tracking_server.postgres.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT name, status, experiment_id FROM runs WHERE run_uuid = %s", (remote_run.run_id,))
        assert cursor.fetchall() == [("remote-tiny", "FINISHED", int(remote_run.experiment_id))]
        cursor.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'model.backbone'", (remote_run.run_id,))
        assert cursor.fetchall() == [("tf_efficientnet_lite0",)]
        cursor.execute(
            "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'val/auroc' ORDER BY step",
            (remote_run.run_id,),
        )
        rows = cursor.fetchall()
        assert len(rows) == 2 and all(0.0 <= value <= 1.0 for _, value in rows)
    finally:
        connection.close()


def test_the_uris_password_is_nowhere_in_the_run_its_files_the_database_or_the_output(tracking_server, remote_run):
    """A password in the tracking URI reaches neither params, tags, config artifact, checkpoint, the
    server's database and artifact store, the working folder, nor anything printed."""
    encoded = quote(PASSWORD, safe="")
    files = [p for root in (remote_run.workdir, tracking_server.artifacts) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "fit.yaml" for p in files)
    logged = MlflowClient(tracking_server.url).get_run(remote_run.run_id).data
    [config] = [p for p in files if p.name == "fit.yaml"]
    host = tracking_server.url.removeprefix("http://")
    assert f"tracking_uri: http://***@{host}" in config.read_text()  # recorded, without the credentials
    assert f"at: {tracking_server.url}/#/experiments/{remote_run.experiment_id}/runs/" in remote_run.output
    connection = tracking_server.postgres.connect()
    try:
        cursor = connection.cursor()
        for table in ("params", "tags", "experiment_tags"):
            cursor.execute(f"SELECT key, value FROM {table} WHERE value LIKE %s", ("%w0rd%",))
            assert cursor.fetchall() == [], table
    finally:
        connection.close()
    for secret in (PASSWORD, encoded, "w0rd"):
        assert secret not in remote_run.output
        assert all(secret not in value for value in [*logged.params.values(), *logged.tags.values()])
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)


def test_mlflow_tracking_uri_points_the_logger_at_the_server(tracking_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    logger = MLflowLogger(experiment_name="from-environment", run_name="env")
    logger.log_metrics({"val/auroc": 0.75}, step=0)
    logger.finalize("success")
    assert logger.tracking_uri == tracking_server.url
    run = MlflowClient(tracking_server.url).get_run(logger.run_id)
    assert run.data.metrics == {"val/auroc": 0.75}
    assert not (tmp_path / "mlruns").exists()


def test_an_unreachable_server_stops_the_cli_before_training(workdir, tiny_fit_args):
    closed = f"http://127.0.0.1:{free_port()}"
    command = [str(CONSOLE_SCRIPT), *tiny_fit_args]
    # MLflow's own client would retry for minutes; the timeout only keeps a regression from hanging the suite.
    done = subprocess.run(
        [*command, f"--trainer.logger.init_args.tracking_uri={closed}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medtransfer: error: MLflow tracking server {closed} is unreachable: ")
    assert "Connection refused" in last and "to use the embedded store mlruns/" in last
    assert not list(workdir.rglob("*.ckpt"))
    assert not (workdir / "mlruns" / "mlflow.db").exists()
