"""MkDocs hook: the CLI reference page, written at build time from every command's own ``--help``.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with one section per command
in ``medtransfer.entry.COMMAND_HELP`` (its one-line summary, then the full ``medtransfer <command> --help``). The
help texts come from one child process that imports medtransfer once (Lightning, timm and MLflow take seconds to
import) and runs each command's ``--help`` in turn, exactly as the console script does, with an empty help cache
of its own (``XDG_CACHE_HOME``): every command's text is its live parser's, never one stored earlier. A command
whose help fails stops the build: the reference never silently lacks a command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = "<!-- cli-reference -->"
REPO = Path(__file__).resolve().parents[2]

# Runs in the child: every command's --help, captured, as JSON {command: [summary, help text]}.
_COLLECT = r"""
import contextlib, io, json, sys
sys.argv[0] = "medtransfer"
from medtransfer.entry import COMMAND_HELP, main
texts = {}
for command, summary in COMMAND_HELP.items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([command, "--help"])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    if code != 0:
        sys.exit(f"medtransfer {command} --help exited {code}:\n{out.getvalue()}")
    texts[command] = [summary, out.getvalue()]
sys.stdout.write(json.dumps(texts))
"""

_cache: dict[str, list[str]] | None = None


def _help_texts() -> dict[str, list[str]]:
    """``{command: [summary, help]}`` from one child process (the repository's ``src`` first on its path)."""
    global _cache
    if _cache is None:
        with tempfile.TemporaryDirectory() as empty_cache:
            env = dict(
                os.environ,
                COLUMNS="110",
                XDG_CACHE_HOME=empty_cache,
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
            )
            done = subprocess.run([sys.executable, "-c", _COLLECT], capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"CLI reference: collecting --help failed:\n{done.stderr[-4000:]}")
        _cache = json.loads(done.stdout)
    return _cache


def _usage_prog(text: str, command: str) -> str:
    """Lightning's parser names the program after ``sys.argv[0]``; show what a user types."""
    return text.replace(f"usage: medtransfer [options] {command}", f"usage: medtransfer {command}")


def on_pre_build(config, **kwargs) -> None:
    """Every build (also each rebuild of ``mkdocs serve``) asks the commands afresh."""
    global _cache
    _cache = None


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    sections = []
    for command, (summary, text) in _help_texts().items():
        sections.append(
            f"## `medtransfer {command}`\n\n{summary[0].upper() + summary[1:]}.\n\n"
            f"```text\n{_usage_prog(text, command).rstrip()}\n```\n"
        )
    return markdown.replace(MARKER, "\n".join(sections))
