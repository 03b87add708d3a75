"""Benchmark: when does transfer learning pay? ImageNet EfficientNet-Lite0 vs the same net from scratch vs
head-only (feature extraction), on PneumoniaMNIST at 64 px, at training fractions from 1 % to 100 %.

Runs ``medtransfer learning-curve`` over the recipes in ``configs/learning_curve/`` (each stacked on
``configs/pneumonia_effnet_lite0.yaml``: 13 epochs, batch 64, best-validation-AUROC checkpoint, tested once
on the official test split), in a work folder with its own MLflow store, once per seed (a parent run each).
Stratified training subsets are nested across fractions for one seed; the seed also sets the training
randomness. Validation and test splits are always whole (524 and 624 images).

Recipes: ``pretrained`` (ImageNet init, fine-tuned exactly as ``make fit``'s default: head 3 epochs, then every
block with discriminative rates, warm-up + cosine, BatchNorm frozen), ``two_phase`` (the CheXNet-style two
phases: head at 1e-3, then all at 1e-5, constant, BatchNorm frozen), ``finetune_all`` (ImageNet init, every
layer at 1e-3 from epoch 0, BatchNorm training: the recipe of ``scratch`` but for the initialisation),
``scratch`` (random init, all at 1e-3) and ``head_only`` (frozen ImageNet backbone, head at 1e-3).

Steps: an epoch draws at least ``min_epoch_samples`` (1024, i.e. 16 batches) training images, cycling through
a small subset in fresh permutations, so each fit takes at least 13 x 16 = 208 optimizer steps and the
two-phase schedule (3 head epochs, then 10 fine-tuning epochs) keeps its meaning at 1 % of the data. From
25 % up an epoch is one pass over the subset (19 and 74 batches).

``--recipes`` fits only some recipes; ``--reuse`` takes the other recipes' fits from an earlier results file
(same fractions and seeds), so a changed default is re-measured without refitting what did not change.

Writes ``bench/results/transfer.json`` (every fit, the per-fraction means over seeds, where each ImageNet recipe
beats scratch) after every seed, and ``docs/images/transfer.png`` (train and validation AUROC vs training images).

Usage: python bench/transfer.py [--seeds '[0, 1]'] [--fractions '[...]'] [--recipes '[pretrained, scratch]']
[--reuse bench/results/transfer.json] [--quick true] [--render_only true]   (MEDTRANSFER_DATA_DIR: the .npz)
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from medtransfer.commands.learning_curve import CurvePoint, plot_learning_curve, run_learning_curve
from medtransfer.files import write_text_atomic
from medtransfer.plots import save_figure

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
RECIPES = {name: REPO / "configs" / "learning_curve" / f"lite0_{name}.yaml" for name in
           ("pretrained", "two_phase", "finetune_all", "scratch", "head_only")}  # fmt: skip
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


STAGES = ("train", "val", "test")


#: The recipes that start from ImageNet weights, each compared with ``scratch``.
IMAGENET = ("pretrained", "two_phase", "finetune_all", "head_only")


def _wins(table: list[dict], recipe: str, stage: str) -> list[float]:
    return [row["fraction"] for row in table if row[f"{recipe}_{stage}"] > row[f"scratch_{stage}"]]


def summarise(points: list[CurvePoint]) -> dict:
    """One row per fraction: each recipe's train/val/test AUROC averaged over seeds (and the seed spread), and
    in how many seeds each ImageNet recipe beat scratch; plus the fractions where the mean favours it."""
    present = {p.config.removeprefix("lite0_") for p in points}
    recipes = [r for r in RECIPES if r in present] + sorted(present - set(RECIPES))
    seeds = sorted({p.seed for p in points})
    table = []
    for fraction in sorted({p.fraction for p in points}):
        mine = [p for p in points if p.fraction == fraction]
        row = {"fraction": fraction, "train_images": mine[0].train_images, "seeds": seeds}
        for recipe in recipes:
            fits = [p for p in mine if p.config.removeprefix("lite0_") == recipe]
            for stage in STAGES:
                values = [getattr(p, f"{stage}_metric") for p in fits]
                row[f"{recipe}_{stage}"] = round(statistics.fmean(values), 4) if values else math.nan
                row[f"{recipe}_{stage}_spread"] = round(max(values) - min(values), 4) if values else math.nan
        by_seed = {(p.config.removeprefix("lite0_"), p.seed): p for p in mine}
        for recipe in (r for r in IMAGENET if r in recipes and "scratch" in recipes):
            for stage in ("val", "test"):
                row[f"{recipe}_beats_scratch_{stage}_seeds"] = sum(
                    getattr(by_seed[(recipe, seed)], f"{stage}_metric")
                    > getattr(by_seed[("scratch", seed)], f"{stage}_metric")
                    for seed in seeds
                    if (recipe, seed) in by_seed and ("scratch", seed) in by_seed
                )
        table.append(row)
    beats = {
        f"{recipe}_beats_scratch_{stage}": _wins(table, recipe, stage)
        for recipe in IMAGENET
        if recipe in recipes and "scratch" in recipes
        for stage in ("val", "test")
    }
    return {"recipes_in_table": recipes, "table": table, **beats}


def print_table(summary: dict) -> None:
    recipes = summary["recipes_in_table"]
    width = 13 * len(recipes) - 1
    print(f"mean AUROC over seeds {summary['table'][0]['seeds']}")
    print(f"{'fraction':>8} {'images':>6} | {'val':^{width}} | {'test':^{width}}")
    header = " ".join(f"{r:>12}" for r in recipes)
    print(f"{'':>8} {'':>6} | {header} | {header}")
    for row in summary["table"]:
        cells = " | ".join(" ".join(f"{row[f'{r}_{s}']:>12.4f}" for r in recipes) for s in ("val", "test"))
        print(f"{row['fraction']:>8g} {row['train_images']:>6} | {cells}")
    for key in (k for k in summary if k.endswith(("_beats_scratch_val", "_beats_scratch_test"))):
        print(f"{key} (mean over seeds) at fractions: {summary[key]}")


def markdown_table(summary: dict) -> str:
    """The table in docs/experiments.md: one row per fraction, mean val and test AUROC of each recipe (best in
    bold), and in how many seeds ``pretrained`` (the default recipe) beat scratch on validation and on test."""
    recipes = summary["recipes_in_table"]
    seeds = len(summary["table"][0]["seeds"])
    names = [r.replace("_", " ") for r in recipes]
    lines = [
        "| fraction | train images | " + " | ".join(f"{s}: {n}" for s in ("val", "test") for n in names)
        + f" | pretrained > scratch, seeds of {seeds}: val / test |",
        "|---|---|" + "---|" * (2 * len(recipes) + 1),
    ]  # fmt: skip
    for row in summary["table"]:
        cells = []
        for stage in ("val", "test"):
            values = [row[f"{r}_{stage}"] for r in recipes]
            cells += [f"**{v:.3f}**" if v == max(values) else f"{v:.3f}" for v in values]
        wins = " / ".join(str(row.get(f"pretrained_beats_scratch_{stage}_seeds", "")) for stage in ("val", "test"))
        lines.append(f"| {row['fraction']:g} | {row['train_images']} | " + " | ".join(cells) + f" | {wins} |")
    return "\n".join(lines)


def transfer_benchmark(
    quick: bool = False,
    render_only: bool = False,
    fractions: list[float] | None = None,
    seeds: list[int] = [0, 1],  # noqa: B006 (jsonargparse shows the default)
    recipes: list[str] | None = None,
    reuse: str | None = None,
    workdir: str = "/tmp/medtransfer-transfer-bench",
    out_json: str = str(REPO / "bench" / "results" / "transfer.json"),
    out_png: str = str(REPO / "docs" / "images" / "transfer.png"),
) -> dict:
    """Run the learning curves, seed after seed, and store the table and the plot.

    Args:
        quick: a smoke run (2 fractions, one seed, 2 epochs at 32 px, a few batches); writes ``*_quick`` outputs.
        render_only: fit nothing; print the table of an existing ``out_json`` (and its markdown).
        fractions: training fractions to fit (default: 1, 2, 5, 10, 25 and 100 %).
        seeds: one learning curve (a parent MLflow run) per seed; results are written after each.
        recipes: the recipes to fit (default: all of ``RECIPES``).
        reuse: an earlier results file whose fits of the recipes *not* fitted now are kept in the table.
        workdir: folder for the MLflow store (``mlruns/``) and the learning-curve CSV/PNG; kept for inspection.
        out_json: where the results go.
        out_png: where the plot goes.
    """
    if quick:
        out_json, out_png = (str(Path(p).with_stem(Path(p).stem + "_quick")) for p in (out_json, out_png))
        seeds = seeds[:1]
    if render_only:
        result = json.loads(Path(out_json).read_text())
        print_table(result)
        print(markdown_table(result))
        return result
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    fit_args = QUICK_ARGS if quick else FULL_ARGS
    chosen = {name: RECIPES[name] for name in (recipes or RECIPES)}
    kept = reused_fits(reuse, exclude=chosen, seeds=seeds) if reuse else []
    start, cwd = time.perf_counter(), os.getcwd()
    points: list[CurvePoint] = []
    os.chdir(work)  # mlruns/ of this benchmark only
    try:
        for seed in seeds:
            points += run_learning_curve(
                configs=[str(p) for p in chosen.values()],
                fractions=QUICK_FRACTIONS if quick else (fractions or FRACTIONS),
                seeds=[seed],
                metric="auroc",
                output_dir=str(work / f"curve-seed{seed}"),
                base_config=str(BASE),
                fit_args=fit_args,
            ).points
            result = _store(points, kept, quick, fit_args, time.perf_counter() - start, out_json, out_png)
    finally:
        os.chdir(cwd)
    print_table(result)
    print(markdown_table(result))
    print(f"wrote {out_json} and {out_png} ({result['seconds']:.0f} s)")
    return result


def reused_fits(path: str, exclude: dict[str, Path], seeds: list[int]) -> list[CurvePoint]:
    """The fits in an earlier results file of recipes other than ``exclude``, for the given seeds."""
    fits = json.loads(Path(path).read_text())["fits"]
    return [
        CurvePoint(**fit)
        for fit in fits
        if fit["config"].removeprefix("lite0_") not in exclude and fit["seed"] in seeds
    ]


def _store(points: list[CurvePoint], kept: list[CurvePoint], quick: bool, fit_args: list[str], seconds: float,
           out_json: str, out_png: str) -> dict:  # fmt: skip
    fitted = sorted({p.config.removeprefix("lite0_") for p in points})
    points = points + kept
    result = {
        "quick": quick,
        "dataset": "pneumoniamnist (train 4690 / val 524 / test 624), 64 px" + (" (32 px in quick)" if quick else ""),
        "recipes": {name: str(path.relative_to(REPO)) for name, path in RECIPES.items()},
        "fitted_in_this_run": fitted,
        "reused_from_an_earlier_run": sorted({p.config.removeprefix("lite0_") for p in kept}),
        "base_config": str(BASE.relative_to(REPO)),
        "fit_args": fit_args,
        "metric": "AUROC; val = best epoch (the kept checkpoint), test = that checkpoint on the test split; "
        "table values are means over seeds, *_spread max - min",
        **summarise(points),
        "fits": [p.__dict__ for p in points],
        "seconds": round(seconds, 1),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    write_text_atomic(out_json, json.dumps(result, indent=2) + "\n")
    save_figure(plot_learning_curve(points, "auroc"), out_png)
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(transfer_benchmark, as_positional=False)
