"""Benchmark: when does transfer learning pay? ImageNet EfficientNet-Lite0 vs the same net from scratch vs
head-only (feature extraction), on PneumoniaMNIST at 64 px, at training fractions from 1 % to 100 %.

Runs ``medtransfer learning-curve`` over the three recipes in ``configs/learning_curve/`` (each stacked on
``configs/pneumonia_effnet_lite0.yaml``: 13 epochs, batch 64, best-validation-AUROC checkpoint, tested once
on the official test split), in a work folder with its own MLflow store. Stratified training subsets are
nested across fractions (seed 0). Validation and test splits are always whole (524 and 624 images).

Steps: an epoch draws at least ``min_epoch_samples`` (1024, i.e. 16 batches) training images, cycling through
a small subset in fresh permutations, so each fit takes at least 13 x 16 = 208 optimizer steps and the
two-phase schedule (3 head epochs, then 10 fine-tuning epochs) keeps its meaning at 1 % of the data. From
25 % up an epoch is one pass over the subset (19 and 74 batches).

Writes ``bench/results/transfer.json`` (every fit, the comparison, the fractions where pretrained beats
scratch) and ``docs/images/transfer.png`` (train and validation AUROC vs training images).

Usage: python bench/transfer.py [--quick true] [--workdir DIR] [--render_only true]
(MEDTRANSFER_DATA_DIR: where the .npz is)
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

from medtransfer.files import write_text_atomic
from medtransfer.learning_curve import CurvePoint, learning_curve

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
RECIPES = {name: REPO / "configs" / "learning_curve" / f"{name}.yaml" for name in
           ("lite0_pretrained", "lite0_scratch", "lite0_head_only")}  # fmt: skip
FRACTIONS = [0.01, 0.02, 0.05, 0.1, 0.25, 1.0]
FULL_ARGS = ["--trainer.enable_progress_bar=false", "--data.init_args.min_epoch_samples=1024"]
#: ``--quick``: a smoke run of the same code path in a few minutes (numbers meaningless).
QUICK_FRACTIONS = [0.02, 0.1]
QUICK_ARGS = [
    "--trainer.enable_progress_bar=false",
    "--trainer.max_epochs=2",
    "--finetuning.unfreeze_at_epoch=1",
    "--trainer.limit_val_batches=3",
    "--trainer.limit_test_batches=3",
    "--data.init_args.image_size=32",
    "--data.init_args.min_epoch_samples=128",
]


def _wins(table: list[dict], stage: str) -> list[float]:
    return [row["fraction"] for row in table if row[f"pretrained_{stage}"] > row[f"scratch_{stage}"]]


def summarise(points: list[CurvePoint]) -> dict:
    """One row per fraction with each recipe's val/test AUROC, and where pretrained beats scratch."""
    by = {(p.config.removeprefix("lite0_"), p.fraction): p for p in points}
    table = []
    for fraction in sorted({p.fraction for p in points}):
        row = {"fraction": fraction, "train_images": by[("pretrained", fraction)].train_images}
        for recipe in ("pretrained", "scratch", "head_only"):
            point = by.get((recipe, fraction))
            for stage in ("train", "val", "test"):
                value = getattr(point, f"{stage}_metric") if point else math.nan
                row[f"{recipe}_{stage}"] = round(value, 4)
        table.append(row)
    wins_val, wins_test = _wins(table, "val"), _wins(table, "test")
    return {
        "table": table,
        "pretrained_beats_scratch_val": wins_val,
        "pretrained_beats_scratch_test": wins_test,
        "smallest_fraction_pretrained_beats_scratch_val": min(wins_val, default=None),
        "smallest_fraction_pretrained_beats_scratch_test": min(wins_test, default=None),
        "largest_fraction_pretrained_beats_scratch_val": max(wins_val, default=None),
        "largest_fraction_pretrained_beats_scratch_test": max(wins_test, default=None),
    }


