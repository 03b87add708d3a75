"""Real servers and a real browser for tests: PostgreSQL, an MLflow tracking server or UI, ``medtransfer serve``,
headless Chromium.

Every server binds 127.0.0.1 on a free port, runs in its own process group and is stopped with that group
when its ``with`` block ends, so nothing outlives the test session. The programs come from Debian packages
(``postgresql``, ``chromium``, ``chromium-driver``) that ``.ci/run`` installs; where one is missing the test
skips with the package to install, except with ``CI=true``, where it fails (like ``require_file``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "PostgresServer",
    "free_port",
    "headless_chromium",
    "mlflow_process",
    "postgres_server",
    "require_program",
    "serve_process",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Headless, and quiet: no GPU, no sandbox (CI runs as root), no calls home, no first-run dialogs.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
#: How long a server may take to start before the fixture gives up (it normally takes a few seconds).
START_TIMEOUT_S = 180.0


def require_program(path: Path | str, package: str) -> Path:
    """The program at ``path`` (or found on ``PATH``); skip on a user's machine without it, fail in CI."""
    found = Path(path) if Path(path).is_absolute() else Path(shutil.which(str(path)) or path)
    if not (found.is_file() and os.access(found, os.X_OK)):
        message = f"{path} is not installed (Debian: apt-get install {package}; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session`` and everything it spawned (e.g. server workers)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left: a stuck parent, orphaned workers
    process.wait()


@contextmanager
def mlflow_process(command: str, *args: str, cwd: Path) -> Iterator[str]:
    """Run ``mlflow <command> <args>`` (``server`` or ``ui``) on 127.0.0.1 and a free port; yields its URL.

    The URL is yielded once ``/health`` answers; the log is ``<cwd>/mlflow-<command>.log``. MLflow's job
    runner (seven consumer processes for GenAI jobs that tracking does not use) is switched off.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cwd / f"mlflow-{command}.log"
    argv = [sys.executable, "-m", "mlflow", command, *args, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow {command} did not start ({' '.join(argv)}):\n{_log_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(process)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, or 503 (an HTTPError) while the workers load the model
        return False


@contextmanager
def serve_process(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``medtransfer serve <args>`` on 127.0.0.1 and a free port; yields its URL and process once ``/health``
    answers 200 (every inference worker has loaded the model). The log is ``<cwd>/serve-<port>.log``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cwd / f"serve-{port}.log"
    argv = [sys.executable, "-m", "medtransfer.entry", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"medtransfer serve did not start ({' '.join(argv)}):\n{_log_tail(log_path)}")
            time.sleep(0.5)
        yield url, process
    finally:
        _stop_group(process)


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster with an empty database ``mlflow``; trust authentication, 127.0.0.1 only."""

    port: int
    user: str = "postgres"
    database: str = "mlflow"

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI for ``mlflow server --backend-store-uri``, naming the installed driver, psycopg2."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def connect(self, database: str | None = None):
        """A psycopg2 connection (autocommit) to ``database`` (default: ``mlflow``)."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname=database or self.database
        )
        connection.autocommit = True
        return connection


def _postgres_bindir() -> Path:
    """Debian keeps ``initdb``/``pg_ctl`` in ``/usr/lib/postgresql/<version>/bin``; elsewhere they are on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    pg_ctl = versions[-1] if versions else require_program("pg_ctl", "postgresql")
    return require_program(pg_ctl, "postgresql").parent


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 and a free port.

    PostgreSQL refuses to run as root, so as root (CI, these machines) the cluster is made and run by the
    ``postgres`` user that Debian's package creates; its Unix socket lives in the folder, not in /run.
    """
    bindir = _postgres_bindir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="medtransfer-postgres-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"

    def run(*argv: str) -> None:
        done = subprocess.run([*as_postgres, *argv], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}{_log_tail(folder / 'log')}")

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start")
        started = True
        server = PostgresServer(port=port)
        connection = server.connect("postgres")
        try:
            connection.cursor().execute(f"CREATE DATABASE {server.database}")
        finally:
            connection.close()
        yield server
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def headless_chromium(folder: Path, width: int = 1440, height: int = 900) -> Iterator:
    """Selenium driving Debian's headless Chromium with a fresh profile in ``folder``; quit at the end."""
    chromium = require_program(CHROMIUM, "chromium")
    chromedriver = require_program(CHROMEDRIVER, "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    folder.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = str(chromium)
    for argument in (*CHROMIUM_ARGS, f"--user-data-dir={folder / 'profile'}", f"--window-size={width},{height}"):
        options.add_argument(argument)
    service = Service(str(chromedriver), log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
