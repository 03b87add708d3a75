"""``--ckpt_path last`` after a fit killed before its first checkpoint: it must not reopen
an older, finished run with other settings (which used to be re-registered, re-tested and reported as success);
it refuses, naming the newest run and what to do.
"""

from __future__ import annotations

from pathlib import Path

import harness
import pytest

from medtransfer.entry import main
from medtransfer.tracking.mlflow import MLflowLogger

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"


def test_last_refuses_to_reopen_an_older_run_when_the_newest_has_no_checkpoint(workdir, pneumonia_npz, capsys):
    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    older = MLflowLogger(tracking_uri=uri, run_name="older-finished")
    older.log_metrics({"val/auroc": 0.9}, step=0)
    older.finalize("success")
    checkpoints = workdir / "mlruns" / older.experiment_id / older.run_id / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"an older run's checkpoint: must not be opened")
    killed = MLflowLogger(tracking_uri=uri, run_name="newest-killed")
    killed.log_metrics({"train/loss": 0.7}, step=0)  # RUNNING: SIGKILLed before its first epoch ended
    with pytest.raises(SystemExit) as exited:
        main(["fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", "--data.image_size=32", "--ckpt_path=last"])
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("medtransfer: error:"))  # one line, no traceback
    assert exited.value.code == 2 and "Traceback" not in err, err
    assert f"the newest run {killed.run_id} (newest-killed, RUNNING) has no last.ckpt" in line
    runs = {run.info.run_name: run.info.status for run in harness.runs(workdir)}
    assert runs == {"older-finished": "FINISHED", "newest-killed": "RUNNING"}  # nothing reopened, nothing new
