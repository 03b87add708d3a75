"""The ``--help`` text of the commands that cannot describe their options without importing torch, kept on disk.

``fit``, ``validate`` and ``test`` list Lightning's Trainer, the data modules and the model; ``serve`` builds on
LitServe and ``baseline`` takes a data module. Importing torch alone takes about 1.7 s on a 2-core CPU, and these
``--help`` took 5.5-7 s. The text changes only when what it is made of changes, so the first bare
``medtransfer <command> --help`` (or ``make setup``, through :func:`warm`) runs the live parser, captures what it
prints and stores it; later ones print the stored text without importing anything heavy.

An entry lives under ``$XDG_CACHE_HOME`` (else ``~/.cache``) ``/medtransfer/help/``, written atomically, and is
keyed by everything the text depends on (:func:`help_key`): a hash of medtransfer's own files, the installed
versions of the packages whose signatures and docstrings it prints, the Python version, the program name in the
usage line, the terminal width argparse wraps at, and jsonargparse's environment switches. Any change is a miss,
which runs the live parser. Only ``[command, "--help"]`` or ``[command, "-h"]`` is answered here; anything else
(``--config x.yaml --help``, or any option besides) goes to the live parser, as does an entry that cannot be read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from medtransfer.files import write_text_atomic

__all__ = ["CACHED", "cache_folder", "help_key", "is_cached_help", "print_help", "warm"]

#: The commands whose ``--help`` is cached (every other command's is instant without a cache).
CACHED = ("fit", "validate", "test", "serve", "baseline")
#: Installed packages whose signatures, docstrings or formatting the cached texts print.
PACKAGES = ("medtransfer", "lightning", "jsonargparse", "docstring-parser", "typeshed-client", "torch", "torchvision",
            "timm", "albumentations", "torchmetrics", "mlflow", "litserve", "scikit-learn")  # fmt: skip
#: The name the console script runs under: the program name in Lightning's usage line.
PROG = "medtransfer"


def is_cached_help(argv: list[str]) -> bool:
    """Whether ``argv`` is exactly a cached command's ``--help`` (or ``-h``)."""
    return len(argv) == 2 and argv[0] in CACHED and argv[1] in ("--help", "-h")


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/medtransfer/help``, else ``~/.cache/medtransfer/help``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medtransfer" / "help"


def help_key(command: str) -> dict[str, Any]:
    """Everything the ``--help`` text of ``command`` depends on, as this process would print it."""
    from importlib import metadata  # ~20 ms; only here

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "command": command,
        "sources": _source_digest(Path(__file__).resolve().parents[1]),
        "packages": {name: version(name) for name in PACKAGES},
        "python": sys.version,
        "prog": os.path.basename(sys.argv[0]),
        "columns": shutil.get_terminal_size().columns,  # what argparse's HelpFormatter wraps at
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("JSONARGPARSE_")},
    }


def print_help(command: str, live: Callable[[], None]) -> NoReturn:
    """Print the ``--help`` of ``command`` from the cache; on a miss, run ``live`` (the command's own parser with
    ``--help``), store what it printed and print that. Exits 0, as argparse does after help."""
    key = help_key(command)
    path = _entry_path(key)
    text = _read(path, key)
    if text is None:
        text = _capture(live)
        _store(path, key, text)
    sys.stdout.write(text)
    sys.stdout.flush()
    raise SystemExit(0)


def warm(run: Callable[[list[str]], None]) -> list[str]:
    """Store the ``--help`` of every cached command not stored yet, all in this process (torch imported once), as
    the console script would print it; ``run`` runs an argv as the console script does. Returns the commands
    stored."""
    sys.argv[0] = PROG  # Lightning names the program after sys.argv[0]; the console script's is ``medtransfer``
    stored = []
    for command in CACHED:
        key = help_key(command)
        path = _entry_path(key)
        if _read(path, key) is None:
            _store(path, key, _capture(lambda command=command: run([command, "--help"])))
            stored.append(command)
    return stored


def _source_digest(package: Path) -> str:
    """A hash of every file of the package (path and contents), compiled caches left out."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(package)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _entry_path(key: dict[str, Any]) -> Path:
    """``<command>-<installation>-<view>.json``: the installation part (sources, packages, Python) is what
    makes an entry stale; the view part (program name, width, environment) tells entries of one installation apart."""
    installation = {k: key[k] for k in ("sources", "packages", "python")}
    view = {k: v for k, v in key.items() if k not in installation}
    return cache_folder() / f"{key['command']}-{_digest(installation)}-{_digest(view)}.json"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path, key: dict[str, Any]) -> str | None:
    """The stored text, or ``None`` when there is none, or it cannot be read, or it is not whole or not this key's."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("text"), str):
        return None
    return entry["text"] or None


def _capture(live: Callable[[], None]) -> str:
    """What ``live`` prints on stdout before it exits 0; another exit status is passed on, with what it printed."""
    out = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out):
        try:
            live()
        except SystemExit as stop:
            code = stop.code
    if code not in (0, None):
        sys.stdout.write(out.getvalue())
        raise SystemExit(code)
    return out.getvalue()


def _store(path: Path, key: dict[str, Any], text: str) -> None:
    """Write the entry atomically and remove the command's entries of other installations (stale ones). Best
    effort: a cache that cannot be written only means the next ``--help`` runs the live parser again."""
    if not text:
        return
    with contextlib.suppress(OSError):
        write_text_atomic(path, json.dumps({"key": key, "text": text}))
        installation = path.name.rsplit("-", 1)[0]
        for other in path.parent.glob(f"{key['command']}-*.json"):
            if not other.name.startswith(f"{installation}-"):
                other.unlink(missing_ok=True)
