"""Hyperparameter search over ``medtransfer fit``: Optuna grid or random search, tracked in MLflow.

``medtransfer search --config configs/pneumonia_effnet_lite0.yaml --space configs/search/pneumonia_lr.yaml
--sampler random --n_trials 8 --workers 2 -- --trainer.max_epochs=4`` (also ``python -m medtransfer.commands.search``).

- The search space is a YAML file of ``fit`` options (``commands.search_space``).
- Every trial is one in-process ``fit`` (``commands.fit.run_fit``) of the base config plus the trial's values,
  an MLflow child run of one parent run per study; the value of a trial is the best ``--metric`` over its
  validation epochs, reported each epoch by optuna-integration's ``PyTorchLightningPruningCallback``. The test
  split is never used to choose: ``test_after_fit`` is off in trials.
- The study lives in an Optuna RDB storage (SQLite file by default; PostgreSQL/MySQL for several nodes).
  The process that creates the study queues all its trials; every process (``--workers`` starts extra local
  ones; other nodes run the same command) runs ``study.optimize``, which takes queued trials one at a time,
  until ``MaxTrialsCallback`` sees none left, so no trial runs twice and none is lost. A worker that dies is
  noticed by its stopped heartbeat and its trial is queued again.
- The best trial's config (base config + ``fit_args`` + winning values, dumped by the ``fit`` parser) is
  written to ``--output``, ready for ``medtransfer fit --config``, and logged to the parent run with the
  trials table and an optimization-history plot.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from lightning.pytorch import LightningModule, Trainer
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from medtransfer.commands.run_fit import resolve_fit_config, run_fit
from medtransfer.commands.search_space import SearchParam, TrialSeededSampler, load_space, plan_trials, resolves_key
from medtransfer.errors import DataError, MedtransferError, exit_on_user_error
from medtransfer.files import write_text_atomic
from medtransfer.tracking.callbacks import find_mlflow_logger
from medtransfer.tracking.redaction import redact, redact_yaml

__all__ = ["SearchParam", "load_space", "main", "open_storage", "run_search"]

_logger = logging.getLogger(__name__)

#: Seconds between heartbeats of a running trial; a trial silent for three times this is failed and re-queued.
HEARTBEAT_SECONDS = 60


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage for several processes: heartbeats (a dead worker's trial is failed and queued again)
    and, for SQLite, a 30 s lock timeout and ``BEGIN IMMEDIATE`` transactions.

    Why the latter: Python's ``sqlite3`` only opens a transaction at the first write, so the read-then-update
    by which Optuna claims a queued trial is not atomic on SQLite, and two processes can claim the same trial.
    Starting every transaction with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented recipe) serialises them.
    """
    from sqlalchemy import event

    sqlite = url.startswith("sqlite:///")
    if sqlite and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 30}} if sqlite else None,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=3 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    if sqlite:
        event.listen(storage.engine, "connect", lambda connection, _: setattr(connection, "isolation_level", None))
        event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        storage.engine.dispose()  # reopen pooled connections with the listener
    return storage


