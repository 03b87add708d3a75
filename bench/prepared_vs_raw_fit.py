"""Does training on prepared data reach what training on the raw files reaches? Short fits of EfficientNet-Lite0
(offline ImageNet weights) on the 500-image ChestX-ray14 sample (14 findings), from the raw PNGs and from the
same data prepared by ``medtransfer prepare``, for several seeds; augmentation is on in both (applied after
reading). The two loaders draw their shuffles differently, so the runs differ like two seeds do: the question
is whether the raw-vs-prepared difference stays within the seed-to-seed spread.

Usage: python bench/prepared_vs_raw_fit.py [--seeds '[0, 1, 2]'] [--epochs 3]
       [--out bench/results/prepared_vs_raw_fit.json]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer, seed_everything

from medtransfer.data.images import ChestXray14Source, ImageDataModule
from medtransfer.data.prepared import prepare
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("MEDTRANSFER_DATA_DIR") or REPO.parent / "shared" / "data") / "chestxray14_sample"
SIZE = 64


def datamodule(prepared: str | None) -> ImageDataModule:
    source = ChestXray14Source(str(SAMPLE / "Data_Entry_2017_v2020.csv"), str(SAMPLE / "images"))
    return ImageDataModule(source, prepared=prepared, image_size=SIZE, batch_size=32, num_workers=1)


def fit(prepared: str | None, seed: int, epochs: int) -> dict[str, float]:
    seed_everything(seed, verbose=False)
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="lite0-package", task="multilabel",
                             num_classes=14, class_weighting="balanced")  # fmt: skip
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    dm = datamodule(prepared)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return {"val_auroc": round(metrics["val/auroc"], 4), "val_loss": round(metrics["val/loss"], 4)}


def prepared_vs_raw_fit_benchmark(
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse shows the default)
    epochs: int = 3,
    out: Path = REPO / "bench" / "results" / "prepared_vs_raw_fit.json",
) -> dict:
    """Fit on the raw sample and on its prepared copy for each seed and store the validation metrics.

    Args:
        seeds: seeds to fit; each is fitted once on raw and once on prepared data.
        epochs: epochs of each fit.
        out: where the results go.
    """
    prepared = str(Path(tempfile.mkdtemp()) / "sample64")
    prepare(datamodule(None), prepared, SIZE, "bicubic", num_workers=1)
    rows = []
    for seed in seeds:
        for kind, where in (("raw", None), ("prepared", prepared)):
            started = time.perf_counter()
            result = fit(where, seed, epochs)
            rows.append({"data": kind, "seed": seed, **result, "seconds": round(time.perf_counter() - started)})
            print(rows[-1], flush=True)
    by_kind = {kind: [r["val_auroc"] for r in rows if r["data"] == kind] for kind in ("raw", "prepared")}
    gaps = [abs(p - r) for p, r in zip(by_kind["prepared"], by_kind["raw"], strict=True)]
    summary = {
        "mean_val_auroc": {kind: round(float(np.mean(v)), 4) for kind, v in by_kind.items()},
        "seed_spread_val_auroc": {kind: round(float(np.ptp(v)), 4) for kind, v in by_kind.items()},
        "mean_abs_gap_same_seed": round(float(np.mean(gaps)), 4),
    }
    result = {"size": SIZE, "epochs": epochs, "rows": rows, **summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary)
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(prepared_vs_raw_fit_benchmark, as_positional=False)
