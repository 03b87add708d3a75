"""Lightning's ``MLFlowLogger`` with medtransfer's defaults: an embedded store, or a remote server checked first."""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from medtransfer.errors import MedtransferError
from medtransfer.tracking.redaction import redact
from medtransfer.upstream import mlflow_logger_run, mlflow_logger_settings, mlflow_logger_started, set_mlflow_logger_run

__all__ = ["DEFAULT_TRACKING_URI", "MLflowLogger", "check_reachable", "open_run", "resolve_tracking_uri"]

_logger = logging.getLogger(__name__)

#: The embedded store: a SQLite database in ``mlruns/`` (artifacts go to ``mlruns/artifacts``).
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None = None, *, existing: bool = False) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store; a SQLite path made absolute.

    With ``existing`` (commands that only read runs, like ``compare``), a SQLite store must exist (a typo never
    creates an empty one) and a tracking server must answer.
    """
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    database = _local_sqlite_path(tracking_uri)
    if database is not None:
        tracking_uri = f"sqlite:///{database.resolve()}"
    if existing and database is not None and not database.is_file():
        raise MedtransferError(
            f"No MLflow store at {database}: run `medtransfer fit` in this folder first, or point --tracking_uri "
            "(or $MLFLOW_TRACKING_URI) at your store."
        )
    if existing:
        check_reachable(tracking_uri, hint="omit --tracking_uri and unset MLFLOW_TRACKING_URI")
    return tracking_uri


def _local_sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or ``None`` for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def _create_store_once(tracking_uri: str, database: Path) -> None:
    """Create (and migrate) the SQLite store under a lock: two processes migrating a fresh store at once race
    (``alembic ... Online migration expected to match one row``) and one fit dies."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _without_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@`` and trailing ``/``: the server's address to probe or to show."""
    parts = urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")


def check_reachable(tracking_uri: str, timeout: float = 5.0, hint: str = "unset MLFLOW_TRACKING_URI") -> None:
    """Raise ``MedtransferError`` unless the ``http(s)://`` tracking server at ``tracking_uri`` answers.

    MLflow's client retries a refused connection for minutes, and only once the first metric is logged; one
    ``GET <uri>/health`` up front fails at once instead. Any HTTP answer counts (a proxy may guard ``/health``).
    ``hint`` says how to fall back to the embedded store; other stores are not probed.
    """
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return
    # urllib reads ``user:password@`` as part of the host name; MLflow's client (requests) sends it as basic auth
    request = urllib.request.Request(_without_credentials(tracking_uri) + "/health")
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered, if not with 200
    except (OSError, ValueError) as err:  # URLError (refused, unknown host), TimeoutError, a malformed URI
        reason = getattr(err, "reason", None) or err
        raise MedtransferError(
            f"MLflow tracking server {redact(tracking_uri)} is unreachable: {reason} "
            f"(start it, or {hint} to use the embedded store mlruns/)"
        ) from None


