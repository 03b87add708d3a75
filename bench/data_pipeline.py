"""Is the loader fast enough? Train-loader images/s (decode + augment + collate) against the model's train
step at the same size, on the real ChestX-ray14 sample (256x256 PNGs) with the default augmentations.

Target: the loader sustains >= 3x the model's throughput on 2 cores at 64x64 and 224x224.
Usage: python bench/data_pipeline.py [--workers 2] [--out bench/results/data_pipeline.json]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from medtransfer.data.images import ChestXray14Source, ImageDataModule
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("MEDTRANSFER_DATA_DIR") or REPO.parent / "shared" / "data") / "chestxray14_sample"


def loader_throughput(size: int, workers: int, batch_size: int, epochs: int = 2) -> float:
    source = ChestXray14Source(str(SAMPLE / "Data_Entry_2017_v2020.csv"), str(SAMPLE / "images"))
    dm = ImageDataModule(source, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=batch_size,
                         num_workers=workers)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    next(iter(loader))  # start the workers
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def model_throughput(size: int, batch_size: int, steps: int = 5) -> float:
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="none", task="multilabel", num_classes=14)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)  # phase 2: the whole network trains
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, 2, (batch_size, 14)).float()
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        loss, _, _ = model.model_step((x, y))
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def data_pipeline_benchmark(
    workers: int = 2,
    out: Path = REPO / "bench" / "results" / "data_pipeline.json",
) -> dict:
    """Time the train loader against the model's train step at 64 and 224 px and store the table.

    Args:
        workers: loader worker processes.
        out: where the results go.
    """
    rows = []
    for size, batch_size in ((64, 64), (224, 16)):
        loader = loader_throughput(size, workers, batch_size)
        model = model_throughput(size, batch_size)
        rows.append({"size": size, "batch_size": batch_size, "workers": workers,
                     "loader_img_s": round(loader, 1), "model_train_img_s": round(model, 1),
                     "ratio": round(loader / model, 2), "meets_3x": loader >= 3 * model})  # fmt: skip
    print(f"{'size':>5} {'batch':>6} {'workers':>8} {'loader img/s':>13} {'model img/s':>12} {'ratio':>6}  >= 3x")
    for r in rows:
        print(f"{r['size']:>5} {r['batch_size']:>6} {r['workers']:>8} {r['loader_img_s']:>13} "
              f"{r['model_train_img_s']:>12} {r['ratio']:>6}  {'yes' if r['meets_3x'] else 'NO'}")  # fmt: skip
    result = {"cpu_count": os.cpu_count(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(data_pipeline_benchmark, as_positional=False)
