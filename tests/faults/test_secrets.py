"""Secrets stay out of everything medtransfer records or prints: one redaction
(``tracking.redaction.redact``) for URIs and mappings, every character class a password may hold, applied to
params, tags, the config artifact, checkpoints, console lines and the arguments ``search``/``learning-curve`` log.
"""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from medtransfer.tracking.callbacks import flatten_config
from medtransfer.tracking.mlflow import MLflowLogger
from medtransfer.tracking.redaction import redact

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
#: Every printable ASCII punctuation character, a space and a non-ASCII letter: what a password may hold.
CHARACTERS = [*string.punctuation, " ", "é"]


def _password(c: str) -> str:
    return f"S3cr{c}etPw{c}"


@pytest.mark.parametrize("c", CHARACTERS, ids=[f"{ord(c):02x}" for c in CHARACTERS])
def test_a_uri_password_of_any_character_is_redacted_and_the_host_kept(c):
    for scheme in ("postgresql", "mysql+pymysql", "http", "https", "mssql+pyodbc"):
        uri = f"{scheme}://alice:{_password(c)}@db.example.org:5432/mlflow"
        assert redact(uri) == f"{scheme}://***@db.example.org:5432/mlflow", uri
        assert redact({"storage": uri})["storage"] == f"{scheme}://***@db.example.org:5432/mlflow"
        if not c.isspace():  # inside a console line a URI ends at whitespace
            line = f"MLflow run 1 in {uri} (experiment 3)"
            assert "S3cr" not in redact(line) and "db.example.org:5432/mlflow (experiment 3)" in redact(line)


def test_secret_named_keys_are_redacted_at_any_depth_and_other_values_kept():
    config = {"trainer": {"logger": {"init_args": {"tags": {"db_password": "p", "api_token": "t", "team": "r"}}}},
              "fit_args": ["--x=1", "--storage=postgresql://u:pa/ss@h/db"], "AWS_SECRET_ACCESS_KEY": "k"}  # fmt: skip
    assert redact(config) == {
        "trainer": {"logger": {"init_args": {"tags": {"db_password": "***", "api_token": "***", "team": "r"}}}},
        "fit_args": ["--x=1", "--storage=postgresql://***@h/db"],
        "AWS_SECRET_ACCESS_KEY": "***",
    }
    assert redact("sqlite:////abs/mlruns/mlflow.db") == "sqlite:////abs/mlruns/mlflow.db"  # no credentials


def test_params_of_a_uri_whose_password_holds_slash_hash_and_question_mark_are_redacted():
    uri = "postgresql://alice:pa/ss#wo?rd@db.example.org/mlflow"
    params = flatten_config(yaml.safe_load(f"trainer:\n  logger:\n    init_args:\n      tracking_uri: '{uri}'\n"))
    assert params["trainer.logger.tracking_uri"] == "postgresql://***@db.example.org/mlflow"


def test_secret_named_run_tags_never_reach_the_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tags = {"db_password": "hunter2hunter", "api_token": "xyzTOKENxyz", "team": "radiology",
            "source": "postgresql://bob:pa/ss#?w0rd@db/x"}  # fmt: skip
    logger = MLflowLogger(tracking_uri=uri, tags=tags)
    logger.log_metrics({"m": 1.0}, step=0)
    recorded = logger.experiment.get_run(logger.run_id).data.tags
    assert recorded["db_password"] == recorded["api_token"] == "***" and recorded["team"] == "radiology"
    assert recorded["source"] == "postgresql://***@db/x"
    everything = b"".join(p.read_bytes() for p in (tmp_path / "mlruns").rglob("*") if p.is_file())
    for secret in (b"hunter2hunter", b"xyzTOKENxyz", b"w0rd"):
        assert secret not in everything


SECRETS = {"DB_PASSWORD": "hunter2hunter", "MY_API_TOKEN": "xyzTOKENxyz"}
URI_SECRET = "pa/ss#w0rd?Q"


