"""Does prepared data keep a GPU fed? Images/s of (a) decoding + resizing full-size 1024-px chest X-ray PNGs,
(b) streaming the same images prepared at 224 px (``medtransfer prepare``: LitData chunks), both through the
same evaluation pipeline (gray to RGB, normalise, to tensor) and loader, with 1, 2 and all workers, and (c) the
model's train step (forward, backward, Adam) for DenseNet-121 and EfficientNet-Lite0 at 224 px.

Full-resolution inputs: the shared ChestX-ray14 sample (256 px) upsampled to 1024 px (the release's size), as
8-bit PNGs, cached under ``--cache``. Headline: ``prepared_vs_raw_ratio`` = prepared-stream images/s over
raw-decode images/s at the same number of workers (2, the cores of the target machine); target >= 10.

GPU rows (fp32/bf16, with and without channels_last/compile, GPU utilisation) are written as ``null`` with a
note when no GPU is present; run this script on a GPU machine to fill them.

Usage: python bench/throughput.py [--images 96] [--batch_size 16] [--min_seconds 4] [--model_steps 3]
       [--out bench/results/throughput.json]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from medtransfer.data.images import CsvSource, ImageDataModule
from medtransfer.data.prepared import prepare
from medtransfer.data.readers import read_image
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("MEDTRANSFER_DATA_DIR") or REPO.parent / "shared" / "data") / "chestxray14_sample"
SIZE, FULL = 224, 1024
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHE = Path(tempfile.gettempdir()) / "medtransfer-throughput"


def full_resolution_csv(folder: Path, count: int) -> Path:
    """``count`` sample images upsampled to 1024 px (bicubic) as 8-bit PNGs, listed in a CSV (all in ``val``)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(SAMPLE / "Data_Entry_2017_v2020.csv").head(count)
    rows = []
    for name in labels["Image Index"]:
        path = folder / name
        if not path.is_file():
            image = cv2.resize(read_image(SAMPLE / "images" / name), (FULL, FULL), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(path), image)
        rows.append({"path": str(path), "label": int(len(rows) % 2), "split": "val"})
    rows[0]["split"], rows[1]["split"] = "train", "test"  # prepare wants each split non-empty
    csv = folder / "images.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def datamodule(csv: Path, workers: int, batch_size: int, prepared: str | None = None) -> ImageDataModule:
    source = CsvSource(str(csv), split_column="split")
    return ImageDataModule(source, prepared=prepared, image_size=SIZE, mean=MEAN, std=STD, interpolation="bilinear",
                           batch_size=batch_size, num_workers=workers)  # fmt: skip


