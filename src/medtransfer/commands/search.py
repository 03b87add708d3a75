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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import TrialState

from medtransfer.commands.run_fit import resolve_fit_config, sweep_tracking
from medtransfer.commands.search_space import SearchParam, load_space, open_storage, plan_trials, resolves_key
from medtransfer.commands.sweep import Sweep, open_study, run_trials, study_parent
from medtransfer.errors import DataError
from medtransfer.files import write_text_atomic
from medtransfer.tracking.mlflow import open_run
from medtransfer.tracking.redaction import redact, redact_yaml
from medtransfer.tracking.ui import ui_hint

__all__ = ["SearchParam", "SearchResult", "load_space", "open_storage", "run_search"]


def _write_best(study: optuna.Study, config: Path, fit_args: list[str], output: Path) -> dict[str, Any] | None:
    """Write the best trial's full fit config to ``output`` and log it, the trials and a plot to the parent."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    text = redact_yaml(resolve_fit_config(config, best.params, fit_args=fit_args))  # no secret of fit_args kept
    header = f"# medtransfer search: best trial {best.number} of study {study.study_name}"
    write_text_atomic(output, f"{header}, {study.user_attrs['settings']['metric']} = {best.value:.6f}\n{text}")
    _log_to_parent(study, output)
    return {"trial": best.number, "value": best.value, "params": best.params}


def _log_to_parent(study: optuna.Study, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, best, parent = study.user_attrs["settings"]["metric"], study.best_trial, study_parent(study)
    parent.log_metrics({f"best_{metric}": best.value})
    client, run_id = parent.experiment, parent.run_id
    client.set_tag(run_id, "best_trial", str(best.number))
    for key, value in best.params.items():
        client.set_tag(run_id, f"best.{key}", str(value))
    client.log_artifact(run_id, str(output), "search")
    client.log_text(run_id, study.trials_dataframe().to_csv(index=False), "search/trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    client.log_figure(run_id, axes.figure, "search/optimization_history.png")
    plt.close(axes.figure)


def _create_parent(tracking: dict[str, Any], name: str, logged: dict[str, Any], space: Path) -> str:
    """Open the study's MLflow parent run, with the search's settings as params and its space file."""
    tags = {"optuna.study": name, "medtransfer.command": "search"}
    parent = open_run(run_name=f"search-{name}", tags=tags, **tracking)
    parent.log_hyperparams({f"search.{key}": value for key, value in logged.items()})
    parent.experiment.log_text(parent.run_id, space.read_text(), f"search/{space.name}")
    return parent.run_id


def _pruner(pruning: bool, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    if not pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


def _check_space(config: Path, space: Path, params: list[SearchParam], fit_args: list[str]) -> dict[str, Any]:
    """The MLflow settings of the config's fits (:func:`sweep_tracking`), once each key of the space is a fit option."""
    resolved = yaml.safe_load(resolve_fit_config(config, fit_args=fit_args))
    unknown = [p.key for p in params if not resolves_key(resolved, p.key)]
    if unknown:
        raise DataError(f"{space}: search space key {unknown[0]!r} is not an option of `medtransfer fit`")
    return sweep_tracking(resolved, "search")


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


def _finish(study: optuna.Study, storage: str, ran: int, config: Path, fit_args: list[str], output: Path) \
        -> SearchResult:  # fmt: skip
    """Write the best config, end the parent run once no trial is left, and sum the study up."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {state.name: states.count(state) for state in TrialState if state in states}
    best = _write_best(study, config, fit_args, output)
    unfinished = counts.get("RUNNING", 0) + counts.get("WAITING", 0)
    parent = study_parent(study)
    link = ui_hint(parent.tracking_uri, parent.experiment_id, parent.run_id)
    if not unfinished:
        parent.finalize("success")
    return SearchResult(study.study_name, ran, redact(storage), counts, best, study.user_attrs["parent_run_id"],
                        str(output) if best else None, unfinished, link)  # fmt: skip


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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config, space, fit_args = Path(config), Path(space), list(fit_args or [])
    params = load_space(space, sampler)
    tracking = _check_space(config, space, params, fit_args)
    name = study_name or f"{config.stem}-{space.stem}-{sampler}"
    plan = [] if worker_only else plan_trials(params, sampler, n_trials)
    settings = {
        "space": {p.key: p.as_dict() for p in params}, "sampler": sampler, "metric": metric,
        "direction": direction, "seed": seed, "tracking_uri": tracking["tracking_uri"],
        "experiment": tracking["experiment_name"], "plan": plan,
    }  # fmt: skip
    logged = {"sampler": sampler, "metric": metric, "direction": direction, "n_trials": len(plan),
              "pruning": pruning, "storage": redact(storage), "config": str(config)}  # fmt: skip
    create_parent = functools.partial(_create_parent, tracking, name, logged, space)
    pruner = _pruner(pruning, pruning_startup_trials, pruning_warmup_epochs)
    study = open_study(name, open_storage(storage), settings, create_parent, pruner)
    sweep = Sweep([config], params, fit_args, metric, direction)
    ran = run_trials(study, sweep, storage, 0 if worker_only else workers - 1)
    if worker_only:
        return SearchResult(name, ran)
    result = _finish(study, storage, ran, config, fit_args, Path(output))
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
