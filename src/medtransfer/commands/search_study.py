"""The study side of ``medtransfer search``: the fit options it varies checked against the config, its pruner, its
MLflow parent run, and the best trial's config written and logged at the end. Apart from
:mod:`medtransfer.commands.search` so that ``search --help`` imports neither Optuna nor Lightning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from medtransfer.commands.run_fit import resolve_fit_config, sweep_tracking
from medtransfer.commands.search_space import SearchParam, resolves_key
from medtransfer.commands.sweep import study_parent
from medtransfer.errors import DataError
from medtransfer.files import write_text_atomic
from medtransfer.tracking.mlflow import open_run
from medtransfer.tracking.redaction import redact, redact_yaml
from medtransfer.tracking.ui import ui_hint

__all__ = ["check_space", "create_parent", "finish", "pruner"]


def check_space(config: Path, space: Path, params: list[SearchParam], fit_args: list[str]) -> dict[str, Any]:
    """The MLflow settings of the config's fits (:func:`sweep_tracking`), once each key of the space is a fit option."""
    resolved = yaml.safe_load(resolve_fit_config(config, fit_args=fit_args))
    unknown = [p.key for p in params if not resolves_key(resolved, p.key)]
    if unknown:
        raise DataError(f"{space}: search space key {unknown[0]!r} is not an option of `medtransfer fit`")
    return sweep_tracking(resolved, "search")


def pruner(pruning: bool, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    if not pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


def create_parent(tracking: dict[str, Any], name: str, logged: dict[str, Any], space: Path) -> str:
    """Open the study's MLflow parent run, with the search's settings as params and its space file."""
    tags = {"optuna.study": name, "medtransfer.command": "search"}
    parent = open_run(run_name=f"search-{name}", tags=tags, **tracking)
    parent.log_hyperparams({f"search.{key}": value for key, value in logged.items()})
    parent.experiment.log_text(parent.run_id, space.read_text(), f"search/{space.name}")
    return parent.run_id


def finish(study: optuna.Study, storage: str, ran: int, config: Path, fit_args: list[str], output: Path) \
        -> dict[str, Any]:  # fmt: skip
    """Write the best config, end the parent run once no trial is left, and sum the study up (the fields of
    :class:`~medtransfer.commands.search.SearchResult`)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {state.name: states.count(state) for state in TrialState if state in states}
    best = _write_best(study, config, fit_args, output)
    unfinished = counts.get("RUNNING", 0) + counts.get("WAITING", 0)
    parent = study_parent(study)
    link = ui_hint(parent.tracking_uri, parent.experiment_id, parent.run_id)
    if not unfinished:
        parent.finalize("success")
    return {"study": study.study_name, "ran": ran, "storage": redact(storage), "trials": counts, "best": best,
            "parent_run_id": study.user_attrs["parent_run_id"], "output": str(output) if best else None,
            "unfinished": unfinished, "ui_hint": link}  # fmt: skip


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