class DecodeResize(torch.utils.data.Dataset):
    """(a) The raw path's own work: decode a PNG (``read_image``) and resize it to the training size."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = read_image(self.paths[index])
        return torch.from_numpy(cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))


def _rates(loader, min_seconds: float) -> tuple[float, float]:
    """Median and best images/s over whole epochs of ``loader``, after a warm-up epoch (worker start, page
    cache), until ``min_seconds`` have passed and at least 3 epochs were timed. On a shared machine the load
    changes from second to second: the median of several epochs is the fairer figure."""
    for _ in loader:
        pass
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(rates) < 3:
        began, seen = time.perf_counter(), 0
        for batch in loader:
            seen += len(batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list) else batch)
        rates.append(seen / (time.perf_counter() - began))
    return float(np.median(rates)), float(max(rates))


def stream_throughput(csv: Path, prepared: str, workers: int, batch_size: int, min_seconds: float) -> dict:
    """(a) decode + resize of the 1024-px PNGs against (b) reading the prepared 224-px stream: the work each
    path does before the shared uint8 -> normalised tensor step; same batch size and workers."""
    from litdata import StreamingDataLoader, StreamingDataset

    paths = pd.read_csv(csv).query("split == 'val'")["path"].tolist()
    raw = torch.utils.data.DataLoader(DecodeResize(paths), batch_size=batch_size, num_workers=workers,
                                      persistent_workers=True)  # fmt: skip
    raw_median, raw_best = _rates(raw, min_seconds)
    del raw  # its workers stop before the stream's start
    stream = StreamingDataLoader(StreamingDataset(f"{prepared}/val"), batch_size=batch_size, num_workers=workers,
                                 persistent_workers=True)  # fmt: skip
    stream_median, stream_best = _rates(stream, min_seconds)
    del stream
    row = {
        "workers": workers,
        "raw_png_decode_resize_img_s": round(raw_median, 1),
        "raw_best_img_s": round(raw_best, 1),
    }
    row |= {"prepared_stream_img_s": round(stream_median, 1), "prepared_best_img_s": round(stream_best, 1)}
    return row | {"prepared_vs_raw": round(stream_median / raw_median, 2)}


def loader_throughput(dm: ImageDataModule, min_seconds: float) -> tuple[float, float]:
    """Median and best images/s of the data module's evaluation loader of ``val``: the above plus gray to RGB,
    normalise to float and collate, as training sees it."""
    dm.setup("validate")
    return _rates(dm.val_dataloader(), min_seconds)


def model_throughput(
    backbone: str, batch_size: int, steps: int, device: str = "cpu", precision: str = "32",
    channels_last: bool = False, compile: bool = False,
) -> float:  # fmt: skip
    """Images/s of the full train step (phase 2: the whole network trains) at 224 px."""
    model = ClassifierModule(backbone=backbone, pretrained="none", task="multilabel", num_classes=14,
                             channels_last=channels_last, compile=compile).to(device)  # fmt: skip
    model.configure_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(batch_size, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 2, (batch_size, 14), device=device).float()
    model.train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        optimizer.zero_grad()
        with autocast:
            loss, _, _ = model.model_step((x, y))
        loss.backward()
        optimizer.step()

    for _ in range(3 if compile else 1):  # warm-up (compilation)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def gpu_rows(batch_size: int, steps: int) -> list[dict]:
    """Train images/s on the GPU at fp32/bf16-mixed, with and without channels_last/compile, and the GPU's
    utilisation right after (``torch.cuda.utilization``, through pynvml); ``null`` values without a GPU."""
    rows = []
    for backbone in ("densenet121", "tf_efficientnet_lite0"):
        for precision in ("32", "bf16-mixed"):
            for channels_last, compile in ((False, False), (True, False), (True, True)):
                row = {"backbone": backbone, "precision": precision, "channels_last": channels_last,
                       "compile": compile, "train_img_s": None, "gpu_utilisation_percent": None}  # fmt: skip
                if torch.cuda.is_available():
                    speed = model_throughput(backbone, batch_size, steps, "cuda", precision, channels_last, compile)
                    row["train_img_s"] = round(speed, 1)
                    try:
                        row["gpu_utilisation_percent"] = torch.cuda.utilization()
                    except (ModuleNotFoundError, RuntimeError):  # pynvml missing
                        pass
                    print(f"GPU {backbone} {precision} channels_last={channels_last} compile={compile}: {speed:.0f}")
                rows.append(row)
    return rows


def throughput_benchmark(
    images: int = 96,
    batch_size: int = 16,
    min_seconds: float = 4.0,
    model_steps: int = 3,
    cache: Path = CACHE,
    out: Path = REPO / "bench" / "results" / "throughput.json",
) -> dict:
    """Time raw decoding against the prepared stream, the data module loaders and the train step; store them.

    Args:
        images: full-resolution images to decode / stream.
        batch_size: batch size of the loaders and of the train step.
        min_seconds: time each loader at least this long.
        model_steps: timed train steps per backbone on the CPU.
        cache: folder for the upsampled PNGs and the prepared chunks (kept between runs).
        out: where the results go.
    """
    cores = os.cpu_count() or 1
    worker_counts = sorted({1, 2, cores})
    csv = full_resolution_csv(cache / f"png{FULL}", images)
    prepared = str(cache / f"prepared{SIZE}")
    started = time.perf_counter()
    prepare(datamodule(csv, cores, batch_size), prepared, SIZE, "bilinear", num_workers=cores)
    prepare_s = time.perf_counter() - started

    loaders, pipelines = [], []
    for workers in worker_counts:
        row = stream_throughput(csv, prepared, workers, batch_size, min_seconds)
        loaders.append(row)
        raw, streamed = row["raw_png_decode_resize_img_s"], row["prepared_stream_img_s"]
        print(f"workers {workers}: decode+resize {raw:8.1f} img/s   prepared stream {streamed:8.1f} img/s   "
              f"x{row['prepared_vs_raw']:.1f} (medians)", flush=True)  # fmt: skip
        (raw, _), (streamed, _) = (
            loader_throughput(datamodule(csv, workers, batch_size, where), min_seconds) for where in (None, prepared)
        )
        pipelines.append({"workers": workers, "raw_img_s": round(raw, 1), "prepared_img_s": round(streamed, 1),
                          "prepared_vs_raw": round(streamed / raw, 2)})  # fmt: skip
        print(f"  + normalise (data module loaders): raw {raw:8.1f}   prepared {streamed:8.1f}   x{streamed / raw:.1f}")

    torch.set_num_threads(cores)
    models = []
    for backbone in ("densenet121", "tf_efficientnet_lite0"):
        speed = model_throughput(backbone, batch_size, model_steps)
        models.append({"backbone": backbone, "device": "cpu", "precision": "32", "train_img_s": round(speed, 2)})
        print(f"{backbone:24s} train step on CPU (fp32, {cores} threads): {speed:8.2f} img/s")

    ratios = [
        {"backbone": m["backbone"], "workers": row["workers"],
         "raw_loader_vs_model": round(row["raw_img_s"] / m["train_img_s"], 2),
         "prepared_loader_vs_model": round(row["prepared_img_s"] / m["train_img_s"], 2)}
        for m in models for row in pipelines
    ]  # fmt: skip
    at_two = next(row for row in loaders if row["workers"] == 2)
    result = {
        "prepared_vs_raw_ratio": at_two["prepared_vs_raw"],
        "prepared_vs_raw_ratio_workers": 2,
        "target_ratio": 10,
        "meets_target": at_two["prepared_vs_raw"] >= 10,
        "images": images,
        "input_px": FULL,
        "train_px": SIZE,
        "batch_size": batch_size,
        "prepare_seconds": round(prepare_s, 1),
        "cpu_count": cores,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "note": "CPU figures measured on a 2-core machine shared with other jobs (under heavy load): compare the "
        "ratios (raw and prepared measured back to back, same loader, pipeline and workers; medians over epochs) "
        "rather than the absolute images/s.",
        "loader_rows": loaders,
        "loader_rows_note": "uint8 224-px images out of each path: (a) read_image + cv2.resize of the 1024-px PNGs "
        "in a DataLoader, (b) LitData StreamingDataLoader over the prepared chunks; same batch size and workers",
        "pipeline_rows": pipelines,
        "pipeline_rows_note": "the data module's evaluation loaders (the above + gray to RGB, normalise to float32, "
        "tensor): the float conversion, the same for both paths, takes a large share of the prepared path's time",
        "model_rows": models,
        "loader_vs_model": ratios,
        "gpu_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_rows": gpu_rows(batch_size, 20),
        "gpu_note": "no GPU on the machine that measured these results (CPU only); run "
        "bench/throughput.py on a GPU machine to fill train_img_s and gpu_utilisation_percent"
        if not torch.cuda.is_available()
        else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"prepared_vs_raw_ratio (2 workers): {result['prepared_vs_raw_ratio']}  ->  {out}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(throughput_benchmark, as_positional=False)