def print_table(summary: dict) -> None:
    print(f"{'fraction':>8} {'images':>6} | {'val AUROC':^26} | {'test AUROC':^26}")
    print(f"{'':>8} {'':>6} | {'pretrain':>8} {'scratch':>8} {'head':>8} | {'pretrain':>8} {'scratch':>8} {'head':>8}")
    for row in summary["table"]:
        cells = [row[f"{r}_{s}"] for s in ("val", "test") for r in ("pretrained", "scratch", "head_only")]
        print(f"{row['fraction']:>8g} {row['train_images']:>6} | " + " ".join(f"{c:>8.4f}" for c in cells[:3])
              + " | " + " ".join(f"{c:>8.4f}" for c in cells[3:]))  # fmt: skip
    for stage in ("val", "test"):
        print(f"pretrained beats scratch on {stage} at fractions: {summary[f'pretrained_beats_scratch_{stage}']}")


def markdown_table(summary: dict) -> str:
    """The README table: one row per fraction, val and test AUROC of the three recipes."""
    lines = [
        "| fraction | train images | val: pretrained | val: scratch | val: head-only "
        "| test: pretrained | test: scratch | test: head-only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        cells = []
        for stage in ("val", "test"):
            values = {r: row[f"{r}_{stage}"] for r in ("pretrained", "scratch", "head_only")}
            best = max(values.values())
            cells += [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in values.values()]
        lines.append(f"| {row['fraction']:g} | {row['train_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_benchmark(
    quick: bool = False,
    render_only: bool = False,
    fractions: list[float] | None = None,
    workdir: str = "/tmp/medtransfer-transfer-bench",
    out_json: str = str(REPO / "bench" / "results" / "transfer.json"),
    out_png: str = str(REPO / "docs" / "images" / "transfer.png"),
) -> dict:
    """Run the three learning curves and store the table and the plot.

    Args:
        quick: a smoke run (2 fractions, 2 epochs at 32 px, a few batches); it writes ``*_quick`` outputs.
        render_only: fit nothing; print the table of an existing ``out_json`` (and its README markdown).
        fractions: training fractions to fit (default: 1, 2, 5, 10, 25 and 100 %).
        workdir: folder for the MLflow store (``mlruns/``) and the learning-curve CSV/PNG; kept for inspection.
        out_json: where the results go.
        out_png: where the plot goes.
    """
    if quick:
        out_json, out_png = (str(Path(p).with_stem(Path(p).stem + "_quick")) for p in (out_json, out_png))
    if render_only:
        result = json.loads(Path(out_json).read_text())
        print_table(result)
        print(markdown_table(result))
        return result
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    fit_args = QUICK_ARGS if quick else FULL_ARGS
    start, cwd = time.perf_counter(), os.getcwd()
    os.chdir(work)  # mlruns/ of this benchmark only
    try:
        points = learning_curve(
            configs=[str(p) for p in RECIPES.values()],
            fractions=QUICK_FRACTIONS if quick else (fractions or FRACTIONS),
            seeds=[0],
            metric="auroc",
            output_dir=str(work / "curve"),
            base_config=str(BASE),
            fit_args=fit_args,
        )
    finally:
        os.chdir(cwd)
    summary = summarise(points)
    result = {
        "quick": quick,
        "dataset": "pneumoniamnist (train 4690 / val 524 / test 624), 64 px" + (" (32 px in quick)" if quick else ""),
        "recipes": {name: str(path.relative_to(REPO)) for name, path in RECIPES.items()},
        "base_config": str(BASE.relative_to(REPO)),
        "fit_args": fit_args,
        "metric": "AUROC; val = best epoch (the kept checkpoint), test = that checkpoint on the test split",
        **summary,
        "fits": [p.__dict__ for p in points],
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    write_text_atomic(out_json, json.dumps(result, indent=2) + "\n")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "curve" / "learning_curve.png", out_png)
    print_table(summary)
    print(markdown_table(summary))
    print(f"wrote {out_json} and {out_png} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(transfer_benchmark, as_positional=False)
