"""After a crash and a resume, each epoch's metrics in MLflow are the resumed attempt's, not the killed one's.

The first attempt is SIGKILLed at the end of epoch 2's validation: its metrics are computed and logged, its
checkpoint is not written. The resume starts again from epoch 1's ``last.ckpt`` and computes epoch 2 anew.
MLflow cannot replace a logged value, so the logger holds an epoch's metrics back until a checkpoint covering
them is on disk (``MLflowLogger.hold_until_checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path

import harness
import pytest
from harness import Fit

HERE = Path(__file__).parent
CALLBACK = "--trainer.callbacks+=attempts.KillBeforeSave"  # tests/faults/attempts.py


@pytest.mark.faults
def test_an_epoch_recomputed_after_a_crash_keeps_the_resumed_value(tmp_path, pneumonia_npz, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MEDTRANSFER_TEST_ATTEMPT", "1")
    first = Fit(tmp_path, pneumonia_npz, CALLBACK, "--trainer.max_epochs=3")
    assert first.wait() != 0  # killed by its own callback
    last = harness.last_checkpoint(tmp_path)

    monkeypatch.setenv("MEDTRANSFER_TEST_ATTEMPT", "2")
    second = Fit(tmp_path, pneumonia_npz, CALLBACK, "--trainer.max_epochs=3", f"--ckpt_path={last}")
    assert second.wait() == 0, second.output

    (run,) = harness.runs(tmp_path)
    history = harness.client(tmp_path).get_metric_history(run.info.run_id, "probe/attempt")
    by_step = sorted((m.step, m.value) for m in history)
    assert [value for _, value in by_step] == [1.0, 2.0, 2.0]  # epoch 1 from the first attempt; 2 and 3 resumed
    assert not harness.duplicated_steps(harness.metric_steps(tmp_path, run.info.run_id))
