"""The engine of ``search`` and ``learning-curve``: an Optuna study whose trials are fits, each an MLflow child
run of one parent run.

The creator of the study queues its trials; every process running :func:`run_trials` on its storage takes
queued trials one at a time until none is left (a dead worker's trial is queued again after its heartbeat
stops). A trial's value is the best ``metric`` over its validation epochs, reported each epoch to the pruner.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch import LightningModule, Trainer
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from medtransfer.commands.run_fit import FitResult, run_child_fit
from medtransfer.commands.search_space import SearchParam, TrialSeededSampler, open_storage
from medtransfer.errors import MedtransferError, exit_on_user_error
from medtransfer.tracking.callbacks import find_mlflow_logger
from medtransfer.tracking.mlflow import MLflowLogger, open_run
from medtransfer.tracking.redaction import redact

__all__ = ["Sweep", "open_study", "run_trials", "study_parent"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    """What every trial of a study fits: config layers, the dimensions it varies, the user's ``fit`` options.
    A search's trial is the config plus its values; ``learning-curve`` subclasses it. Picklable for workers."""

    config: Sequence[str | Path]
    params: Sequence[SearchParam]
    fit_args: Sequence[str]
    metric: str = "val/auroc"
    direction: str = "maximize"
    test_after_fit: bool | None = False  # a search chooses on validation data: the test split stays unseen

    def fit_of(self, study: optuna.Study, trial: optuna.Trial, values: dict[str, Any]) \
            -> tuple[list[Any], dict[str, Any], str, dict[str, str]]:  # fmt: skip
        """``(config layers, overrides, run name, tags)`` of a trial's fit. No model is exported or registered
        (``fit_args`` may turn it back on); ``fit --config best.yaml`` does."""
        return [*self.config, {"mlflow_model.enabled": False}], values, f"{study.study_name}-trial-{trial.number}", {}

    def record(self, trial: optuna.Trial, result: FitResult, parent: MLflowLogger) -> None:
        """Keep what a finished fit gives beyond the trial's value (nothing, for a search)."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, ran: int, seconds: float) -> None:
        """``search: trial 3 done; 4/8 trials finished, 95 s per trial here, about 6 min left`` (all workers)."""
        ended = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        total, per_trial = len(study.get_trials(deepcopy=False)), seconds / ran
        print(f"search: trial {trial.number} done; {ended}/{total} trials finished, {per_trial:.0f} s per trial "
              f"here, about {(total - ended) * per_trial / 60:.0f} min left", flush=True)  # fmt: skip


def open_study(name: str, storage: optuna.storages.BaseStorage, settings: dict[str, Any],
               create_parent: Callable[[], str], pruner: optuna.pruners.BasePruner) -> optuna.Study:  # fmt: skip
    """Create the study (queue ``settings["plan"]``'s trials, create the MLflow parent run), or join it once its
    creator is done. ``settings`` hold ``seed``, ``direction``, ``experiment`` and ``tracking_uri``."""
    sampler = TrialSeededSampler(settings["seed"])
    plan = settings.pop("plan")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=settings["direction"], sampler=sampler,
                                    pruner=pruner)  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    else:
        for params in plan:
            study.enqueue_trial(params)
        study.set_user_attr("parent_run_id", create_parent())
        study.set_user_attr("settings", settings)  # last: joining processes wait for it
        return study
    for _ in range(600):
        if "settings" in study.user_attrs:
            break
        time.sleep(0.5)  # another process is still setting the study up
    else:
        url = redact(getattr(storage, "url", ""))
        raise MedtransferError(f"Study {name!r} in {url} exists but was never set up; delete it")
    theirs = study.user_attrs["settings"]
    mismatch = sorted(k for k in ("space", "sampler", "metric", "direction") if theirs.get(k) != settings.get(k))
    if mismatch:
        different = ", ".join(mismatch)
        raise MedtransferError(f"Study {name!r} exists with a different {different}; choose another --study_name")
    _logger.info("Joined study %s", name)
    return study


def study_parent(study: optuna.Study) -> MLflowLogger:
    """The study's MLflow parent run, whose child runs its trials are."""
    settings, run_id = study.user_attrs["settings"], study.user_attrs["parent_run_id"]
    return open_run(settings["experiment"], tracking_uri=settings["tracking_uri"], run_id=run_id)


class _Pruning(PyTorchLightningPruningCallback):
    """Optuna's pruning callback that also keeps the fit's MLflow run id, for a pruned fit raises before
    ``run_fit`` returns it."""

    run_id: str | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        logger = find_mlflow_logger(trainer)
        self.run_id = logger.run_id if logger is not None and trainer.is_global_zero else None


def _objective(study: optuna.Study, sweep: Sweep) -> Callable[[optuna.Trial], float]:
    """One in-process ``fit`` of a trial's values; its value is the best metric over its validation epochs."""
    parent = study_parent(study)

    def objective(trial: optuna.Trial) -> float:
        values = {p.key: p.suggest(trial) for p in sweep.params}
        _logger.info("Trial %d of study %s: %s", trial.number, study.study_name, values)
        layers, overrides, run_name, tags = sweep.fit_of(study, trial, values)
        pruning = _Pruning(trial, monitor=sweep.metric)
        tags = {"optuna.study": study.study_name, "optuna.trial": str(trial.number), **tags}
        try:
            result = run_child_fit(parent, layers, overrides, fit_args=sweep.fit_args, callbacks=[pruning],
                                   run_name=run_name, tags=tags, test_after_fit=sweep.test_after_fit)  # fmt: skip
            if result.interrupted:
                raise KeyboardInterrupt
            pruning.check_pruned()  # under DDP the callback stops the fit and leaves raising to this
            sweep.record(trial, result, parent)
        except (optuna.TrialPruned, KeyboardInterrupt):
            _mark_run(parent, pruning.run_id, "KILLED")
            raise
        except BaseException:
            _mark_run(parent, pruning.run_id, "FAILED")
            raise
        finally:
            trial.set_user_attr("mlflow_run_id", pruning.run_id)  # in the trials table
        reported = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number).intermediate_values
        if not reported:
            logged = ", ".join(sorted(result.metrics)) or "none"
            raise MedtransferError(f"The metric {sweep.metric!r} was not logged; logged metrics: {logged}")
        return (max if sweep.direction == "maximize" else min)(reported.values())

    return objective


