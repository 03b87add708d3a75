"""Is batch inference as fast as the model, and is its memory flat?

1. Throughput at 224x224 on CPU: ``medtransfer predict`` (PNG decode, resize, normalise, forward, decision, CSV
   row) against a bare timm forward loop over the same images already decoded and normalised in memory, in one
   run, interleaved A B A B and reported as medians. Target: ratio >= 0.9.
2. Peak RSS of ``medtransfer predict`` (a fresh process each) over 1k vs 20k generated PNGs. Target: < 10 %
   apart, because rows are streamed to disk, never collected. Measured at 64 px, so 20k images take seconds,
   not minutes: the memory question is about the number of images, not their size.

Images are PneumoniaMNIST test images written as PNG (real X-rays; repeated to reach the count).
Usage: python bench/predict.py [--images 192] [--repeats 3] [--rss_counts '[1000, 20000]']
       [--out bench/results/predict.json]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from medtransfer.commands.predict import run_predict
from medtransfer.data.readers import read_image
from medtransfer.data.transforms import build_eval_transform
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_DATA_DIR") or REPO.parent / "shared" / "data")
BATCH = 32


def write_pngs(folder: Path, count: int) -> list[Path]:
    """``count`` real X-ray PNGs (28x28 PneumoniaMNIST test images, cycled)."""
    with np.load(DATA / "pneumoniamnist.npz") as data:
        images = data["test_images"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i // 1000:03d}" / f"img{i:06d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(path)
        paths.append(path)
    return paths


def write_checkpoint(path: Path, size: int) -> None:
    """A medtransfer checkpoint of EfficientNet-Lite0 (offline ImageNet weights) for ``size`` px input."""
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="lite0-package")
    spec = model.input_spec
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**dict(model.hparams), "pretrained": "none"},
            "pytorch-lightning_version": "2.6.0",
            "class_names": ["normal", "pneumonia"],
            "input": {
                "size": size,
                "mean": list(spec.mean),
                "std": list(spec.std),
                "interpolation": "bilinear",
                "channels": 3,
            },
        },
        path,
    )


def bare_loop(paths: list[Path], size: int) -> float:
    """Images/s of a plain timm forward over the same images, decoded and normalised beforehand."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1).eval()
    config = timm.data.resolve_model_data_config(model)
    transform = build_eval_transform(size, 3, config["mean"], config["std"], "bilinear")
    tensors = torch.stack([transform(image=read_image(p))["image"] for p in paths])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), BATCH):
            model(tensors[i : i + BATCH]).sigmoid()
    return len(tensors) / (time.perf_counter() - start)


def predict_throughput(folder: Path, checkpoint: Path, out: Path) -> float:
    result = run_predict(str(folder), str(checkpoint), output=out, batch_size=BATCH)
    return result.images_per_second


def peak_rss_mb(folder: Path, checkpoint: Path, out: Path) -> float:
    """Peak resident memory of a fresh ``medtransfer predict`` process over ``folder``."""
    code = (
        "import resource, sys; from medtransfer.commands.predict import run_predict; "
        f"run_predict({str(folder)!r}, {str(checkpoint)!r}, output={str(out)!r}, batch_size={BATCH}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def predict_benchmark(
    images: int = 192,
    repeats: int = 3,
    rss_counts: tuple[int, int] = (1000, 20000),
    out: Path = REPO / "bench" / "results" / "predict.json",
) -> dict:
    """Compare ``medtransfer predict`` with a bare timm loop, measure its peak RSS at two image counts, store both.

    Args:
        images: images per throughput measurement.
        repeats: interleaved A/B throughput runs (the medians are reported).
        rss_counts: the two image counts (small, large) whose peak RSS is compared.
        out: where the results go.
    """
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_pngs(tmp / "speed", images)
        write_checkpoint(tmp / "model224.ckpt", 224)
        write_checkpoint(tmp / "model64.ckpt", 64)
        bare, ours = [], []
        for _ in range(repeats):  # interleaved, so background load hits both alike
            bare.append(bare_loop(paths, 224))
            ours.append(predict_throughput(tmp / "speed", tmp / "model224.ckpt", tmp / "out.csv"))
        small, large = rss_counts
        write_pngs(tmp / "large", large)
        write_pngs(tmp / "small", small)
        rss = {n: peak_rss_mb(tmp / name, tmp / "model64.ckpt", tmp / f"rss{n}.csv")
               for n, name in ((small, "small"), (large, "large"))}  # fmt: skip
    bare_ips, ours_ips = statistics.median(bare), statistics.median(ours)
    result = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "image_size": 224, "batch_size": BATCH,
        "images": images, "bare_timm_images_per_s": bare_ips, "predict_images_per_s": ours_ips,
        "ratio": ours_ips / bare_ips, "peak_rss_mb": {str(k): v for k, v in rss.items()},
        "rss_difference": abs(rss[large] - rss[small]) / rss[small],
    }  # fmt: skip
    print(f"{'measure':<40}{'value':>12}")
    print(f"{'bare timm loop, 224 px (img/s)':<40}{bare_ips:>12.1f}")
    print(f"{'medtransfer predict, 224 px (img/s)':<40}{ours_ips:>12.1f}")
    print(f"{'ratio (target >= 0.9)':<40}{result['ratio']:>12.3f}")
    for n, mb in rss.items():
        print(f"{f'peak RSS, {n} images, 64 px (MB)':<40}{mb:>12.0f}")
    print(f"{'RSS difference (target < 10 %)':<40}{result['rss_difference']:>12.1%}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(predict_benchmark, as_positional=False)
