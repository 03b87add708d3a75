"""A two-process ``ddp`` fit (CPU, ``gloo``) on prepared data, checked against a single-process fit.

Why they must agree: the prepared train split holds ``2b`` images, so the single process (batch ``2b``) and each
rank (batch ``b``, its own LitData shard) take one step per epoch, over the same ``2b`` images in all. The
augmentation is off, dropout is 0 and BatchNorm stays in eval mode (``bn_mode: frozen``), so DDP's averaged
gradient equals the single process's gradient; validation and test split evenly. What remains is float
rounding, hence a tolerance of 1e-4, as in ``test_ddp.py`` (whose harness runs the fits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from mlflow.tracking import MlflowClient
from test_ddp import BATCH, TOLERANCE, fit, only_run

from medtransfer.data.images import CsvSource, ImageDataModule
from medtransfer.data.prepared import prepare
from medtransfer.tracking.system_metrics import LogSystemMetrics

SIZE = 32
COMPARED = ("train/loss", "val/loss", "val/auroc", "val/threshold", "test/loss", "test/auroc", "test/acc")


class RecordShards(Callback):
    """Write, per rank, a fingerprint of every training image it saw and whether it sampled system metrics."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        path = Path(f"shard{trainer.global_rank}.json")
        record = json.loads(path.read_text()) if path.is_file() else {"images": [], "system_metrics": []}
        record["images"] += [round(float(x.double().sum()), 3) for x in batch[0]]
        sampler = next(cb for cb in trainer.callbacks if isinstance(cb, LogSystemMetrics))
        record["system_metrics"].append(sampler._monitor is not None)
        path.write_text(json.dumps(record))


def _config(folder: Path, csv: Path, prepared: Path) -> Path:
    config = folder / "config.yaml"
    config.write_text(
        "model:\n  backbone: tf_efficientnet_lite0\n  pretrained: lite0-package\n"
        "data:\n  class_path: medtransfer.data.images.ImageDataModule\n  init_args:\n"
        f"    source:\n      class_path: medtransfer.data.images.CsvSource\n      init_args:\n"
        f"        csv_path: {csv}\n        split_column: split\n"
        f"    prepared: {prepared}\n    image_size: {SIZE}\n"
        "    rotate_degrees: 0\n    translate: 0\n    scale: 0\n    brightness_contrast: 0\n    clahe: 0\n"
    )
    return config


COMMON = ["--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--finetuning.unfreeze_at_epoch=1",
          "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--test_after_fit=true",
          "--system_metrics.enabled=true", "--system_metrics.interval_s=0.5",
          "--trainer.callbacks+=test_ddp_prepared.RecordShards"]  # fmt: skip


@pytest.fixture(scope="module")
def fits(tmp_path_factory, chestxray14_sample_dir):
    if not torch.distributed.is_gloo_available():
        pytest.skip("CPU ddp needs torch's gloo backend")
    root = tmp_path_factory.mktemp("ddp_prepared")
    rows = pd.read_csv(chestxray14_sample_dir / "Data_Entry_2017_v2020.csv").head(48)
    paths = [str(chestxray14_sample_dir / "images" / name) for name in rows["Image Index"]]
    splits = ["train"] * 16 + ["val"] * 16 + ["test"] * 16  # LitData deals whole batches out to the ranks
    frame = pd.DataFrame({"path": paths, "label": [i % 2 for i in range(48)], "split": splits})
    csv = root / "sample.csv"
    frame.to_csv(csv, index=False)
    source = CsvSource(str(csv), split_column="split")
    prepare(ImageDataModule(source, image_size=SIZE), str(root / "prepared"), SIZE, "bicubic")
    args = (f"--config={_config(root, csv, root / 'prepared')}", *COMMON)
    single = fit(root / "single", *args, "--trainer.devices=1", f"--data.batch_size={2 * BATCH}", timeout=900)
    ddp = fit(root / "ddp", *args, "--trainer.devices=2", "--trainer.strategy=ddp", f"--data.batch_size={BATCH}",
              timeout=900)  # fmt: skip
    return {"single": (root / "single", single), "ddp": (root / "ddp", ddp)}


@pytest.mark.slow
def test_each_rank_reads_a_disjoint_shard_of_the_prepared_data(fits):
    (single, _), (ddp, _) = fits["single"], fits["ddp"]
    rank0, rank1 = (json.loads((ddp / f"shard{r}.json").read_text())["images"] for r in (0, 1))
    seen = json.loads((single / "shard0.json").read_text())["images"]
    assert len(rank0) == len(rank1) == 2 * BATCH  # 2 epochs of one batch of b
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(seen)


@pytest.mark.slow
def test_ddp_on_prepared_data_reports_the_metrics_of_a_single_process_fit(fits):
    (single, _), (ddp, _) = fits["single"], fits["ddp"]
    single_run, ddp_run = only_run(single), only_run(ddp)
    for metric in COMPARED:
        assert ddp_run[f"metrics.{metric}"] == pytest.approx(single_run[f"metrics.{metric}"], abs=TOLERANCE), metric


@pytest.mark.slow
def test_ddp_on_prepared_data_leaves_one_run_with_rank_zeros_system_metrics(fits):
    workdir, result = fits["ddp"]
    run = only_run(workdir)
    assert run["status"] == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")]
    assert steps and len(steps) == len(set(steps))  # one sampler: no step logged twice
    assert json.loads((workdir / "shard0.json").read_text())["system_metrics"] == [True, True]
    assert json.loads((workdir / "shard1.json").read_text())["system_metrics"] == [False, False]
    assert result.stdout.count(f"MLflow run {run.run_id}") == 1
