"""Hyperparameter search over ``medtransfer fit``: Optuna grid or random search, tracked in MLflow.

``medtransfer search --config configs/pneumonia_effnet_lite0.yaml --space configs/search/pneumonia_lr.yaml
--sampler random --n_trials 8 --workers 2 -- --trainer.max_epochs=4`` (also ``python -m medtransfer.commands.search``).

- The search space is a YAML file whose keys are ``fit`` options (``model.optimizer.init_args.lr``), each with a
  ``type`` (``float``, ``int``, ``categorical``), bounds or choices, ``log: true`` for log-uniform draws, and a
  ``grid:`` list for ``--sampler grid``.
- Every trial is one in-process ``fit`` of the base config plus the trial's values, an MLflow child run of one
  parent run per study; the value of a trial is the best ``--metric`` over its validation epochs. The test
  split is never used to choose: ``test_after_fit`` is off in trials.
- The study lives in an Optuna RDB storage (SQLite file by default; PostgreSQL/MySQL for several nodes).
  The process that creates the study queues all its trials; every process (``--workers`` starts extra local
  ones; other nodes run the same command) claims queued trials one at a time until none is left, so no
  trial runs twice and none is lost. A worker that dies is noticed by its stopped heartbeat and its trial is
  queued again.
- The best trial's config (base config + ``fit_args`` + winning values, dumped by the ``fit`` parser) is
  written to ``--output``, ready for ``medtransfer fit --config``, and logged to the parent run with the
  trials table and an optimization-history plot.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.samplers import RandomSampler
from optuna.trial import TrialState

from medtransfer.errors import DataError, MedtransferError, exit_on_user_error
from medtransfer.files import write_text_atomic
from medtransfer.tracking.redaction import redact

__all__ = ["SearchParam", "load_space", "main", "open_storage", "run_search"]

_logger = logging.getLogger(__name__)

_TYPES = ("float", "int", "categorical")
_FIELDS = {"type", "low", "high", "log", "step", "choices", "grid"}
#: Seconds between heartbeats of a running trial; a trial silent for three times this is failed and re-queued.
HEARTBEAT_SECONDS = 60


class SearchParam:
    """One dimension of the search space: a ``fit`` option, its distribution and its grid values.

    Args:
        key: the ``fit`` option, dotted as on the command line (``model.optimizer.init_args.lr``).
        type: ``float``, ``int`` or ``categorical``.
        low: lower bound (``float``/``int``).
        high: upper bound (``float``/``int``).
        log: draw log-uniformly (learning rates, weight decay).
        step: grid step for ``int``/``float`` (not with ``log``).
        choices: the values of a ``categorical``.
        grid: the values ``--sampler grid`` tries.
    """

    def __init__(
        self,
        key: str,
        type: Literal["float", "int", "categorical"],
        low: float | None = None,
        high: float | None = None,
        log: bool = False,
        step: float | None = None,
        choices: list | None = None,
        grid: list | None = None,
    ) -> None:
        self.key, self.type, self.low, self.high, self.log, self.step = key, type, low, high, log, step
        self.choices, self.grid = choices, grid

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=self.step or 1
            )
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value: the queued grid value, else a draw from the distribution."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def as_dict(self) -> dict[str, Any]:
        fields = {"type": self.type, "low": self.low, "high": self.high, "log": self.log, "step": self.step}
        fields.update(choices=self.choices, grid=self.grid)
        return {k: v for k, v in fields.items() if v is not None}


def _check_param(key: str, spec: Any, path: Path, grid: bool) -> SearchParam:
    where = f"{path}: search space key {key!r}"
    if not isinstance(spec, Mapping):
        raise DataError(f"{where}: expected a mapping like {{type: float, low: 1e-4, high: 1e-2, log: true}}")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}; expected some of {sorted(_FIELDS)}")
    if spec.get("type") not in _TYPES:
        raise DataError(f"{where}: expected `type` to be one of {', '.join(_TYPES)}, but got {spec.get('type')!r}")
    param = SearchParam(key, **spec)
    if param.type == "categorical":
        if not isinstance(param.choices, list) or not param.choices:
            raise DataError(f"{where}: a categorical needs a non-empty `choices` list")
    else:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (param.low, param.high)):
            raise DataError(f"{where}: a {param.type} needs numeric `low` and `high`")
        if not param.low < param.high:
            raise DataError(f"{where}: expected `low` < `high`, but got low={param.low}, high={param.high}")
        if param.log and param.low <= 0:
            raise DataError(f"{where}: `log: true` needs `low` > 0, but got {param.low}")
    if grid:
        if not isinstance(param.grid, list) or not param.grid:
            raise DataError(f"{where}: --sampler grid needs a non-empty `grid: [values]` list")
        outside = [v for v in param.grid if not param.distribution()._contains(_internal(param, v))]
        if outside:
            raise DataError(f"{where}: grid values {outside} lie outside the parameter's range or choices")
    return param


def _internal(param: SearchParam, value: Any) -> float:
    try:
        return param.distribution().to_internal_repr(value)
    except (ValueError, TypeError):
        return math.nan


def load_space(path: str | Path, sampler: Literal["grid", "random"] = "random") -> list[SearchParam]:
    """The search space of a YAML file, checked; errors name the file and the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: expected a mapping of fit options to parameter specs, e.g. model.optimizer.lr")
    return [_check_param(str(key), spec, path, sampler == "grid") for key, spec in raw.items()]


