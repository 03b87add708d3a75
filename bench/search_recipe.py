"""Benchmark: an Optuna random search over the fine-tuning recipe, on validation only.

Runs ``medtransfer search`` (``commands.search.run_search``, the command's own typed function) with
``configs/search/pneumonia_recipe.yaml`` over ``make fit``'s default config: each trial is the full default
(13 epochs, 64 px, seed 0) with drawn phase-2 rates, per-block decay, switch epoch and dropout, scored by its
lowest validation loss (validation AUROC sits at 0.994-0.995 for every good recipe, too close to its ceiling to
rank them), with Optuna's median pruner from epoch 6 on (before that, trials that unfreeze later are behind by
design, not by merit). The test split is never touched. The study and its MLflow parent run
(trials as child runs) live in ``workdir``; ``workdir/best.yaml`` is the winner's full config.

Writes ``bench/results/search_recipe.json``: every trial (state, value, parameters, minutes), the best, and the
shipped default's seed-0 validation loss from ``bench/results/recipes.json`` for reference.

Usage: python bench/search_recipe.py [--n_trials 10] [--workdir /tmp/medtransfer-search-recipe]
(MEDTRANSFER_DATA_DIR: where the .npz is)
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import optuna

from medtransfer.commands.search import run_search
from medtransfer.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
SPACE = REPO / "configs" / "search" / "pneumonia_recipe.yaml"


def default_reference(recipes_json: Path = REPO / "bench" / "results" / "recipes.json") -> dict | None:
    """The shipped default's seed-0 fit in the recipes benchmark: the value a trial has to beat."""
    if not recipes_json.is_file():
        return None
    fits = json.loads(recipes_json.read_text())["fits"]
    return next(({k: f[k] for k in ("best_val_loss", "best_val_auroc", "best_epoch")} for f in fits
                 if f["recipe"] == "discriminative_cosine" and f["seed"] == 0), None)  # fmt: skip


def search_recipe_benchmark(
    n_trials: int = 10,
    seed: int = 0,
    workdir: str = "/tmp/medtransfer-search-recipe",
    out_json: str = str(REPO / "bench" / "results" / "search_recipe.json"),
) -> dict:
    """Run (or resume) the study in ``workdir`` and store its trials.

    Args:
        n_trials: trials drawn (random search, log-uniform over the rates).
        seed: seed of the draws.
        workdir: folder of the study (``optuna.db``), the MLflow store (``mlruns/``) and ``best.yaml``.
        out_json: where the results go.
    """
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    storage = f"sqlite:///{work}/optuna.db"
    start, cwd = time.perf_counter(), os.getcwd()
    os.chdir(work)  # mlruns/ of this benchmark only
    try:
        found = run_search(
            config=CONFIG, space=SPACE, sampler="random", n_trials=n_trials, storage=storage, seed=seed,
            metric="val/loss", direction="minimize", output=work / "best.yaml", pruning_warmup_epochs=6,
            fit_args=["--trainer.enable_progress_bar=false"],
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    study = optuna.load_study(study_name=found.study, storage=storage)
    trials = [
        {
            "trial": t.number,
            "state": t.state.name,
            "val_loss": t.value,
            "last_epoch_reported": max(t.intermediate_values, default=None),
            "params": t.params,
            "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    result = {
        "benchmark": "search_recipe",
        "config": str(CONFIG.relative_to(REPO)),
        "space": str(SPACE.relative_to(REPO)),
        "metric": "lowest val/loss over a trial's epochs (minimize); median pruner",
        "study": found.study,
        "parent_run_id": found.parent_run_id,
        "best": found.best,
        "default_seed0": default_reference(),
        "trials": trials,
        "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    write_text_atomic(out_json, json.dumps(result, indent=2) + "\n")
    print(f"{'trial':>5} {'state':>9} {'val loss':>9} {'min':>5}  params")
    for t in trials:
        value = f"{t['val_loss']:.4f}" if t["val_loss"] is not None else "-"
        params = ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in t["params"].items())
        print(f"{t['trial']:>5} {t['state']:>9} {value:>9} {t['minutes'] or 0:>5.1f}  {params}")
    print(f"default recipe, seed 0: {result['default_seed0']}")
    print(f"wrote {out_json}")
    return result


if __name__ == "__main__":
    from jsonargparse import auto_cli

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    auto_cli(search_recipe_benchmark, as_positional=False)
