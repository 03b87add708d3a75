"""Benchmark: fine-tuning recipes on full PneumoniaMNIST at 64 px, several seeds each.

Each recipe in ``configs/recipes/`` is stacked on the shipped default (``configs/pneumonia_effnet_lite0.yaml``:
ImageNet EfficientNet-Lite0, 13 epochs, batch 64, checkpoint by validation AUROC, tested once on the official
test split) and fitted once per seed through ``build_cli`` (the fit command's own typed entry point). Recorded per
fit: best validation AUROC and lowest validation loss, test AUROC, test accuracy at 0.5 and at the
validation-fitted threshold, and CPU minutes (process CPU time / 60, and wall minutes).

The recipe is chosen on validation only; the test columns are reported, never used to choose.

All fits share one MLflow store in a temporary work folder (printed), so they can be compared in the UI.
Writes ``bench/results/recipes.json`` (every fit, then mean +/- sd per recipe) after every fit, so an interrupted
run keeps what it finished, and prints a table.

Usage: python bench/recipes.py [--recipes '[two_phase, discriminative_cosine]'] [--seeds '[0, 1, 2]']
       [--tta_for '[discriminative_cosine]']
       [--append true] [--quick true]   (a smoke run of the same code path in a few minutes; numbers meaningless)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medtransfer.commands.fit import build_cli
from medtransfer.files import write_text_atomic
from medtransfer.tracking.callbacks import find_mlflow_logger

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
RECIPE_DIR = REPO / "configs" / "recipes"
QUICK_ARGS = [
    "--trainer.max_epochs=2",
    "--finetuning.unfreeze_at_epoch=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=3",
    "--trainer.limit_test_batches=3",
    "--data.init_args.image_size=32",
]


def fit_recipe(recipe: str, seed: int, workdir: Path, quick: bool) -> tuple[dict, object]:
    """One fit + test of ``recipe`` at ``seed`` in ``workdir``; the figures the table in docs/recipes.md needs."""
    args = ["fit", f"--config={BASE}", f"--config={RECIPE_DIR / f'{recipe}.yaml'}", f"--seed_everything={seed}"]
    args += ["--trainer.enable_progress_bar=false", *(QUICK_ARGS if quick else [])]
    cwd, wall, cpu = Path.cwd(), time.perf_counter(), time.process_time()
    os.chdir(workdir)
    try:
        cli = build_cli(args)
    finally:
        os.chdir(cwd)
    checkpoint = cli.trainer.checkpoint_callback
    best = torch.load(workdir / checkpoint.best_model_path, map_location="cpu", weights_only=True)
    outputs = cli.model.test_outputs
    probs, targets = outputs["probs"], outputs["targets"]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    record = {
        "recipe": recipe,
        "seed": seed,
        "best_val_auroc": float(checkpoint.best_model_score),
        "best_val_loss": _lowest(cli, "val/loss"),
        "best_epoch": int(best["epoch"]),
        "test_auroc": metrics.get("test/auroc"),
        "test_acc_at_0_5": float(((probs >= 0.5).long() == targets).float().mean()),
        "test_acc_at_val_threshold": metrics.get("test/acc"),
        "threshold": float(best["state_dict"]["decision_threshold"]),
        "cpu_minutes": (time.process_time() - cpu) / 60,
        "wall_minutes": (time.perf_counter() - wall) / 60,
    }
    return record, cli


def test_with_tta(cli, record: dict, workdir: Path) -> dict:
    """The same fit's best checkpoint tested again with test-time augmentation (7 views, ``shift_scale``): the
    ``<recipe>_tta`` row, measured on the very weights of ``<recipe>`` so the two differ only by TTA (the recipe
    file ``configs/recipes/discriminative_cosine_tta.yaml`` is that combination, for users to name)."""
    wall, cpu, cwd = time.perf_counter(), time.process_time(), Path.cwd()
    cli.model.hparams["test_time_augmentation"] = "shift_scale"
    os.chdir(workdir)  # the checkpoint path is relative to the fit's folder
    try:
        best = cli.trainer.checkpoint_callback.best_model_path
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best)
    finally:
        os.chdir(cwd)
    outputs = cli.model.test_outputs
    probs, targets = outputs["probs"], outputs["targets"]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return record | {
        "recipe": f"{record['recipe']}_tta",
        "test_auroc": metrics.get("test/auroc"),
        "test_acc_at_0_5": float(((probs >= 0.5).long() == targets).float().mean()),
        "test_acc_at_val_threshold": metrics.get("test/acc"),
        "cpu_minutes": record["cpu_minutes"] + (time.process_time() - cpu) / 60,
        "wall_minutes": record["wall_minutes"] + (time.perf_counter() - wall) / 60,
    }


def _lowest(cli, key: str) -> float | None:
    """The lowest value of ``key`` over the fit's epochs, from its MLflow run."""
    from mlflow.tracking import MlflowClient

    logger = find_mlflow_logger(cli.trainer)
    history = MlflowClient(logger.tracking_uri).get_metric_history(logger.run_id, key)
    return min((m.value for m in history), default=None)


