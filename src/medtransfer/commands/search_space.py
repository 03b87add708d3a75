"""The search space of ``medtransfer search``, a YAML file of ``fit`` options, each a typed Optuna dimension; and
what the processes sharing a study need: its seeded sampler and its RDB storage.

Keys are ``fit`` options (``model.optimizer.init_args.lr``), each with a ``type`` (``float``, ``int``,
``categorical``), bounds or choices, ``log: true`` for log-uniform draws, and a ``grid:`` list for
``--sampler grid``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.samplers import RandomSampler

from medtransfer.errors import DataError, MedtransferError

__all__ = [
    "HEARTBEAT_SECONDS",
    "SearchParam",
    "TrialSeededSampler",
    "load_space",
    "open_storage",
    "plan_trials",
    "resolves_key",
]

_TYPES = ("float", "int", "categorical")
_FIELDS = {"type", "low", "high", "log", "step", "choices", "grid"}


@dataclass(frozen=True)
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

    key: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    grid: list | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value: the queued grid value, else a draw from the distribution."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one the distribution can take (in range, on the step, among the choices)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.type == "int" and value != int(value):
            return False
        steps = (value - self.low) / self.step if self.step else 0.0
        return math.isclose(steps, round(steps), abs_tol=1e-8)

    def as_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("key")
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
        outside = [v for v in param.grid if not param.contains(v)]
        if outside:
            raise DataError(f"{where}: grid values {outside} lie outside the parameter's range or choices")
    return param


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


def resolves_key(config: Mapping[str, Any], key: str) -> bool:
    """Whether dotted ``key`` names an option of a resolved config (``init_args`` may be left out)."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part not in node and isinstance(node.get("init_args"), Mapping):
            node = node["init_args"]
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def plan_trials(params: list[SearchParam], sampler: str, n_trials: int | None) -> list[dict[str, Any]]:
    """The trials to queue: grid points in order (``itertools.product``), or empty ones for random draws."""
    if sampler == "grid":
        keys = [p.key for p in params]
        grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(p.grid for p in params))]
        return grid[: n_trials or len(grid)]
    if not n_trials:
        raise MedtransferError("Expected argument `n_trials` to be a positive integer with --sampler random")
    return [{} for _ in range(n_trials)]


class TrialSeededSampler(RandomSampler):
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