def _mark_run(parent: MLflowLogger, run_id: str | None, status: str) -> None:
    """Give a trial's MLflow run the trial's fate: a pruned or interrupted trial's run is ``KILLED``."""
    if run_id is not None:
        parent.experiment.set_tag(run_id, "optuna.state", "PRUNED" if status == "KILLED" else "FAIL")
        parent.experiment.set_terminated(run_id, status)


def _work(study: optuna.Study, sweep: Sweep) -> int:
    """Run queued trials until none is left; returns how many this process ran."""
    ran, start = [], time.perf_counter()
    planned = sum(trial.state != TrialState.FAIL for trial in study.get_trials(deepcopy=False))

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(trial.number)
        sweep.after_trial(study, trial, len(ran), time.perf_counter() - start)

    # taken, running or ended: the queue is empty once these are all the planned trials (a stale trial's retry
    # is queued as a new one, its failed first try not counted)
    done = MaxTrialsCallback(planned, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):  # else `optimize` would add a fresh trial
        study.optimize(_objective(study, sweep), callbacks=[done, after_trial], gc_after_trial=True)
    return len(ran)


def _worker(name: str, storage: str, seed: int, pruner: optuna.pruners.BasePruner, sweep: Sweep, threads: int) -> None:
    """An extra local worker process: run queued trials of the study until none is left."""
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(storage), sampler=TrialSeededSampler(seed),
                              pruner=pruner)  # fmt: skip
    with exit_on_user_error():
        _work(study, sweep)


def run_trials(study: optuna.Study, sweep: Sweep, storage: str = "", extra_workers: int = 0) -> int:
    """Run queued trials here and in ``extra_workers`` more local processes on the RDB ``storage`` (``spawn``: a
    fresh interpreter each, as CUDA and MLflow's threads need); returns how many this process ran."""
    threads = max(1, (os.cpu_count() or 1) // (extra_workers + 1))
    seed = study.user_attrs["settings"]["seed"]
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(study.study_name, storage, seed, study.pruner, sweep, threads))
                 for _ in range(extra_workers)]  # fmt: skip
    for process in processes:
        process.start()
    try:
        ran = _work(study, sweep)
    finally:
        for process in processes:
            process.join()
    failed = sum(process.exitcode != 0 for process in processes)
    if failed:
        raise MedtransferError(f"{failed} worker process(es) failed; see their output")
    return ran