class MLflowLogger(MLFlowLogger):
    """``MLFlowLogger`` that defaults to the embedded store and can continue an existing run.

    The tracking URI is resolved by :func:`resolve_tracking_uri`; a SQLite store's folder is created and new
    experiments keep their artifacts in ``<folder>/artifacts``; a tracking server must answer before any data
    is loaded.

    Args:
        experiment_name: MLflow experiment that runs are grouped under.
        run_name: shown in the MLflow UI; ``None`` lets the CLI name it ``<backbone>-<dataset>-<time>``.
        tracking_uri: MLflow store or server URI.
        tags: extra run tags.
        log_model: as in ``MLFlowLogger``; off, as ``LogModelToMLflow`` logs the best model.
        artifact_location: artifact root for a newly created experiment.
        run_id: continue this run instead of creating one (set automatically from a checkpoint).
    """

    def __init__(
        self,
        experiment_name: str = "medtransfer",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_model: Literal[True, False, "all"] = False,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> None:
        hint = "remove the logger's tracking_uri" if tracking_uri else "unset MLFLOW_TRACKING_URI"
        tracking_uri = resolve_tracking_uri(tracking_uri)  # a SQLite store absolute: later chdirs do not move it
        check_reachable(tracking_uri, hint=hint)
        if urlsplit(tracking_uri).password is not None:
            # MLflow prints "View run ... at: <tracking URI>" when a run ends, password and all; its public switch
            # turns that off and finalize prints the link without the credentials instead
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        database = _local_sqlite_path(tracking_uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
            _create_store_once(tracking_uri, database)
            if artifact_location is None:
                artifact_location = (database.parent / "artifacts").resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=redact(tags) if tags else tags,  # secret-named tags and URI credentials never reach the run
            log_model=log_model,
            artifact_location=artifact_location,
            run_id=run_id,
        )

    @property
    def tracking_uri(self) -> str:
        return mlflow_logger_settings(self)[0]

    def __enter__(self) -> MLflowLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        """Leaving a ``with`` block ends the run: ``FINISHED``, ``KILLED`` on an interrupt, else ``FAILED``."""
        self.finalize("success" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "failed")

    @property
    def started(self) -> bool:
        """Whether the MLflow run exists yet (runs are created lazily, on first use)."""
        return mlflow_logger_started(self)

    def continue_run(self, run_id: str) -> None:
        """Log into ``run_id`` instead of a new run; only possible before the run is first used."""
        current = mlflow_logger_run(self)[0]
        if self.started and current != run_id:
            raise RuntimeError(f"The logger already writes to run {current}; cannot switch to {run_id}.")
        set_mlflow_logger_run(self, run_id=run_id)

    def name_run(self, run_name: str) -> None:
        """Name the run to be created, unless the user named it."""
        if mlflow_logger_run(self)[1] is None and not self.started:
            set_mlflow_logger_run(self, run_name=run_name)

    def skip_logged_steps(self) -> None:
        """Drop metric values at steps the run already has (read on the next ``log_metrics``): a resumed fit logs
        again what followed its checkpoint, and MLflow keeps the first value at a step."""
        self._history_pending = self.skips_logged_steps = True

    skips_logged_steps = False

    def append_after_logged_steps(self) -> None:
        """Log a value at a step its key already has one after that key's last step instead: ``validate`` and
        ``test`` into a finished run restart at step 0, and a repeat lands after the curve (48, then 49, ...)."""
        self._history_pending = self.appends_after_logged_steps = True

    appends_after_logged_steps = False

    #: Whether the process was stopped by a signal (SIGTERM, SIGINT): the run ends ``KILLED``, not ``FAILED``.
    killed = False
    _covered = -1  # the highest step a written checkpoint covers (see checkpoint_covers)

    def mark_killed(self) -> None:
        """End the run as ``KILLED`` when Lightning finalizes it after an interrupt (not ``FAILED``)."""
        self.killed = True

    def hold_until_checkpoint(self) -> None:
        """Keep logged metrics back until a checkpoint covering them is on disk: a fit killed between logging an
        epoch and saving it redoes that epoch on resume, and MLflow cannot replace a value. Held metrics are
        written at each save and when the run ends, unless stopped by a signal (its resume logs them anew)."""
        self.__dict__.setdefault("_held", [])

    def release_held(self) -> None:
        """Write the metrics held back so far, and stop holding."""
        for metrics, step in self.__dict__.pop("_held", []):
            self._write_metrics(metrics, step)

    def checkpoint_covers(self, step: int) -> None:
        """The checkpoint being saved covers ``step`` and before: once it is written, values logged later at those
        steps (the epoch's training metrics, logged after its save) are written at once, as no resume redoes them."""
        self.__dict__["_covering"] = step

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if "_covering" in self.__dict__:
            self._covered = self.__dict__.pop("_covering")
        if "_held" in self.__dict__:
            self.release_held()
            self.hold_until_checkpoint()

    @override
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self.killed:
            self.__dict__.pop("_held", None)
        self.release_held()
        super().finalize("KILLED" if self.killed and status == "failed" else status)
        if urlsplit(self.tracking_uri).password is not None and self.run_id is not None:
            server = _without_credentials(self.tracking_uri)
            print(f"View run {self.run_id} at: {server}/#/experiments/{self.experiment_id}/runs/{self.run_id}")

    @property
    def last_logged_steps(self) -> dict[str, int]:
        """The highest step logged per metric key (with the run's history after ``skip_logged_steps``)."""
        if "_last_steps" not in self.__dict__:
            self._last_steps: dict[str, int] = {}
        if self.__dict__.pop("_history_pending", False) and self.run_id is not None:
            client = self.experiment
            for key in client.get_run(self.run_id).data.metrics:
                steps = [m.step for m in client.get_metric_history(self.run_id, key)]
                self._last_steps[key] = max([self._last_steps.get(key, -1), *steps])
        return self._last_steps

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log ``metrics`` at ``step``, dropping a value at a step not after its key's last one (Lightning logs
        ``epoch`` twice per epoch and replays an epoch's end on resume); held back while
        :meth:`hold_until_checkpoint` is on."""
        if "_held" in self.__dict__ and (step is None or step > self._covered):
            self._held.append((dict(metrics), step))
            return
        self._write_metrics(metrics, step)

    def _write_metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        if step is None:
            super().log_metrics(metrics, step)
            return
        last = self.last_logged_steps
        by_step: dict[int, dict[str, float]] = {}
        for key, value in metrics.items():  # a key logged up to `step` is dropped, or appended after its last step
            if last.get(key, -1) < step or self.appends_after_logged_steps:
                by_step.setdefault(max(step, last.get(key, -1) + 1), {})[key] = value
        skipped = sorted(set(metrics).difference(*by_step.values()))
        if skipped:
            _logger.debug("Not logging %s at step %d: already logged up to that step", skipped, step)
        for at, group in sorted(by_step.items()):
            last.update(dict.fromkeys(group, at))
            super().log_metrics(group, at)


def open_run(
    experiment_name: str = "medtransfer",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, Any] | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
) -> MLflowLogger:
    """Open a new MLflow run, or continue ``run_id``, for commands that are not a Lightning fit: the
    :class:`MLflowLogger` with the run created. End it with ``logger.finalize(status)``, or open it in a ``with``
    block, which ends it by how the block ends."""
    logger = MLflowLogger(experiment_name, run_name, tracking_uri, tags, artifact_location=artifact_location,
                          run_id=run_id)  # fmt: skip
    _ = logger.experiment  # Lightning creates the run on first use
    return logger