def summarise(fits: list[dict]) -> dict[str, dict]:
    """Mean and sd over seeds of every figure, per recipe."""
    keys = (
        "best_val_auroc",
        "best_val_loss",
        "test_auroc",
        "test_acc_at_0_5",
        "test_acc_at_val_threshold",
        "cpu_minutes",
        "wall_minutes",
    )
    summary: dict[str, dict] = {}
    for recipe in dict.fromkeys(f["recipe"] for f in fits):
        rows = [f for f in fits if f["recipe"] == recipe]
        summary[recipe] = {"seeds": len(rows)}
        for key in keys:
            values = [r[key] for r in rows if r[key] is not None]
            summary[recipe][key] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    return summary


def print_table(summary: dict[str, dict]) -> None:
    head = (
        f"{'recipe':<28} {'seeds':>5} {'val AUROC':>15} {'test AUROC':>15} {'ACC@0.5':>15} {'ACC@thr':>15}"
        f" {'CPU min':>8} {'wall min':>8}"
    )
    print(head)
    for recipe, row in summary.items():
        cells = [
            f"{row[k]['mean']:.4f}±{row[k]['sd']:.4f}" if row[k]["mean"] is not None else "-"
            for k in ("best_val_auroc", "test_auroc", "test_acc_at_0_5", "test_acc_at_val_threshold")
        ]
        minutes = f"{row['cpu_minutes']['mean']:>8.1f} {row['wall_minutes']['mean']:>8.1f}"
        print(f"{recipe:<28} {row['seeds']:>5} " + " ".join(f"{c:>15}" for c in cells) + f" {minutes}")


def recipes_benchmark(
    recipes: list[str] = ["two_phase", "discriminative_cosine"],  # noqa: B006
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    tta_for: list[str] = ["discriminative_cosine"],  # noqa: B006
    quick: bool = False,
    out_json: str = "bench/results/recipes.json",
    append: bool = False,
) -> dict:
    """Fit every recipe at every seed, writing the JSON after each fit; the recipes in ``tta_for`` are also
    tested with test-time augmentation (a ``<recipe>_tta`` row from the same fit). ``append``: add to the fits
    already in ``out_json`` (another recipe measured later) instead of starting afresh."""
    out_path = REPO / out_json
    fits: list[dict] = json.loads(out_path.read_text())["fits"] if append and out_path.exists() else []
    workdir = Path(tempfile.mkdtemp(prefix="recipes-"))  # one MLflow store: every fit comparable in the UI
    out = REPO / out_json if quick is False else workdir / "recipes.json"
    print(f"Runs go to {workdir}/mlruns (make ui there to compare them)")
    for seed in seeds:  # seed-major: an interrupted run still compares every recipe on the same seeds
        for recipe in recipes:
            record, cli = fit_recipe(recipe, seed, workdir, quick)
            fits.append(record)
            if recipe in tta_for:
                fits.append(test_with_tta(cli, record, workdir))
            result = {
                "benchmark": "recipes",
                "quick": quick,
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                "fits": fits,
                "summary": summarise(fits),
            }
            write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print_table(result["summary"])
    print(f"Wrote {out}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(recipes_benchmark)