@pytest.mark.slow
def test_a_secret_planted_through_every_fit_entry_point_is_nowhere_on_disk_or_console(
    pneumonia_npz, workdir, monkeypatch, capfd
):
    """Environment, secret-named tags and a URI with a password in a tag value, through a real fit: grep the
    whole ``mlruns/`` (database, artifacts, config, both checkpoints) and everything printed."""
    from medtransfer.entry import main

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    tags = f'{{db_password: {SECRETS["DB_PASSWORD"]}, api_token: {SECRETS["MY_API_TOKEN"]}, ' \
           f'"warehouse": "postgresql://carol:{URI_SECRET}@db.example.org/pacs"}}'  # fmt: skip
    small = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
             "--trainer.enable_progress_bar=false", "--data.image_size=32", "--mlflow_model.enabled=false"]  # fmt: skip
    main(
        ["fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", *small, f"--trainer.logger.init_args.tags={tags}"]
    )
    printed = capfd.readouterr()
    files = [p for p in (workdir / "mlruns").rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "fit.yaml" for p in files)
    for secret in [*SECRETS.values(), URI_SECRET, "w0rd"]:
        assert secret not in printed.out + printed.err, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)


@pytest.mark.slow
def test_a_secret_planted_through_search_and_learning_curve_is_nowhere_on_disk_in_storage_or_console(
    pneumonia_npz, workdir, monkeypatch, capfd
):
    """``search`` with a password in its Optuna storage URI (a real PostgreSQL) and a secret tag in its fit
    arguments, and ``learning-curve`` with a URI holding a password in its fit arguments' tags: grep ``mlruns/``,
    the outputs, the study's database and everything printed."""
    from servers import postgres_server

    from medtransfer.commands.learning_curve import run_learning_curve
    from medtransfer.commands.search import run_search

    monkeypatch.setenv("DB_PASSWORD", SECRETS["DB_PASSWORD"])
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--data.init_args.image_size=32",
            f"--data.init_args.path={pneumonia_npz}", "--mlflow_model.enabled=false"]  # fmt: skip
    space = workdir / "space.yaml"
    space.write_text("model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    tag = f"--trainer.logger.init_args.tags={{api_token: {SECRETS['MY_API_TOKEN']}}}"
    with postgres_server() as postgres:
        storage = f"postgresql+psycopg2://postgres:{quote(URI_SECRET, safe='')}@127.0.0.1:{postgres.port}/mlflow"
        run_search(
            CONFIG, space, sampler="random", n_trials=1, study_name="secret", pruning=False, storage=storage,
            fit_args=[*tiny, tag], output=workdir / "best.yaml",
        )  # fmt: skip
        connection = postgres.connect()
        try:
            cursor = connection.cursor()
            tables = ("study_user_attributes", "trial_user_attributes", "study_system_attributes")
            cursor.execute(" UNION ALL ".join(f"SELECT value_json FROM {table}" for table in tables))
            stored = " ".join(value for (value,) in cursor.fetchall())
        finally:
            connection.close()
    warehouse = f'--trainer.logger.init_args.tags={{"warehouse": "postgresql://carol:{URI_SECRET}@db.example.org/x"}}'
    run_learning_curve(
        configs=[str(REPO / "configs" / "learning_curve" / "lite0_pretrained.yaml")], base_config=str(CONFIG),
        fractions=[0.02], seeds=[0], output_dir="curve", fit_args=[*tiny, warehouse],
    )  # fmt: skip
    printed = capfd.readouterr()
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert (workdir / "best.yaml").is_file() and (workdir / "curve" / "learning_curve.csv").is_file()
    assert "lr" in stored  # the study's attributes were read
    for secret in [*SECRETS.values(), URI_SECRET, quote(URI_SECRET, safe=""), "w0rd"]:
        assert secret not in printed.out + printed.err, secret
        assert secret not in stored, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)
