"""Benchmark what ``medtransfer fit`` costs per training step over a bare PyTorch + timm loop.

Both paths train ``tf_efficientnet_lite0`` (ImageNet weights of the ``lite0-package``, through
``create_backbone``) with a new one-logit head on PneumoniaMNIST's train split at 64x64, batch 64, from the
same data module settings (the default config's: its augmentation, ``num_workers: 0``), with Adam at the
same learning rates, in the same phase: **the whole backbone trainable, BatchNorm frozen** (phase 2 of the
default config, where 10 of its 13 epochs go). ``medtransfer fit`` runs in-process through
``medtransfer.commands.fit.build_cli`` with all it adds: MLflow logging (a store of its own in a scratch folder),
the progress bar, ``EpochSummary``, checkpointing, the finetuning callback and the training metrics.

Throughput is images/s over ``steps`` training steps after ``warmup`` steps, timed from one batch's start to
the next's, so data loading counts in both; validation is off in both. The two paths alternate
(fit, bare, fit, bare, ...) and the median of each is reported, because a shared CPU is noisy.
Target: ``fit`` reaches at least 0.9 of the bare loop's throughput on CPU.

Usage: python bench/fit_overhead.py [--steps 40] [--warmup 8] [--repeats 2] [--out PATH]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
TARGET_RATIO = 0.9
FINETUNE_LR = 1.0e-5  # phase 2: head and backbone at finetune_lr (the config's; head_finetune_lr defaults to it)


class StepTimer(Callback):
    """The time at which each training batch starts (after the loader delivered it)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())


def _images_per_second(starts: list[float], warmup: int, steps: int, batch_size: int) -> float:
    if len(starts) < warmup + steps + 1:
        raise RuntimeError(f"Expected at least {warmup + steps + 1} timed batches, but got {len(starts)}")
    return steps * batch_size / (starts[warmup + steps] - starts[warmup])


def _config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def time_fit(warmup: int, steps: int, data_path: str | None) -> float:
    """images/s of ``medtransfer fit`` (in-process, in a scratch folder with its own ``mlruns/``)."""
    sys.path.insert(0, str(Path(__file__).parent))  # so the CLI can import this module's StepTimer
    from medtransfer.commands.fit import build_cli

    overrides = [
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={warmup + steps + 1}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=true",
        "--finetuning.unfreeze_at_epoch=0",
        "--test_after_fit=false",
        "--trainer.callbacks+=fit_overhead.StepTimer",
    ]
    if data_path:
        overrides.append(f"--data.path={data_path}")
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="medtransfer-overhead-") as scratch:
        os.chdir(scratch)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # a previous fit's mlflow.set_tracking_uri leaves it set
        overrides.append(f"--trainer.logger.init_args.tracking_uri=sqlite:///{scratch}/mlruns/mlflow.db")
        try:
            cli = build_cli(["fit", f"--config={CONFIG}", *overrides])
        finally:
            os.chdir(cwd)
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepTimer")
    return _images_per_second(timer.starts, warmup, steps, cli.datamodule.hparams.batch_size)


def time_bare(warmup: int, steps: int, data_path: str | None) -> float:
    """images/s of a plain loop: same backbone, head, loader, loss and optimizer; nothing else."""
    import timm

    from medtransfer.data.medmnist import MedMNISTDataModule
    from medtransfer.models.backbones import create_backbone

    config = _config()
    seed_everything(config["seed_everything"], verbose=False)
    backbone = create_backbone(config["model"]["backbone"], pretrained=config["model"]["pretrained"])
    head = nn.Sequential(nn.Dropout(0.0), nn.Linear(backbone.num_features, 1))
    normalisation = timm.data.resolve_model_data_config(backbone)
    data_args = dict(config["data"]["init_args"], path=data_path) if data_path else config["data"]["init_args"]
    datamodule = MedMNISTDataModule(
        **data_args, mean=normalisation["mean"], std=normalisation["std"], interpolation=normalisation["interpolation"]
    )
    datamodule.setup("fit")
    backbone.train(), head.train()
    for module in backbone.modules():  # bn_mode: frozen
        if isinstance(module, _BatchNorm):
            module.eval()
    optimizer = torch.optim.Adam(
        [{"params": head.parameters(), "lr": FINETUNE_LR}, {"params": backbone.parameters(), "lr": FINETUNE_LR}]
    )
    starts = []
    for index, (x, y) in enumerate(datamodule.train_dataloader()):
        starts.append(time.perf_counter())
        if index == warmup + steps:
            break
        loss = nn.functional.binary_cross_entropy_with_logits(head(backbone(x)).squeeze(1), y.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _images_per_second(starts, warmup, steps, datamodule.hparams.batch_size)


def main(
    steps: int = 40,
    warmup: int = 8,
    repeats: int = 2,
    data_path: str | None = None,
    out: Path = REPO / "bench" / "results" / "fit_overhead.json",
) -> dict:
    """Time ``medtransfer fit`` and the bare loop ``repeats`` times each, interleaved; print and save the medians.

    Args:
        steps: training steps timed per measurement.
        warmup: steps left out first (allocator, caches, lazy MLflow run creation).
        repeats: measurements per path; the paths alternate.
        data_path: the PneumoniaMNIST ``.npz``; default: found as the config says (``$MEDTRANSFER_DATA_DIR``).
        out: where to write the JSON result.
    """
    from medtransfer.commands.fit import _quiet_third_party_noise
    from medtransfer.files import write_text_atomic

    _quiet_third_party_noise()
    fit, bare = [], []
    for _ in range(repeats):
        fit.append(time_fit(warmup, steps, data_path))
        bare.append(time_bare(warmup, steps, data_path))
    config = _config()
    result = {
        "backbone": config["model"]["backbone"],
        "image_size": config["data"]["init_args"]["image_size"],
        "batch_size": config["data"]["init_args"]["batch_size"],
        "phase": "backbone trainable, BatchNorm frozen (phase 2)",
        "warmup_steps": warmup,
        "timed_steps": steps,
        "fit_images_per_s": [round(v, 1) for v in fit],
        "bare_images_per_s": [round(v, 1) for v in bare],
        "fit_median": round(statistics.median(fit), 1),
        "bare_median": round(statistics.median(bare), 1),
        "ratio": round(statistics.median(fit) / statistics.median(bare), 3),
        "target_ratio": TARGET_RATIO,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    print(f"\n{'path':<28} {'images/s (median)':>18}  runs")
    print(f"{'medtransfer fit':<28} {result['fit_median']:>18}  {result['fit_images_per_s']}")
    print(f"{'bare PyTorch + timm loop':<28} {result['bare_median']:>18}  {result['bare_images_per_s']}")
    verdict = "met" if result["meets_target"] else "MISSED"
    print(f"{'ratio fit / bare':<28} {result['ratio']:>18}  {verdict} (>= {TARGET_RATIO})")
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
