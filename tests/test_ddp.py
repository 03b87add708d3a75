"""A real two-process ``ddp`` fit on CPU (``gloo``) through the ``medtransfer`` console script, checked against
a single-process fit on the same data.

Why the two runs must agree: the single process trains on batches of ``2b`` images, the two ranks on ``b``
each. ``overfit_batches`` turns shuffling off (Lightning's ``DistributedSampler`` too), so step ``k`` of the
single process sees images ``2bk .. 2bk+2b-1`` and rank ``r`` sees the ones of parity ``r`` among them: the same
images. The augmentation is off, dropout is 0 and BatchNorm stays in eval mode (``bn_mode: frozen``), so the
loss is a mean over images and DDP's averaged gradient equals the single process's gradient. Validation and
test batches split the same way. What remains is float rounding (an all-reduce sums in another order than one
batch mean, ~1e-7 relative), hence a tolerance of 1e-4 on the logged metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import CONSOLE_SCRIPT
from lightning.pytorch import Callback, LightningModule, Trainer
from mlflow.tracking import MlflowClient

from medtransfer.tracking.callbacks import read_run_info

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
BATCH = 8  # per rank; the single process takes 2 * BATCH
COMMON = [
    f"--config={REPO / 'configs' / 'pneumonia_effnet_lite0.yaml'}",
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=2",
    "--trainer.overfit_batches=3",  # 3 train and 3 val batches, in file order (no shuffling)
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--finetuning.unfreeze_at_epoch=1",  # epoch 2 trains the whole backbone: its gradients must be synced too
    "--data.image_size=32",
    "--data.rotate_degrees=0",
    "--data.translate=0",
    "--data.scale=0",
    "--model.drop_rate=0",  # dropout draws differ between the ranks and the single process
    "--trainer.callbacks+=test_ddp.RecordRankState",
]
COMPARED = ("train/loss", "val/loss", "val/auroc", "val/acc", "val/sensitivity", "val/specificity", "val/threshold",
            "val/min_confidence", "test/loss", "test/auroc", "test/acc", "test/coverage", "test/aurc")  # fmt: skip


class RecordRankState(Callback):
    """Write what each rank fitted (threshold, band, temperature) and a checksum of its weights to
    ``rank<r>.json`` in the working directory, so the test can compare ranks that ran in other processes."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module, "validation")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "fit_end")

    @staticmethod
    def _write(trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        path = Path(f"rank{trainer.global_rank}.json")
        records = json.loads(path.read_text()) if path.is_file() else []
        records.append(
            {
                "when": when,
                "epoch": trainer.current_epoch,
                "world_size": trainer.world_size,
                "threshold": pl_module.decision_threshold.tolist(),
                "min_confidence": pl_module.min_confidence.tolist(),
                "temperature": pl_module.temperature.item(),
                "backbone_sum": sum(float(p.detach().double().sum()) for p in pl_module.backbone.parameters()),
                "head_sum": sum(float(p.detach().double().sum()) for p in pl_module.head.parameters()),
            }
        )
        path.write_text(json.dumps(records))


def fit(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``medtransfer fit *args`` in a process of its own, in ``workdir``, with the tests folder importable (for the
    recording callbacks) and no tracking URI from the environment (the run lands in ``workdir/mlruns``)."""
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [str(CONSOLE_SCRIPT), "fit", *args]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_run(workdir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["medtransfer"])
    assert len(runs) == 1, f"expected one MLflow run in {workdir}, found {len(runs)}"
    return runs.iloc[0]


@pytest.fixture(scope="module")
def fits(tmp_path_factory, pneumonia_npz):
    """The same short fit + test twice: one process with batch 2b, and ``ddp`` on two CPU processes with b."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("CPU ddp needs torch's gloo backend")
    root = tmp_path_factory.mktemp("ddp")
    args = (*COMMON, f"--data.path={pneumonia_npz}")
    single = fit(root / "single", *args, "--trainer.devices=1", f"--data.batch_size={2 * BATCH}")
    ddp = fit(root / "ddp", *args, "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.batch_size={BATCH}")
    return {"single": (root / "single", single), "ddp": (root / "ddp", ddp)}


@pytest.mark.slow
def test_ddp_fit_leaves_exactly_one_complete_mlflow_run(fits):
    workdir, result = fits["ddp"]
    run = only_run(workdir)
    assert run["status"] == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    assert len(client.get_metric_history(run.run_id, "val/auroc")) == 2  # one value per epoch, not per rank
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"checkpoints", "config", "plots"} <= artifacts
    assert result.stdout.count(f"MLflow run {run.run_id}") == 1  # printed by rank 0 only


@pytest.mark.slow
def test_ddp_checkpoints_are_written_once_by_rank_zero_and_carry_the_run(fits):
    workdir, _ = fits["ddp"]
    run = only_run(workdir)
    experiment_folder = workdir / "mlruns" / str(run.experiment_id)
    assert sorted(p.name for p in experiment_folder.iterdir()) == [run.run_id]  # no folder of another rank
    checkpoints = sorted((experiment_folder / run.run_id / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints if p.name == "last.ckpt"] == ["last.ckpt"]
    for checkpoint in checkpoints:
        assert read_run_info(checkpoint)["run_id"] == run.run_id
    plots = {p.name for p in (experiment_folder / run.run_id / "plots").iterdir()}
    assert plots == {"roc.png", "risk_coverage.png", "reliability.png", "confusion.png", "evaluation.csv"}


@pytest.mark.slow
def test_ddp_ranks_fit_identical_thresholds_and_bands(fits):
    workdir, _ = fits["ddp"]
    rank0, rank1 = (json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [r["world_size"] for r in rank0] == [2, 2, 2]  # two validation epochs, then fit end
    fitted = ("epoch", "threshold", "min_confidence", "temperature")  # from all ranks' outputs (CatMetric)
    assert [{k: r[k] for k in fitted} for r in rank0] == [{k: r[k] for k in fitted} for r in rank1]


def _history(workdir: Path, run_id: str, metric: str) -> list[float]:
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


@pytest.mark.slow
def test_ddp_reports_the_metrics_of_a_single_process_fit_in_phase_1(fits):
    (single, _), (ddp, _) = fits["single"], fits["ddp"]
    single_run, ddp_run = only_run(single), only_run(ddp)
    for metric in ("train/loss", "val/loss", "val/auroc", "val/acc", "val/threshold", "val/min_confidence"):
        expected = _history(single, single_run.run_id, metric)[0]  # epoch 1: head only
        assert _history(ddp, ddp_run.run_id, metric)[0] == pytest.approx(expected, abs=TOLERANCE), metric
    one, two = (json.loads((folder / "rank0.json").read_text())[0] for folder in (single, ddp))
    assert two["head_sum"] == pytest.approx(one["head_sum"], abs=TOLERANCE)


@pytest.mark.slow
def test_ddp_keeps_ranks_in_step_after_the_unfreeze_and_matches_a_single_process_fit(fits):
    (single, _), (ddp, _) = fits["single"], fits["ddp"]
    rank0, rank1 = (json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # identical weights on every rank at every epoch end
    single_run, ddp_run = only_run(single), only_run(ddp)
    for metric in COMPARED:  # last epoch (phase 2) and the test of the best checkpoint
        assert ddp_run[f"metrics.{metric}"] == pytest.approx(single_run[f"metrics.{metric}"], abs=TOLERANCE), metric
    for one, two in zip(json.loads((single / "rank0.json").read_text()), rank0, strict=True):
        # a sum of ~3.4 M float32 weights: rounding is relative to its size (~1e-7 per step), so compare relatively;
        # an unsynced gradient moves it by orders of magnitude more
        assert two["backbone_sum"] == pytest.approx(one["backbone_sum"], rel=1e-6)
