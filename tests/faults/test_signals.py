"""SIGTERM (a scheduler's stop, ``kill``, ``docker stop``) during a fit, its test-after-fit or a standalone
``validate`` or ``test``: the process exits 143, the MLflow run is marked ``KILLED``, the last finished epoch's
``last.ckpt`` is kept, and the documented resume completes the run as after SIGINT or SIGKILL. It used to exit 0.
SIGINT during a fit ends the run ``KILLED`` too.
"""

from __future__ import annotations

import signal

import harness
import pytest
import torch
from harness import Fit

from medtransfer.commands.fit import SIGTERM_EXIT_STATUS
from medtransfer.tracking.mlflow import MLflowLogger


def test_a_run_stopped_by_a_signal_ends_killed_not_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    stopped, failed = MLflowLogger(tracking_uri=uri), MLflowLogger(tracking_uri=uri)
    stopped.log_metrics({"train/loss": 1.0}, step=0)
    failed.log_metrics({"train/loss": 1.0}, step=0)
    stopped.mark_killed()
    stopped.finalize("failed")  # what Lightning calls after any exception, a signal's included
    failed.finalize("failed")
    client = harness.client(tmp_path)
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert client.get_run(failed.run_id).info.status == "FAILED"


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "test_after_fit"])
def test_sigterm_exits_143_marks_the_run_killed_and_resumes(tmp_path, pneumonia_npz, when):
    extra = (
        ["--test_after_fit=true", "--trainer.limit_test_batches=200", "--data.batch_size=4"]
        if when != "training"
        else []
    )
    fit = Fit(tmp_path, pneumonia_npz, *extra)
    if when == "training":
        fit.wait_for_epoch(1)
        stamp = harness.checkpoint_stamp(tmp_path)
        fit.wait_until(lambda: harness.checkpoint_stamp(tmp_path) != stamp, what="epoch 1's save")
        fit.wait_until(lambda: not harness.partial_checkpoints(tmp_path), what="the save to end")
    else:
        fit.wait_until(lambda: "Testing the best checkpoint" in fit.output, what="test after fit to start")
    status = fit.terminate()
    assert status == SIGTERM_EXIT_STATUS, fit.output
    assert "stopped by SIGTERM" in fit.output and "--ckpt_path last" in fit.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "KILLED"
    checkpoint = harness.last_checkpoint(tmp_path)
    kept = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert kept["mlflow"]["run_id"] == run.info.run_id
    resumed = Fit(tmp_path, pneumonia_npz, *extra, "--ckpt_path=last")
    assert resumed.wait() == 0, resumed.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "FINISHED"
    steps = harness.metric_steps(tmp_path, run.info.run_id)
    assert harness.duplicated_steps(steps) == {}
    assert len(steps["val/auroc"]) == 4
    if when == "test_after_fit":
        assert "test/auroc" in harness.final_values(tmp_path, run.info.run_id)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize(("command", "stage"), [("validate", "val"), ("test", "test")])
def test_sigterm_during_a_standalone_evaluation_exits_143_and_marks_the_run_killed(
    tmp_path, pneumonia_npz, command, stage
):
    """``medtransfer validate`` and ``test`` log into the checkpoint's run: stopped mid-evaluation they exit 143,
    leave the run ``KILLED`` with no new value of the stage's metric, and the same command run again completes
    it, one step after the metric's last."""
    fit = Fit(tmp_path, pneumonia_npz)
    assert fit.wait() == 0, fit.output
    checkpoint = harness.last_checkpoint(tmp_path)
    (run,) = harness.runs(tmp_path)
    before = harness.metric_steps(tmp_path, run.info.run_id).get(f"{stage}/auroc", [])
    limit = f"--trainer.limit_{stage}_batches"
    stopped = Fit(tmp_path, pneumonia_npz, f"--ckpt_path={checkpoint}", f"{limit}=200", "--data.batch_size=4",
                  command=command)  # fmt: skip
    stopped.wait_until(lambda: "Loaded model weights from the checkpoint" in stopped.output, what=f"{command} to start")
    status = stopped.terminate()
    assert status == SIGTERM_EXIT_STATUS, stopped.output
    assert "stopped by SIGTERM" in stopped.output and f"{command.capitalize()} metric" not in stopped.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "KILLED"
    assert harness.metric_steps(tmp_path, run.info.run_id).get(f"{stage}/auroc", []) == before  # stopped mid-way
    again = Fit(tmp_path, pneumonia_npz, f"--ckpt_path={checkpoint}", f"{limit}=3", command=command)
    assert again.wait() == 0, again.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "FINISHED"
    steps = harness.metric_steps(tmp_path, run.info.run_id)[f"{stage}/auroc"]
    assert steps[:-1] == before and steps[-1] > max(before, default=-1)


@pytest.mark.faults
@pytest.mark.slow
def test_sigint_during_a_fit_marks_the_run_killed_and_resumes(tmp_path, pneumonia_npz):
    """Ctrl-C: Lightning shuts down (exit status 1), the run ends ``KILLED``, not ``FAILED``, the last finished
    epoch's ``last.ckpt`` is kept and ``--ckpt_path last`` completes the run."""
    fit = Fit(tmp_path, pneumonia_npz)
    fit.wait_for_epoch(1)
    stamp = harness.checkpoint_stamp(tmp_path)
    fit.wait_until(lambda: harness.checkpoint_stamp(tmp_path) != stamp, what="epoch 1's save")
    fit.wait_until(lambda: not harness.partial_checkpoints(tmp_path), what="the save to end")
    fit.process.send_signal(signal.SIGINT)
    assert fit.wait() == 1, fit.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "KILLED"
    kept = torch.load(harness.last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert kept["mlflow"]["run_id"] == run.info.run_id and kept["epoch"] < 4
    resumed = Fit(tmp_path, pneumonia_npz, "--ckpt_path=last")
    assert resumed.wait() == 0, resumed.output
    (run,) = harness.runs(tmp_path)
    assert run.info.status == "FINISHED"
    steps = harness.metric_steps(tmp_path, run.info.run_id)
    assert harness.duplicated_steps(steps) == {} and len(steps["val/auroc"]) == 4
