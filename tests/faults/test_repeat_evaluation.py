"""``test`` or ``validate`` run again into a run: each evaluation at its own step after the run's last one for that
metric, never a duplicate. Used to give ``test/auroc`` at steps 0, 0 and 48, and put
``validate``'s value at step 0 of the validation curve.
"""

from __future__ import annotations

import harness
import pytest

from medtransfer.tracking.mlflow import MLflowLogger


def test_a_repeated_evaluation_lands_after_the_runs_last_step(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    fit = MLflowLogger(tracking_uri=uri)
    for step in (11, 23, 35, 47):
        fit.log_metrics({"val/auroc": 0.7, "epoch": step // 12}, step=step)
    fit.log_metrics({"test/auroc": 0.8}, step=48)  # test after fit
    for value in (0.81, 0.82):  # `medtransfer test --ckpt_path ...` twice: Lightning logs at step 0
        again = MLflowLogger(tracking_uri=uri)
        again.continue_run(fit.run_id)
        again.append_after_logged_steps()
        again.log_metrics({"test/auroc": value, "test/loss": 0.5}, step=0)
    validate = MLflowLogger(tracking_uri=uri)
    validate.continue_run(fit.run_id)
    validate.append_after_logged_steps()
    validate.log_metrics({"val/auroc": 0.72}, step=0)
    client = harness.client(tmp_path)

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(fit.run_id, key), key=lambda m: m.step)]

    assert history("test/auroc") == [(48, 0.8), (49, 0.81), (50, 0.82)]
    assert history("test/loss") == [(0, 0.5), (1, 0.5)]  # a new key starts where Lightning logs it
    assert history("val/auroc") == [(11, 0.7), (23, 0.7), (35, 0.7), (47, 0.7), (48, 0.72)]
    assert harness.duplicated_steps(harness.metric_steps(tmp_path, fit.run_id)) == {}


@pytest.mark.faults
@pytest.mark.slow
def test_test_and_validate_again_through_the_cli_never_duplicate_a_step(tmp_path, pneumonia_npz):
    fit = harness.Fit(tmp_path, pneumonia_npz, "--test_after_fit=true", "--trainer.limit_test_batches=2")
    assert fit.wait() == 0, fit.output
    checkpoint = harness.last_checkpoint(tmp_path)
    for command in ("test", "test", "validate"):
        again = harness.Fit(tmp_path, pneumonia_npz, "--trainer.limit_test_batches=2", f"--ckpt_path={checkpoint}",
                            command=command)  # fmt: skip
        assert again.wait() == 0, again.output
    (run,) = harness.runs(tmp_path)
    steps = harness.metric_steps(tmp_path, run.info.run_id)
    assert harness.duplicated_steps(steps) == {}
    assert len(steps["test/auroc"]) == 3 and len(steps["val/auroc"]) == 5
    assert steps["val/auroc"][-1] > steps["val/auroc"][-2]  # validate's value follows the validation curve
