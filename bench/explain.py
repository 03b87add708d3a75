"""Do the heatmaps point at the finding? Pointing game of every explanation method on planted lesions.

Builds a planted-lesion set from the shared PneumoniaMNIST *normal* X-rays (official splits kept): each image is
upsampled to 128 px, half of them get a bright Gaussian blob (sigma 4 % of the side; its box, +-2 sigma, covers
2.6 % of the image) at a random place, and a CSV lists path, label, split and the box (``x_min..y_max``). The
default recipe (configs/pneumonia_effnet_lite0.yaml: pretrained Lite0, two phases) is trained on it through
the CSV source at 64 px and at 128 px, then ``medtransfer explain-eval`` scores each method and stage on the
test split's true positives: pointing-game hit rate, mean IoU of the thresholded map, and the random-point rate.

The set is all 1,582 normals (1,213 train / 135 val / 234 test); each fit is the shipped recipe, 13 epochs
(``--epochs`` shortens it, unfreezing at a quarter). Writes bench/results/explain.json.

Usage: python bench/explain.py [--sizes '[64, 128]'] [--epochs 13] [--out bench/results/explain.json]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.nn import functional as nnf

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_DATA_DIR", REPO.parent / "shared" / "data"))
SIDE = 128  # px of the written images; the models resize them to 64 or 128
SIGMA = 0.04  # of the side: the blob's width; its box is +-2 sigma
AMPLITUDE = 0.5  # added brightness at the blob's centre, images in [0, 1]


def planted_set(folder: Path, npz: Path, seed: int = 0, train_images: int | None = None) -> Path:
    """PNG images and a CSV (path, label, split, x_min, y_min, x_max, y_max) of the planted-lesion set."""
    data = np.load(npz)
    rng = np.random.default_rng(seed)
    rows = ["path,label,split,x_min,y_min,x_max,y_max"]
    sigma = SIGMA * SIDE
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    for split in ("train", "val", "test"):
        normal = data[f"{split}_images"][data[f"{split}_labels"][:, 0] == 0]
        normal = normal[:train_images] if split == "train" and train_images else normal
        images = torch.as_tensor(normal, dtype=torch.float32)[:, None] / 255
        images = nnf.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[:, 0].numpy()
        for i, image in enumerate(images):
            positive = i % 2 == 0
            box = ""
            if positive:
                cy, cx = rng.uniform(2 * sigma, SIDE - 2 * sigma, size=2)
                image = image + AMPLITUDE * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
                box = f"{cx - 2 * sigma:.2f},{cy - 2 * sigma:.2f},{cx + 2 * sigma:.2f},{cy + 2 * sigma:.2f}"
            name = f"{split}/{i:04d}.png"
            (folder / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).save(folder / name)
            rows.append(f"{name},{int(positive)},{split},{box or ',,,'}")
    csv = folder / "lesions.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def fit(csv: Path, size: int, epochs: int, scratch: Path) -> tuple[Path, dict]:
    """Train the default recipe on the CSV (boxes not given to the source: it would crop to them)."""
    config = yaml.safe_load((REPO / "configs" / "pneumonia_effnet_lite0.yaml").read_text())
    shipped = config["data"]["init_args"]
    config["data"] = {
        "class_path": "medtransfer.data.images.ImageDataModule",
        "init_args": {
            "source": {
                "class_path": "medtransfer.data.images.CsvSource",
                "init_args": {"csv_path": str(csv), "label_columns": ["label"], "split_column": "split"},
            },
            "cache": True,
            **{k: v for k, v in shipped.items() if k != "flag"},
            "image_size": size,
        },
    }
    config["trainer"]["max_epochs"] = epochs
    config["finetuning"]["unfreeze_at_epoch"] = min(config["finetuning"]["unfreeze_at_epoch"], max(1, epochs // 4))
    run_dir = scratch / f"fit{size}"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    command = [sys.executable, "-m", "medtransfer.commands.fit", "fit", "--config=config.yaml"]
    start = time.perf_counter()
    subprocess.run([*command, "--trainer.enable_progress_bar=false"], cwd=run_dir, env=env, check=True)
    seconds = time.perf_counter() - start
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("medtransfer").experiment_id])
    best = Path(run.data.tags["best_checkpoint"]) if "best_checkpoint" in run.data.tags else None
    if best is None or not best.is_file():
        best = next(p for p in sorted(run_dir.rglob("*.ckpt")) if p.name != "last.ckpt")
    metrics = run.data.metrics
    return best, {"fit_seconds": round(seconds, 1), "test_auroc": round(metrics.get("test/auroc", float("nan")), 4)}


def explain_benchmark(
    sizes: list[int] = [64, 128],  # noqa: B006 (jsonargparse shows the default)
    epochs: int = 13,
    train_images: int | None = None,
    lesions: Path | None = None,
    checkpoint: Path | None = None,
    out: Path = REPO / "bench" / "results" / "explain.json",
) -> dict:
    """Fit the default recipe on the planted-lesion set at each size and score every method and stage.

    Args:
        sizes: input sizes to fit (px).
        epochs: epochs of each fit (the shipped config's 13 by default).
        train_images: use only the first N train normals.
        lesions: reuse a planted set written by an earlier run (its folder).
        checkpoint: score this checkpoint (of ``sizes``' one size), no fit.
        out: where the results go.
    """
    from medtransfer.commands.explain_eval import run_explain_eval

    results = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "epochs": epochs, "sizes": {}}
    results["train_images"] = train_images or "all"
    with tempfile.TemporaryDirectory(prefix="medtransfer-explain-") as scratch:
        scratch = Path(scratch)
        given = lesions is not None
        lesions = lesions or scratch / "lesions"
        csv = lesions / "lesions.csv" if given else planted_set(lesions, DATA / "pneumoniamnist.npz", 0, train_images)
        test = lesions / "test.csv"
        lines = csv.read_text().splitlines()
        test.write_text("\n".join([lines[0], *(line for line in lines[1:] if ",test," in line)]) + "\n")
        for size in sizes:
            if checkpoint:  # e.g. the best checkpoint of a fit cut short
                scored, fitted = checkpoint, {"checkpoint": checkpoint.name}
            else:
                scored, fitted = fit(csv, size, epochs, scratch)
            start = time.perf_counter()
            table = run_explain_eval(
                str(test),
                str(scored),
                methods=["gradcam", "layercam", "fusion"],
                layers=[-1, -2, -3],
                output=scratch / f"explain{size}.json",
                tracking_uri=f"sqlite:///{scratch}/explain.db",
            ).scores
            table += run_explain_eval(
                str(test),
                str(scored),
                methods=["occlusion"],
                output=scratch / f"occlusion{size}.json",
                tracking_uri=f"sqlite:///{scratch}/explain.db",
            ).scores
            fitted["explain_seconds"] = round(time.perf_counter() - start, 1)
            results["sizes"][str(size)] = {**fitted, "methods": table}
            out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a later failure
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(explain_benchmark, as_positional=False)
