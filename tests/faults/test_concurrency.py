"""Processes started at the same instant on a fresh ``mlruns/``: all finish, each in its own
run with its own name. Two fits used to race in MLflow's schema migration (one died) and get the same name.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np
import pytest
from PIL import Image

N = 4
#: A child that waits for the shared start instant, then opens the store and logs into a new run.
_OPEN_STORE = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store
from medtransfer.tracking.mlflow import MLflowLogger
go = Path(sys.argv[1])
go.with_name(go.name + ".ready." + sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.001)
logger = MLflowLogger(tracking_uri=sys.argv[2])
logger.log_metrics({"m": 1.0}, step=0)
logger.finalize("success")
"""


def _together(
    commands: list[list[str]], go: Path, cwd: Path, ready: int = 0, timeout: float = 900
) -> list[tuple[int, str]]:
    """Start every command, wait for ``ready`` of them to touch ``<go>.ready.<i>``, release them all at one instant
    (``go`` appears), wait for them to end; ``(status, output)`` each."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]  # fmt: skip
    deadline = time.monotonic() + timeout
    while len(list(go.parent.glob(go.name + ".ready.*"))) < ready and time.monotonic() < deadline:
        time.sleep(0.01)  # children that signal readiness have done their imports: release them together
    go.touch()
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in processes]


def test_processes_opening_a_fresh_store_together_all_get_their_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    go = tmp_path / "go"
    commands = [[sys.executable, "-c", _OPEN_STORE, str(go), uri, str(i)] for i in range(N)]
    results = _together(commands, go, tmp_path, ready=N)
    for status, output in results:
        assert status == 0, output[-3000:]
    runs = harness.runs(tmp_path)
    assert len(runs) == N and {run.info.status for run in runs} == {"FINISHED"}


@pytest.mark.faults
@pytest.mark.slow
def test_four_fits_started_together_all_finish_with_distinct_run_names(tmp_path, pneumonia_npz):
    go = tmp_path / "go"
    wait = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.001)"
    fit = [str(harness.CONSOLE_SCRIPT), "fit", f"--config={harness.DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}",
           *harness.TINY, "--trainer.max_epochs=1", "--mlflow_model.enabled=false"]  # fmt: skip
    commands = [["bash", "-c", f'{sys.executable} -c "$0" && exec "$@"', wait, *fit] for _ in range(N)]
    for status, output in _together(commands, go, tmp_path):
        assert status == 0, output[-3000:]
    runs = harness.runs(tmp_path)
    assert len(runs) == N and {run.info.status for run in runs} == {"FINISHED"}
    assert len({run.info.run_name for run in runs}) == N


@pytest.mark.faults
def test_predicts_started_together_write_their_own_complete_outputs(tmp_path, pneumonia_npz):
    folder = tmp_path / "images"
    folder.mkdir()
    with np.load(pneumonia_npz) as data:
        for i, image in enumerate(data["test_images"][:40]):
            Image.fromarray(image).save(folder / f"case{i:02d}.png")
    checkpoint = _checkpoint(tmp_path)
    go = tmp_path / "go"
    wait = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.001)"
    out = tmp_path / "out"
    commands = [["bash", "-c", f'{sys.executable} -c "$0" && exec "$@"', wait, sys.executable, "-m",
                 "medtransfer.entry", "predict", str(folder), str(checkpoint), "--output", str(out / f"p{i}.csv")]
                for i in range(N)]  # fmt: skip
    for status, output in _together(commands, go, tmp_path):
        assert status == 0, output[-3000:]
    for i in range(N):
        with (out / f"p{i}.csv").open(newline="") as handle:
            assert len(list(csv.DictReader(handle))) == 40
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.csv" for i in range(N)]


def _checkpoint(folder: Path) -> Path:
    from untrained import write_untrained_checkpoint

    return write_untrained_checkpoint(folder / "model.ckpt")