def _resolve_key(config: Mapping[str, Any], key: str) -> bool:
    """Whether dotted ``key`` names an option of a resolved config (``init_args`` may be left out)."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part not in node and isinstance(node.get("init_args"), Mapping):
            node = node["init_args"]
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _fit_config_text(config: Path, fit_args: list[str]) -> str:
    """The resolved ``fit`` config of ``--config config *fit_args``, as ``fit --print_config`` writes it."""
    from medtransfer.commands.fit import build_cli

    printed, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            build_cli(["fit", "--config", str(config), *fit_args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            message = errors.getvalue().strip().splitlines()
            raise MedtransferError(f"fit options rejected: {message[-1] if message else stop.code}") from None
    return printed.getvalue()


def _override(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


class _TrialSeededSampler(RandomSampler):
    """``RandomSampler`` whose draws depend only on (seed, trial number, parameter): workers and nodes sharing a
    study never repeat each other's draws, and trial ``k`` gets the same values whichever process runs it."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self._base_seed = seed

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        seed = zlib.crc32(f"{self._base_seed}/{trial.number}/{param_name}".encode())
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)


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
        event.listen(storage.engine, "connect", _sqlite_manual_transactions)
        event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        storage.engine.dispose()  # reopen pooled connections with the listener
    return storage


