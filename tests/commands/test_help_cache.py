"""The stored ``--help`` of the commands that need torch to describe their options: the same text as the live
parser, printed without importing a heavy library, and a miss (so the live parser) whenever its key changes or the
entry cannot be read. Every test has its own ``XDG_CACHE_HOME``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import HEAVY, REPO, help_in_fresh_process

from medtransfer.commands import help_cache
from medtransfer.commands.help_cache import CACHED, is_cached_help, print_help

#: The live parser's ``--help`` of a command, with no cache involved: what ``medtransfer <command> --help``
#: printed before the cache.
_LIVE = """
import sys
command, sys.argv = sys.argv[1], ["medtransfer"]
from medtransfer.entry import COMMANDS
if command in COMMANDS:
    from medtransfer.commands.command_line import run_command
    run_command(COMMANDS[command], ["--help"], prog=f"medtransfer {command}")
else:
    from medtransfer.commands.fit import main
    main([command, "--help"])
"""
_WARM = "from medtransfer.entry import warm_help_cache; warm_help_cache()"


def _run_python(code: str, *args: str, env: dict[str, str]) -> str:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          check=True).stdout  # fmt: skip


@pytest.fixture(scope="module")
def warmed(tmp_path_factory) -> dict[str, str]:
    """The environment of a cache that ``make setup``'s step (:func:`warm_help_cache`) filled, in one process."""
    env = {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "COLUMNS": "100"}
    assert "fit, validate, test, serve, baseline" in _run_python(_WARM, env=env)
    return env


@pytest.mark.parametrize("command", CACHED)
def test_the_stored_help_is_the_live_parsers_and_prints_without_heavy_imports(command, warmed):
    text, modules = help_in_fresh_process(command, warmed)
    assert modules & HEAVY == set()
    live = _run_python(_LIVE, command, env={"COLUMNS": "100"})
    assert text == live
    assert "usage: medtransfer" in text and "--config" in text


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own, at 100 columns."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    return tmp_path / "medtransfer" / "help"


class _Live:
    """A stand-in for a command's parser: prints its text, then exits 0 as argparse does after help."""

    def __init__(self, text: str = "usage: medtransfer fit [options]\n", code: int = 0) -> None:
        self.text, self.code, self.calls = text, code, 0

    def __call__(self) -> None:
        self.calls += 1
        print(self.text, end="")
        raise SystemExit(self.code)


def _help(live: _Live, command: str = "fit") -> int:
    with pytest.raises(SystemExit) as stop:
        print_help(command, live)
    return stop.value.code


def test_a_miss_runs_the_parser_once_and_later_calls_print_its_text(cache, capsys):
    live = _Live()
    assert _help(live) == 0 and _help(live) == 0
    assert live.calls == 1
    assert capsys.readouterr().out == live.text * 2
    (entry,) = cache.glob("fit-*.json")
    assert json.loads(entry.read_text())["text"] == live.text


def test_another_terminal_width_misses_and_both_widths_are_kept(cache, monkeypatch):
    live = _Live()
    _help(live)
    monkeypatch.setenv("COLUMNS", "120")
    _help(live)
    assert live.calls == 2
    assert len(list(cache.glob("fit-*.json"))) == 2


def test_changed_sources_miss_and_replace_the_stale_entries(cache, monkeypatch):
    live = _Live()
    monkeypatch.setattr(help_cache, "_source_digest", lambda package: "before")
    _help(live)
    monkeypatch.setenv("COLUMNS", "120")
    _help(live)
    monkeypatch.setattr(help_cache, "_source_digest", lambda package: "after")
    _help(live)
    assert live.calls == 3
    (entry,) = cache.glob("fit-*.json")  # the two entries of the old sources are gone
    assert json.loads(entry.read_text())["key"]["sources"] == "after"


def test_the_source_digest_follows_every_file_but_compiled_caches(tmp_path):
    (tmp_path / "module.py").write_text("x = 1\n")
    before = help_cache._source_digest(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "module.cpython-311.pyc").write_bytes(b"\0")
    assert help_cache._source_digest(tmp_path) == before
    (tmp_path / "module.py").write_text("x = 2\n")
    assert help_cache._source_digest(tmp_path) != before


@pytest.mark.parametrize("content", ['{"key": {"command": "fit"}, "te', "not json", '["a list"]', ""])
def test_a_corrupt_or_partial_entry_is_ignored_and_rewritten(cache, capsys, content):
    live = _Live()
    _help(live)
    (entry,) = cache.glob("fit-*.json")
    entry.write_text(content)
    _help(live)
    assert live.calls == 2
    assert capsys.readouterr().out == live.text * 2
    assert json.loads(entry.read_text())["text"] == live.text


def test_a_failing_parser_passes_its_exit_status_on_and_stores_nothing(cache, capsys):
    assert _help(_Live("broken\n", code=2)) == 2
    assert capsys.readouterr().out == "broken\n"
    assert not list(cache.glob("*.json"))


@pytest.mark.parametrize(
    ("argv", "cached"),
    [
        (["fit", "--help"], True),
        (["serve", "-h"], True),
        (["fit", "--config", "x.yaml", "--help"], False),
        (["fit", "--print_config"], False),
        (["fit", "--help", "--trainer.max_epochs=1"], False),
        (["predict", "--help"], False),
    ],
)
def test_only_a_bare_help_of_a_cached_command_is_answered_from_the_cache(argv, cached):
    assert is_cached_help(argv) is cached
