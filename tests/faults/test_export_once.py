"""Resume is idempotent for the model export: a run exports and registers its model once per
best checkpoint, however often the fit is resumed, and an export killed half way (a ``PENDING`` logged model) is
deleted and redone. Every resume used to export and register again (versions 1, 2, 3; one stuck ``PENDING``).
"""

from __future__ import annotations

import harness
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from medtransfer.tracking.model_logging import LogModelToMLflow


def _plant_pending_export(client: MlflowClient, experiment_id: str, run_id: str) -> str:
    """What a SIGKILL during ``mlflow.pytorch.log_model`` leaves: a logged model created, never finalized."""
    return client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id


def test_an_unfinished_export_of_the_run_is_deleted_and_others_are_kept(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("medtransfer", artifact_location=(tmp_path / "artifacts").as_uri())
    run, other = client.create_run(experiment).info.run_id, client.create_run(experiment).info.run_id
    killed = _plant_pending_export(client, experiment, run)
    finished = client.create_logged_model(experiment, name="model", source_run_id=run).model_id
    client.finalize_logged_model(finished, LoggedModelStatus.READY)
    elsewhere = _plant_pending_export(client, experiment, other)  # another run's export may still be under way
    assert LogModelToMLflow._remove_unfinished_exports(client, experiment, run) == [killed]
    left = {m.model_id for m in client.search_logged_models([experiment])}
    assert left == {finished, elsewhere}


@pytest.mark.faults
@pytest.mark.slow
def test_resuming_a_finished_fit_twice_exports_and_registers_once(tmp_path, pneumonia_npz):
    fit = harness.Fit(tmp_path, pneumonia_npz)
    assert fit.wait() == 0, fit.output
    (run,) = harness.runs(tmp_path)
    client = harness.client(tmp_path)
    experiment = run.info.experiment_id
    pending = _plant_pending_export(client, experiment, run.info.run_id)
    for _ in range(2):  # `--ckpt_path last` after the end: nothing to train, the fit end runs again
        again = harness.Fit(tmp_path, pneumonia_npz, f"--ckpt_path={harness.last_checkpoint(tmp_path)}")
        assert again.wait() == 0, again.output
    models = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run.info.run_id]
    assert [m.status for m in models] == [LoggedModelStatus.READY]
    assert pending not in {m.model_id for m in models}
    (registered,) = client.search_registered_models()
    assert [int(v.version) for v in client.search_model_versions(f"name = '{registered.name}'")] == [1]