def _sqlite_manual_transactions(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat in a thread while it runs (``Study.optimize`` does this; ask/tell does not)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _claim(study: optuna.Study, storage: optuna.storages.RDBStorage) -> optuna.Trial | None:
    """Atomically take the oldest queued trial, or ``None`` when the queue is empty. Unlike ``study.ask()``,
    this never creates a trial, so several processes together run exactly the queued ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, and queued again
    study_id = storage.get_study_id_from_name(study.study_name)
    # listed through the study (not the raw storage), so its storage cache knows the trials it will report to
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _plan(params: list[SearchParam], sampler: str, n_trials: int | None) -> list[dict[str, Any]]:
    """The queued trials: grid points in order (``itertools.product``), or empty ones for random draws."""
    if sampler == "grid":
        keys = [p.key for p in params]
        grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(p.grid for p in params))]
        return grid[: n_trials or len(grid)]
    if not n_trials:
        raise MedtransferError("Expected argument `n_trials` to be a positive integer with --sampler random")
    return [{} for _ in range(n_trials)]


def _open_study(
    name: str, storage: optuna.storages.RDBStorage, settings: dict[str, Any], create_parent: Any
) -> optuna.Study:
    """Create the study (queue its trials, create the MLflow parent run), or join it once its creator is done."""
    sampler = _TrialSeededSampler(settings["seed"])
    plan = settings.pop("plan")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=settings["direction"], sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
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


def _tags(study: optuna.Study, trial: optuna.Trial) -> dict[str, str]:
    return {
        "mlflow.parentRunId": study.user_attrs["parent_run_id"],
        "optuna.study": study.study_name,
        "optuna.trial": str(trial.number),
    }


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    params: list[SearchParam],
    config: Path,
    fit_args: list[str],
    pruner: dict[str, Any] | None,
    storage_url: str,
) -> float:
    """One in-process ``fit`` of the trial's values; its value is the best metric over validation epochs."""
    from medtransfer.commands.fit import build_cli

    settings = study.user_attrs["settings"]
    values = {p.key: p.suggest(trial) for p in params}
    callback = {
        "class_path": "medtransfer.callbacks.optuna_pruning.OptunaPruning",
        "init_args": {"storage": storage_url, "study_name": study.study_name, "trial_number": trial.number,
                      "monitor": settings["metric"], "pruner": pruner},
    }  # fmt: skip
    # trials do not export or register a model (--fit_args may turn it back on); `fit --config best.yaml` does
    args = ["fit", "--config", str(config), "--mlflow_model.enabled=false", *fit_args]
    args += [*(_override(k, v) for k, v in values.items())]
    args += [
        "--test_after_fit=false",  # trials are chosen on validation data; the test split stays unseen
        f"--trainer.logger.init_args.run_name={study.study_name}-trial-{trial.number}",
        f"--trainer.logger.init_args.tags={json.dumps(_tags(study, trial))}",
        f"--trainer.callbacks+={json.dumps(callback)}",
    ]
    _logger.info("Trial %d of study %s: %s", trial.number, study.study_name, values)
    build_cli(args)
    reported = trial.storage.get_trial(trial._trial_id).intermediate_values
    if not reported:
        raise MedtransferError(f"Trial {trial.number} ran no validation epoch, so {settings['metric']} is unknown")
    best = max if settings["direction"] == "maximize" else min
    return best(reported.values())


def _mark_run(study: optuna.Study, trial: optuna.Trial, status: str) -> None:
    """Give a trial's MLflow run the trial's fate: a pruned trial's run is ``KILLED`` and tagged ``PRUNED``."""
    from mlflow.tracking import MlflowClient

    attrs = trial.storage.get_trial(trial._trial_id).user_attrs
    if "mlflow_run_id" in attrs:
        client = MlflowClient(study.user_attrs["settings"]["tracking_uri"])
        client.set_tag(attrs["mlflow_run_id"], "optuna.state", "PRUNED" if status == "KILLED" else "FAIL")
        client.set_terminated(attrs["mlflow_run_id"], status)


def _work(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    params: list[SearchParam],
    config: Path,
    fit_args: list[str],
    pruner: dict[str, Any] | None,
    storage_url: str,
) -> int:
    """Run queued trials until none is left; returns how many this process ran."""
    done, start = 0, time.perf_counter()
    while (trial := _claim(study, storage)) is not None:
        with _heartbeat(storage, trial._trial_id):
            try:
                value = _run_trial(study, trial, params, config, fit_args, pruner, storage_url)
            except optuna.TrialPruned:
                _mark_run(study, trial, "KILLED")
                study.tell(trial, state=TrialState.PRUNED)
            except BaseException:
                _mark_run(study, trial, "FAILED")
                study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
        done += 1
        _print_progress(study, trial.number, done, time.perf_counter() - start)
    return done


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
    text = _fit_config_text(config, [*fit_args, *(_override(k, v) for k, v in best.params.items())])
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


def _resolve_logger(config_text: str) -> tuple[str, str]:
    """The MLflow experiment and tracking URI a fit of this config logs to (trials become their runs)."""
    from medtransfer.tracking.mlflow import MLflowLogger

    logger = (yaml.safe_load(config_text).get("trainer") or {}).get("logger")
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
    config_text = _fit_config_text(Path(config), fit_args)
    resolved = yaml.safe_load(config_text)
    unknown = [p.key for p in params if not _resolve_key(resolved, p.key)]
    if unknown:
        raise DataError(f"{space}: search space key {unknown[0]!r} is not an option of `medtransfer fit`")
    experiment, tracking_uri = _resolve_logger(config_text)
    name = study_name or f"{Path(config).stem}-{Path(space).stem}-{sampler}"
    db = open_storage(storage)
    settings = {
        "space": {p.key: p.as_dict() for p in params}, "sampler": sampler, "metric": metric,
        "direction": direction, "seed": seed, "tracking_uri": tracking_uri, "experiment": experiment,
        "plan": [] if worker_only else _plan(params, sampler, n_trials),
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

    study = _open_study(name, db, settings, create_parent)
    pruner = None
    if pruning:
        init = {"n_startup_trials": pruning_startup_trials, "n_warmup_steps": pruning_warmup_epochs}
        pruner = {"class_path": "optuna.pruners.MedianPruner", "init_args": init}
    extra: list[subprocess.Popen] = []
    if workers > 1 and not worker_only:
        argv = ["--config", str(config), "--space", str(space), "--sampler", sampler, "--storage", storage,
                "--study_name", name, "--metric", metric, "--direction", direction, "--pruning", str(pruning).lower(),
                "--pruning_startup_trials", str(pruning_startup_trials), "--seed", str(seed),
                "--pruning_warmup_epochs", str(pruning_warmup_epochs), "--fit_args", json.dumps(fit_args),
                "--worker_only", "true"]  # fmt: skip
        extra = _spawn_workers(workers - 1, argv)
    try:
        ran = _work(study, db, params, Path(config), fit_args, pruner, storage)
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
