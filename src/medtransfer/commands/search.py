"""``medtransfer search``: Optuna grid or random search over ``fit`` options, tracked in MLflow.

``medtransfer search --config configs/pneumonia_effnet_lite0.yaml --space configs/search/pneumonia_lr.yaml
--sampler random --n_trials 8 --workers 2 -- --trainer.max_epochs=4``

Every trial is a ``fit`` of the base config plus the trial's values, an MLflow child run of one parent run per
study (:mod:`medtransfer.commands.sweep`), scored on validation only. The study lives in an Optuna RDB storage
that other processes and nodes can share. The best trial's full config is written to ``--output``, ready for
``medtransfer fit --config``, and logged to the parent run with the trials table and a history plot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medtransfer.tracking.redaction import redact

__all__ = ["SearchResult", "run_search"]


@dataclass(frozen=True)
class SearchResult:
    """What :func:`run_search` did: the study, trials per state, the best trial and the MLflow parent run."""

    study: str
    ran: int
    storage: str = ""
    trials: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    parent_run_id: str | None = None
    output: str | None = None
    unfinished: int = 0
    ui_hint: str | None = None


def run_search(
    config: Path = Path("configs/pneumonia_effnet_lite0.yaml"),
    space: Path = Path("configs/search/pneumonia_lr.yaml"),
    sampler: Literal["grid", "random"] = "random",
    n_trials: int | None = None,
    storage: str = "sqlite:///mlruns/optuna.db",
    study_name: str | None = None,
    metric: str = "val/auroc",
    direction: Literal["maximize", "minimize"] = "maximize",
    pruning: bool = True,
    pruning_startup_trials: int = 2,
    pruning_warmup_epochs: int = 1,
    workers: int = 1,
    seed: int = 0,
    output: Path = Path("best.yaml"),
    fit_args: list[str] | None = None,
    worker_only: bool = False,
) -> SearchResult:
    """Search hyperparameters of a ``fit`` config with Optuna; each trial an MLflow child run.

    Args:
        config: the base ``fit`` config.
        space: YAML search space: ``fit`` option -> ``{type, low, high, log, step, choices, grid}``.
        sampler: ``grid`` (each ``grid:`` combination once) or ``random`` (uniform, or log-uniform with ``log``).
        n_trials: trials in the study (grid: default and maximum the whole grid; random: required).
        storage: Optuna RDB storage URL; processes and nodes given the same one share the study.
        study_name: the study; default ``<config>-<space>-<sampler>``. Running the command again joins it.
        metric: logged validation metric a trial is scored by (its best epoch).
        direction: whether a larger ``metric`` is better.
        pruning: stop unpromising trials early (Optuna's ``MedianPruner`` on the per-epoch ``metric``).
        pruning_startup_trials: finished trials before any trial is pruned.
        pruning_warmup_epochs: epochs of each trial that are never pruned.
        workers: processes on this machine running trials (this one and ``workers - 1`` more).
        seed: seed of the random draws (trial ``k``'s values depend only on it and ``k``).
        output: where to write the best trial's config (YAML for ``medtransfer fit --config``).
        fit_args: ``fit`` options for every trial, e.g. ``["--trainer.max_epochs=3", "--data.path=x.npz"]``;
            also accepted after ``--`` on the command line.
        worker_only: only run trials of an existing study (what the extra ``workers`` processes do).
    """
    import optuna  # here, not at the top: --help needs neither Optuna nor Lightning

    from medtransfer.commands.search_space import load_space, open_storage, plan_trials
    from medtransfer.commands.search_study import check_space, create_parent, finish, pruner
    from medtransfer.commands.sweep import Sweep, open_study, run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config, space, fit_args = Path(config), Path(space), list(fit_args or [])
    params = load_space(space, sampler)
    tracking = check_space(config, space, params, fit_args)
    name = study_name or f"{config.stem}-{space.stem}-{sampler}"
    plan = [] if worker_only else plan_trials(params, sampler, n_trials)
    settings = {
        "space": {p.key: p.as_dict() for p in params}, "sampler": sampler, "metric": metric,
        "direction": direction, "seed": seed, "tracking_uri": tracking["tracking_uri"],
        "experiment": tracking["experiment_name"], "plan": plan,
    }  # fmt: skip
    logged = {"sampler": sampler, "metric": metric, "direction": direction, "n_trials": len(plan),
              "pruning": pruning, "storage": redact(storage), "config": str(config)}  # fmt: skip
    open_parent = functools.partial(create_parent, tracking, name, logged, space)
    study = open_study(name, open_storage(storage), settings, open_parent,
                       pruner(pruning, pruning_startup_trials, pruning_warmup_epochs))  # fmt: skip
    sweep = Sweep([config], params, fit_args, metric, direction)
    ran = run_trials(study, sweep, storage, 0 if worker_only else workers - 1)
    if worker_only:
        return SearchResult(name, ran)
    result = SearchResult(**finish(study, storage, ran, config, fit_args, Path(output)))
    _print_summary(result, metric)
    return result


def _print_summary(result: SearchResult, metric: str) -> None:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in result.trials.items())
    lines = [f"Study {result.study} in {result.storage}: {counts}"]
    if result.unfinished:
        lines.append(f"{result.unfinished} trial(s) still queued or running in other processes")
    if result.best:
        best = result.best
        lines.append(f"Best trial {best['trial']}: {metric} = {best['value']:.4f} with {best['params']}")
        lines.append(f"Best config: {result.output}  ->  medtransfer fit --config {result.output}")
    else:
        lines.append("No trial completed, so no best config was written")
    lines.append(f"MLflow parent run {result.parent_run_id}; its trials are child runs")
    if result.ui_hint:
        lines.append(result.ui_hint)
    print("\n".join(lines), flush=True)
