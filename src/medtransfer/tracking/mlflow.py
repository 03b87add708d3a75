"""Lightning's ``MLFlowLogger`` with medtransfer's defaults: an embedded store under ``mlruns/``, or a remote
tracking server that is checked before training starts."""

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
from medtransfer.upstream import (
    mlflow_logger_run,
    mlflow_logger_settings,
    mlflow_logger_started,
    set_mlflow_logger_run,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowLogger",
    "check_reachable",
    "open_run",
    "resolve_tracking_uri",
]

_logger = logging.getLogger(__name__)

#: The embedded store: a SQLite database in ``mlruns/`` (artifacts go to ``mlruns/artifacts``).
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None = None, *, existing: bool = False) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store; a SQLite path made absolute.

    With ``existing`` (for commands that only read runs, like ``compare``), a local SQLite store must exist, so
    a typo never creates an empty one, and a tracking server must answer.
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
    """Create (and migrate) the SQLite store at ``database`` under an exclusive lock on ``<database>.lock``.

    MLflow creates its tables and runs its schema migrations on first use; two processes doing so on a fresh
    ``mlruns/`` at the same instant race (``alembic ... Online migration expected to match one row``), and one
    fit dies. The first process here creates the store while the others wait; they then find it ready.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


#: Seconds to wait for a tracking server's answer before calling it unreachable.
PROBE_TIMEOUT_S = 5.0


def _without_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@`` and trailing ``/``: the server's address to probe or to show."""
    parts = urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")