def _open_study(
    name: str,
    storage: optuna.storages.RDBStorage,
    settings: dict[str, Any],
    create_parent: Any,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study (queue its trials, create the MLflow parent run), or join it once its creator is done."""
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
        study.set_user_attr("parent_run_id", create_parent(len(plan)))
        study.set_user_attr("settings", settings)  # last: joining processes wait for it
        return study
    for _ in range(600):
        if "settings" in study.user_attrs:
            break
        time.sleep(0.5)  # another process is still setting the study up
    else:
        raise MedtransferError(f"Study {name!r} in {redact(storage.url)} exists but was never set up; delete it")
    theirs = study.user_attrs["settings"]
    mismatch = sorted(k for k in ("space", "sampler", "metric", "direction") if theirs.get(k) != settings[k])
    if mismatch:
        different = ", ".join(mismatch)
        raise MedtransferError(f"Study {name!r} exists with a different {different}; choose another --study_name")
    _logger.info("Joined study %s", name)
    return study


class _Pruning(PyTorchLightningPruningCallback):
    """Optuna's pruning callback that also keeps the fit's MLflow run id, for a pruned fit raises before
    ``run_fit`` returns it."""

    run_id: str | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        logger = find_mlflow_logger(trainer)
        self.run_id = logger.run_id if logger is not None and trainer.is_global_zero else None


def _objective(study: optuna.Study, params: list[SearchParam], config: Path, fit_args: list[str]) -> Any:
    """One in-process ``fit`` of a trial's values; its value is the best metric over its validation epochs."""
    settings = study.user_attrs["settings"]
    metric = settings["metric"]

    def objective(trial: optuna.Trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        _logger.info("Trial %d of study %s: %s", trial.number, study.study_name, values)
        pruning = _Pruning(trial, monitor=metric)
        tags = {"mlflow.parentRunId": study.user_attrs["parent_run_id"], "optuna.study": study.study_name,
                "optuna.trial": str(trial.number)}  # fmt: skip
        try:
            # trials do not export or register a model (--fit_args may turn it back on); `fit --config best.yaml`
            # does; they are chosen on validation data, so the test split stays unseen
            result = run_fit([config, {"mlflow_model.enabled": False}], values, fit_args=fit_args,
                             callbacks=[pruning], run_name=f"{study.study_name}-trial-{trial.number}",
                             tags=tags, test_after_fit=False)  # fmt: skip
            pruning.check_pruned()  # under DDP the callback stops the fit and leaves raising to this
        except optuna.TrialPruned:
            _mark_run(settings, pruning.run_id, "KILLED")
            raise
        except BaseException:
            _mark_run(settings, pruning.run_id, "FAILED")
            raise
        finally:
            trial.set_user_attr("mlflow_run_id", pruning.run_id)  # in the trials table
        reported = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number).intermediate_values
        if not reported:
            logged = ", ".join(sorted(result.metrics)) or "none"
            raise MedtransferError(f"The search metric {metric!r} was not logged; logged metrics: {logged}")
        return (max if settings["direction"] == "maximize" else min)(reported.values())

    return objective


def _mark_run(settings: dict[str, Any], run_id: str | None, status: str) -> None:
    """Give a trial's MLflow run the trial's fate: a pruned trial's run is ``KILLED`` and tagged ``PRUNED``."""
    from mlflow.tracking import MlflowClient

    if run_id is not None:
        client = MlflowClient(settings["tracking_uri"])
        client.set_tag(run_id, "optuna.state", "PRUNED" if status == "KILLED" else "FAIL")
        client.set_terminated(run_id, status)


def _work(study: optuna.Study, params: list[SearchParam], config: Path, fit_args: list[str]) -> int:
    """Run queued trials until none is left; returns how many this process ran."""
    ran, start = [], time.perf_counter()
    planned = sum(trial.state != TrialState.FAIL for trial in study.get_trials(deepcopy=False))

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(trial.number)
        _print_progress(study, trial.number, len(ran), time.perf_counter() - start)

    # taken, running or ended: the queue is empty once these are all the planned trials (a stale trial's retry
    # is queued as a new one, its failed first try not counted)
    done = MaxTrialsCallback(planned, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):  # else `optimize` would add a fresh trial
        study.optimize(_objective(study, params, config, fit_args), callbacks=[done, progress], gc_after_trial=True)
    return len(ran)


def _print_progress(study: optuna.Study, number: int, done: int, seconds: float) -> None:
    """``search: trial 3 done; 4/8 trials finished, 95 s per trial here, about 6 min left`` (all workers)."""
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    finished = len(study.get_trials(deepcopy=False, states=ended))
    total = len(study.get_trials(deepcopy=False))
    per_trial = seconds / done
    print(f"search: trial {number} done; {finished}/{total} trials finished, {per_trial:.0f} s per trial here, "
          f"about {(total - finished) * per_trial / 60:.0f} min left", flush=True)  # fmt: skip


def _write_best(study: optuna.Study, config: Path, fit_args: list[str], output: Path) -> dict[str, Any] | None:
    """Write the best trial's full fit config to ``output`` and log it, the trials and a plot to the parent."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
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
    from mlflow.tracking import MlflowClient

    settings, best = study.user_attrs["settings"], study.best_trial
    client, run_id = MlflowClient(settings["tracking_uri"]), study.user_attrs["parent_run_id"]
    client.log_metric(run_id, f"best_{settings['metric']}", best.value)
    client.set_tag(run_id, "best_trial", str(best.number))
    for key, value in best.params.items():
        client.set_tag(run_id, f"best.{key}", str(value))
    client.log_artifact(run_id, str(output), "search")
    client.log_text(run_id, study.trials_dataframe().to_csv(index=False), "search/trials.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=settings["metric"])
    client.log_figure(run_id, axes.figure, "search/optimization_history.png")
    plt.close(axes.figure)


def _resolve_logger(config: Mapping[str, Any]) -> tuple[str, str]:
    """The MLflow experiment and tracking URI a fit of this config logs to (trials become their runs)."""
    from medtransfer.tracking.mlflow import MLflowLogger

    logger = (config.get("trainer") or {}).get("logger")
    if not isinstance(logger, Mapping) or "MLflowLogger" not in str(logger.get("class_path", "")):
        raise MedtransferError("medtransfer search needs the MLflow logger (trainer.logger: MLflowLogger)")
    init = logger.get("init_args") or {}
    experiment = init.get("experiment_name") or "medtransfer"
    return experiment, MLflowLogger(experiment_name=experiment, tracking_uri=init.get("tracking_uri")).tracking_uri


def _spawn_workers(count: int, argv: list[str]) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // (count + 1))))
    command = [sys.executable, "-m", "medtransfer.commands.search", *argv]
    return [subprocess.Popen(command, env=env) for _ in range(count)]


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
) -> dict[str, Any]:
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
    fit_args = list(fit_args or [])
    params = load_space(space, sampler)
    resolved = yaml.safe_load(resolve_fit_config(config, fit_args=fit_args))
    unknown = [p.key for p in params if not resolves_key(resolved, p.key)]
    if unknown:
        raise DataError(f"{space}: search space key {unknown[0]!r} is not an option of `medtransfer fit`")
    experiment, tracking_uri = _resolve_logger(resolved)
    name = study_name or f"{Path(config).stem}-{Path(space).stem}-{sampler}"
    db = open_storage(storage)
    settings = {
        "space": {p.key: p.as_dict() for p in params}, "sampler": sampler, "metric": metric,
        "direction": direction, "seed": seed, "tracking_uri": tracking_uri, "experiment": experiment,
        "plan": [] if worker_only else plan_trials(params, sampler, n_trials),
    }  # fmt: skip

    def create_parent(planned: int) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        tags = {"optuna.study": name, "medtransfer.command": "search"}
        run = client.create_run(experiment_id, run_name=f"search-{name}", tags=tags)
        logged = {"sampler": sampler, "metric": metric, "direction": direction, "n_trials": planned,
                  "pruning": pruning, "storage": redact(storage), "config": str(config)}  # fmt: skip
        for key, value in logged.items():
            client.log_param(run.info.run_id, f"search.{key}", value)
        client.log_text(run.info.run_id, Path(space).read_text(), f"search/{Path(space).name}")
        return run.info.run_id

    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=pruning_startup_trials, n_warmup_steps=pruning_warmup_epochs)
        if pruning
        else optuna.pruners.NopPruner()
    )
    study = _open_study(name, db, settings, create_parent, pruner)
    extra: list[subprocess.Popen] = []
    if workers > 1 and not worker_only:
        argv = ["--config", str(config), "--space", str(space), "--sampler", sampler, "--storage", storage,
                "--study_name", name, "--metric", metric, "--direction", direction, "--pruning", str(pruning).lower(),
                "--pruning_startup_trials", str(pruning_startup_trials), "--seed", str(seed),
                "--pruning_warmup_epochs", str(pruning_warmup_epochs), "--fit_args", json.dumps(fit_args),
                "--worker_only", "true"]  # fmt: skip
        extra = _spawn_workers(workers - 1, argv)
    try:
        ran = _work(study, params, Path(config), fit_args)
    finally:
        codes = [process.wait() for process in extra]
    if any(codes):
        raise MedtransferError(f"{sum(1 for c in codes if c)} search worker process(es) failed; see their output")
    if worker_only:
        return {"study": name, "ran": ran}
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {state.name: states.count(state) for state in TrialState if state in states}
    best = _write_best(study, Path(config), fit_args, Path(output))
    unfinished = counts.get("RUNNING", 0) + counts.get("WAITING", 0)
    if not unfinished:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_terminated(study.user_attrs["parent_run_id"], "FINISHED")
    result = {"study": name, "storage": redact(storage), "trials": counts, "ran": ran, "best": best,
              "parent_run_id": study.user_attrs["parent_run_id"], "output": str(output) if best else None}  # fmt: skip
    _print_summary(result, metric, unfinished)
    return result


def _print_summary(result: dict[str, Any], metric: str, unfinished: int) -> None:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in result["trials"].items())
    lines = [f"Study {result['study']} in {result['storage']}: {counts}"]
    if unfinished:
        lines.append(f"{unfinished} trial(s) still queued or running in other processes")
    if result["best"]:
        best = result["best"]
        lines.append(f"Best trial {best['trial']}: {metric} = {best['value']:.4f} with {best['params']}")
        lines.append(f"Best config: {result['output']}  ->  medtransfer fit --config {result['output']}")
    else:
        lines.append("No trial completed, so no best config was written")
    lines.append(f"MLflow parent run {result['parent_run_id']}; its trials are child runs (make ui)")
    print("\n".join(lines), flush=True)


def main(args: list[str] | None = None) -> None:
    """``medtransfer search``: the typed ``run_search`` as a command line; options after ``--`` go to ``fit``.

    (jsonargparse's ``auto_cli`` would add its own ``--config`` for a file of the command's options, which
    shadows ``run_search``'s ``config``; so the parser is built from the function directly.)
    """
    from jsonargparse import ArgumentParser

    argv = sys.argv[1:] if args is None else list(args)
    if "--" in argv:  # ``-- --trainer.max_epochs=2 ...``: appended to ``fit_args``
        index = argv.index("--")
        argv = [*argv[:index], *(f"--fit_args+={item}" for item in argv[index + 1 :])]
    parser = ArgumentParser(prog="medtransfer search", description=run_search.__doc__.splitlines()[0])
    parser.add_function_arguments(run_search)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with exit_on_user_error():
        run_search(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
