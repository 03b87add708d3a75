"""Start a real ``medtransfer fit`` as a child process, watch what it writes, SIGKILL it, resume it.

Kill points are observed, not planted: lines of the EpochSummary output (one per finished epoch) and files in
the run's checkpoint folder (``last.ckpt`` rewritten, an ``AtomicCheckpointIO`` partial file appearing).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers import CONSOLE_SCRIPT, DEFAULT_CONFIG
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
#: The CheXNet-style two-phase recipe on top (1e-3, then 1e-5): one ``backbone`` group at a constant rate, so
#: every scenario's rates are
#: exact (the default's per-block cosine rates through a resume are tested in tests/callbacks/test_finetuning.py).
TWO_PHASE = REPO / "configs" / "recipes" / "two_phase.yaml"
#: A two-phase fit of a few hundred images (6 batches of 16 an epoch), 4 epochs, phase 2 from the third.
TINY = [
    "--seed_everything=0",
    "--trainer.max_epochs=4",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--data.image_size=32",
    "--data.batch_size=16",
    "--data.train_fraction=0.06",
    "--finetuning.unfreeze_at_epoch=2",
    "--test_after_fit=false",
]
#: ``EpochSummary``'s line for a finished epoch: ``epoch 2/4  phase 1  ...``.
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\s")
#: Lightning logs ``epoch`` with every batch of epoch-end metrics; it says nothing the step does not.
BOOKKEEPING = {"epoch"}


class Fit:
    """One ``medtransfer fit`` process in ``workdir`` (its own ``mlruns/``), its output collected line by line."""

    def __init__(self, workdir: Path, data_path: Path, *args: str, command: str = "fit") -> None:
        self.workdir = workdir
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        options = TINY if command == "fit" else [o for o in TINY if not o.startswith(("--test_after_fit", "--fine"))]
        command = [str(CONSOLE_SCRIPT), command, f"--config={DEFAULT_CONFIG}", f"--config={TWO_PHASE}",
                   f"--data.path={data_path}", *options, *args]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def finished_epochs(self) -> list[int]:
        """The 1-based epochs EpochSummary reported as finished, in order."""
        return [int(m.group(1)) for line in self.lines if (m := EPOCH_LINE.match(line))]

    def wait_for_epoch(self, epoch: int, timeout: float = 300) -> None:
        """Block until EpochSummary reports the 1-based ``epoch`` as finished."""
        self.wait_until(lambda: epoch in self.finished_epochs(), timeout, f"epoch {epoch} to finish")

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300, what: str = "", poll: float = 0.001):
        """Poll ``condition`` (every ``poll`` s) until true; fail if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"fit ended (rc {self.process.returncode}) before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output}")
            time.sleep(poll)

    def kill(self) -> None:
        """SIGKILL: no handler, no ``finally``, no flush; what is on disk is what a crash leaves."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join(timeout=10)

    def terminate(self, timeout: float = 600) -> int:
        """SIGTERM, as a scheduler or ``kill`` sends it; wait for the process to end by itself; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 600) -> int:
        """Wait for the fit to end by itself; its exit status."""
        returncode = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return returncode


def checkpoint_dir(workdir: Path) -> Path | None:
    """``mlruns/<experiment>/<run>/checkpoints`` of the one run in ``workdir``, once it exists."""
    found = sorted(workdir.glob("mlruns/*/*/checkpoints"))
    return found[0] if found else None


def last_checkpoint(workdir: Path) -> Path:
    """The run's ``last.ckpt``: what the documented resume command names."""
    folder = checkpoint_dir(workdir)
    assert folder is not None and (folder / "last.ckpt").is_file(), f"no last.ckpt under {workdir}/mlruns"
    return folder / "last.ckpt"


def checkpoint_stamp(workdir: Path) -> int:
    """``last.ckpt``'s mtime in ns (0 while there is none): it changes whenever a save lands."""
    folder = checkpoint_dir(workdir)
    try:
        return (folder / "last.ckpt").stat().st_mtime_ns if folder else 0
    except FileNotFoundError:
        return 0


def partial_checkpoints(workdir: Path) -> list[Path]:
    """Files an ``AtomicCheckpointIO`` save is writing (or a killed one left): ``.<name>.<random>.tmp``."""
    folder = checkpoint_dir(workdir)
    return sorted(folder.glob(".*.ckpt.*.tmp")) if folder else []


def client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")


def runs(workdir: Path) -> list:
    """All runs of the ``medtransfer`` experiment in ``workdir``."""
    experiment = client(workdir).get_experiment_by_name("medtransfer")
    return client(workdir).search_runs([experiment.experiment_id]) if experiment else []


def metric_steps(workdir: Path, run_id: str) -> dict[str, list[int]]:
    """Every metric of the run (Lightning's ``epoch`` bookkeeping aside) -> its logged steps, sorted."""
    mlflow = client(workdir)
    keys = set(mlflow.get_run(run_id).data.metrics) - BOOKKEEPING
    return {key: sorted(m.step for m in mlflow.get_metric_history(run_id, key)) for key in sorted(keys)}


def duplicated_steps(steps: dict[str, list[int]]) -> dict[str, list[int]]:
    """Metric -> the steps it has more than one value at (empty when every step holds one value)."""
    found = {k: sorted(s for s, n in collections.Counter(v).items() if n > 1) for k, v in steps.items()}
    return {k: v for k, v in found.items() if v}


def final_values(workdir: Path, run_id: str) -> dict[str, float]:
    """Each metric's value at its last step."""
    return dict(client(workdir).get_run(run_id).data.metrics)