def check_reachable(
    tracking_uri: str, timeout: float = PROBE_TIMEOUT_S, hint: str = "unset MLFLOW_TRACKING_URI"
) -> None:
    """Raise ``MedtransferError`` unless the ``http(s)://`` tracking server at ``tracking_uri`` answers.

    MLflow's client retries a refused connection with backoff for minutes, and only once the first metric is
    logged; one ``GET <uri>/health`` up front turns that into an immediate one-line error. Any HTTP answer
    counts as reachable (a proxy may guard ``/health``); only a failed connection or a timeout does not. Other
    stores (``sqlite:``, ``file:``, ``databricks``) are not probed.

    Args:
        tracking_uri: the MLflow tracking URI.
        timeout: seconds to wait for the answer.
        hint: how to fall back to the embedded store, for the message.
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
        with urllib.request.urlopen(request, timeout=timeout):
            pass
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

    The tracking URI is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``
    (relative to the working directory, as ``make ui`` expects, and made absolute here). For a local SQLite
    store the folder is created and new experiments keep their artifacts in ``<folder>/artifacts``. A
    tracking server (``http(s)://``) must answer here, before any data is loaded (``check_reachable``).

    Args:
        experiment_name: MLflow experiment that runs are grouped under.
        run_name: shown in the MLflow UI; ``None`` lets the CLI name it ``<backbone>-<dataset>-<time>``.
        tracking_uri: MLflow store or server URI.
        tags: extra run tags.
        log_model: as in ``MLFlowLogger``; medtransfer logs the best checkpoint itself, so the default is off.
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
        """Drop metric values at steps the run already has: for a resumed fit, which replays logging.

        Lightning resumes a fit from the last checkpoint and redoes what followed it, so whatever was logged
        after that checkpoint was written (the validation metrics of an epoch killed before its save) is logged
        again at the same steps. The run's history is read on the first ``log_metrics`` after this call; the
        first value logged at a step is the one kept (MLflow cannot replace a logged value).
        """
        self._history_pending = self.skips_logged_steps = True

    #: Whether ``skip_logged_steps`` was called: metric values at steps the run has are dropped.
    skips_logged_steps = False

    def append_after_logged_steps(self) -> None:
        """Log a value at a step its key already has one step after that key's last logged step instead: for
        ``validate`` and ``test`` run again into a finished run, whose loops restart at step 0.

        A repeated evaluation thus never duplicates a step (``test/auroc`` at 48 from test-after-fit, then 49,
        50 ...), and ``validate`` after training lands after the validation curve, not at its step 0.
        """
        self._history_pending = self.appends_after_logged_steps = True

    #: Whether ``append_after_logged_steps`` was called.
    appends_after_logged_steps = False

    #: Whether the process was stopped by a signal (SIGTERM, SIGINT): the run ends ``KILLED``, not ``FAILED``.
    killed = False
    _covered = -1  # the highest step a written checkpoint covers (see checkpoint_covers)

    def mark_killed(self) -> None:
        """End the run as ``KILLED`` when Lightning finalizes it after an interrupt (it would say ``FAILED``)."""
        self.killed = True

    def hold_until_checkpoint(self) -> None:
        """Keep logged metrics back until a checkpoint covering them is on disk (``after_save_checkpoint``).

        A fit killed after logging an epoch's metrics but before saving that epoch resumes from the previous
        checkpoint and computes the epoch again; MLflow cannot replace a value, so without holding back the run
        would keep the discarded attempt's values. Held metrics are written at each checkpoint save and when
        the run ends, except after a stop by a signal, whose documented sequel is a resume that logs them anew.
        """
        self.__dict__.setdefault("_held", [])

    def release_held(self) -> None:
        """Write the metrics held back so far, and stop holding."""
        held = self.__dict__.pop("_held", [])
        for metrics, step in held:
            self.log_metrics(metrics, step)

    def checkpoint_covers(self, step: int) -> None:
        """The checkpoint being saved covers the metrics logged at ``step`` and before: once it is written, values
        logged later at those steps (an epoch's training metrics, which Lightning logs after the epoch's save) are
        written at once, since a resume from it never recomputes them; held, they were lost to a kill after the
        last epoch's save."""
        self.__dict__["_covering"] = step

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if "_covering" in self.__dict__:
            self._covered = self.__dict__.pop("_covering")
        if "_held" in self.__dict__:
            held, self._held = self._held, []
            for metrics, step in held:
                self._write_metrics(metrics, step)

    @override
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        held = self.__dict__.pop("_held", [])
        if not self.killed:
            for metrics, step in held:
                self._write_metrics(metrics, step)
        super().finalize("KILLED" if self.killed and status == "failed" else status)
        if urlsplit(self.tracking_uri).password is not None and self.run_id is not None:
            server = _without_credentials(self.tracking_uri)
            print(f"View run {self.run_id} at: {server}/#/experiments/{self.experiment_id}/runs/{self.run_id}")

    @property
    def last_logged_steps(self) -> dict[str, int]:
        """The highest step logged so far for each metric key (this session, plus the run's history after
        ``skip_logged_steps``)."""
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
        """Log ``metrics`` at ``step``, keeping one value per metric and step: a value at a step not after the
        last one logged for its key is dropped. Lightning logs ``epoch`` twice per epoch (with the validation
        and with the training metrics) and replays an epoch's end on resume; neither adds a second point.
        While :meth:`hold_until_checkpoint` is on, the values wait for the next checkpoint."""
        if "_held" in self.__dict__ and (step is None or step > self._covered):
            self._held.append((dict(metrics), step))
            return
        self._write_metrics(metrics, step)

    def _write_metrics(self, metrics: Mapping[str, float], step: int | None) -> None:
        if step is not None and self.appends_after_logged_steps:
            last = self.last_logged_steps
            by_step: dict[int, dict[str, float]] = {}
            for key, value in metrics.items():
                by_step.setdefault(step if last.get(key, -1) < step else last[key] + 1, {})[key] = value
            for at, group in sorted(by_step.items()):
                last.update(dict.fromkeys(group, at))
                super().log_metrics(group, at)
            return
        if step is not None:
            last = self.last_logged_steps
            skipped = sorted(k for k in metrics if last.get(k, -1) >= step)
            if skipped:
                _logger.debug("Not logging %s at step %d: already logged up to that step", skipped, step)
            metrics = {k: v for k, v in metrics.items() if k not in skipped}
            last.update(dict.fromkeys(metrics, step))
            if not metrics:
                return
        super().log_metrics(metrics, step)


def open_run(
    experiment_name: str = "medtransfer",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, Any] | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
) -> MLflowLogger:
    """Open a new MLflow run, or continue ``run_id``: how every command that is not a Lightning fit starts its run.

    Returns the :class:`MLflowLogger` writing to it, with the run already created: ``logger.run_id``,
    ``logger.experiment_id``, ``logger.tracking_uri`` (resolved as :func:`resolve_tracking_uri`), and
    ``logger.experiment``, the ``MlflowClient`` for anything beyond ``log_hyperparams``/``log_metrics``
    (artifacts, tags, figures). End the run with ``logger.finalize("success" | "failed" | "KILLED")``, or open
    it as ``with open_run(...) as logger:``, which ends it by how the block ends. The arguments are
    :class:`MLflowLogger`'s.
    """
    logger = MLflowLogger(experiment_name, run_name, tracking_uri, tags, artifact_location=artifact_location,
                          run_id=run_id)  # fmt: skip
    _ = logger.experiment  # Lightning creates the run on first use
    return logger
