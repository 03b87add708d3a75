"""``MLflowLogger``: which store it writes to, and the reachability check that refuses a dead server up front."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient
from servers import free_port

from medtransfer.errors import MedtransferError
from medtransfer.tracking.mlflow import MLflowLogger, check_reachable


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def not_found_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that is not MLflow: it answers every request with 404."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_default_store_is_sqlite_in_mlruns_of_the_working_directory(clean_env):
    logger = MLflowLogger()
    assert logger.tracking_uri == f"sqlite:///{clean_env}/mlruns/mlflow.db"
    logger.log_metrics({"val/auroc": 0.5}, step=0)
    logger.finalize("success")
    run = MlflowClient(logger.tracking_uri).get_run(logger.run_id)
    assert run.data.metrics == {"val/auroc": 0.5}
    assert run.info.artifact_uri.startswith((clean_env / "mlruns" / "artifacts").as_uri())


def test_an_explicit_tracking_uri_wins_over_mlflow_tracking_uri(clean_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{clean_env}/from-env/mlflow.db")
    explicit = MLflowLogger(tracking_uri="sqlite:///explicit/mlflow.db")
    assert explicit.tracking_uri == f"sqlite:///{clean_env}/explicit/mlflow.db"  # made absolute
    assert not (clean_env / "from-env").exists()


def test_an_unreachable_server_is_refused_when_the_logger_is_made(clean_env):
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MedtransferError, match=rf"MLflow tracking server {closed} is unreachable: .*refused") as err:
        MLflowLogger(tracking_uri=closed)
    assert str(err.value).endswith("(start it, or remove the logger's tracking_uri to use the embedded store mlruns/)")
    assert not (clean_env / "mlruns").exists()


def test_the_message_names_the_environment_variable_when_the_uri_came_from_it(clean_env, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    with pytest.raises(MedtransferError, match=r"unset MLFLOW_TRACKING_URI to use the embedded store mlruns/"):
        MLflowLogger()


def test_a_server_that_accepts_but_never_answers_is_unreachable():
    with socket.socket() as silent:  # the kernel completes the connection; nobody ever reads or replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(MedtransferError, match=rf"{url} is unreachable: .*timed out"):
            check_reachable(url, timeout=0.5)


def test_any_http_answer_counts_as_reachable(not_found_server):
    check_reachable(not_found_server)  # a proxy or an auth wall may answer /health with an error status
    check_reachable(not_found_server + "/")


@pytest.mark.parametrize("uri", ["sqlite:///no/such/folder/mlflow.db", "file:///no/such/folder", "databricks"])
def test_stores_that_are_not_http_are_not_probed(uri):
    check_reachable(uri)
