"""Every ``medtransfer ...`` command in the README's and docs' ```bash blocks parses with the real command line, so a
renamed or removed option (or command, or ``make`` target) fails the suite instead of rotting in the docs.

``fit``/``validate``/``test`` go through the project's LightningCLI, which parses and checks every option (class
paths, types, config files) with nothing instantiated and nothing run; the other commands through the builder of
their typed function, and the options they hand to ``fit`` through fit's parser too. ``<placeholders>`` become a
word; paths that only exist on the reader's machine (``my_xrays/``, ``labels.csv``) are never opened by parsing.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import warnings
from pathlib import Path

import pytest

from medtransfer.commands.command_line import _split_fit_args, _takes, build_parser
from medtransfer.commands.fit import MedTransferCLI, build_cli
from medtransfer.entry import COMMAND_HELP, COMMANDS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LIGHTNING = ("fit", "validate", "test")
#: fit's options without a config of their own are checked on top of the default one
DEFAULT_CONFIG = "configs/pneumonia_effnet_lite0.yaml"
#: what a placeholder stands for where a word would not parse
PLACEHOLDERS = {"<same config>": DEFAULT_CONFIG}
_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_NAMED_YAML = re.compile(r"^```yaml[ \t]*\n# ([\w./-]+\.ya?ml)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_LAUNCHERS = ("medtransfer", "$(which medtransfer)")


def _shell_lines(text: str) -> list[str]:
    """The command lines of a Markdown text's ```bash blocks, continuations joined, placeholders filled in."""
    lines = []
    for block in _BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for placeholder, word in PLACEHOLDERS.items():
                line = line.replace(placeholder, word)
            # mlruns/1/<run>/... -> mlruns/1/run/...; runs:/<run id>/model -> runs:/run_id/model
            lines.append(re.sub(r"<([^<>]+)>", lambda m: re.sub(r"\W+", "_", m[1]), line))
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _documented() -> list[tuple[str, list[str]]]:
    """``(where, tokens)`` of every documented shell command, comments dropped."""
    found = []
    for doc in DOCS:
        for line in _shell_lines(doc.read_text()):
            tokens = shlex.split(line, comments=True)
            commands: list[list[str]] = [[]]  # split at &&, ||, ; and |
            for token in tokens:
                if token in ("&&", "||", ";", "|"):
                    commands.append([])
                else:
                    commands[-1].append(token)
            found += [(f"{doc.relative_to(REPO)}: {' '.join(c)[:120]}", c) for c in commands if c]
    return found


def _medtransfer_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``medtransfer`` (also ``.venv/bin/medtransfer``, ``srun medtransfer``, ``torchrun ...
    "$(which medtransfer)"``), or ``None`` when the line does not run it."""
    for i, token in enumerate(tokens):
        if token in _LAUNCHERS or token.endswith("/bin/medtransfer"):
            return tokens[i + 1 :]
    return None


MEDTRANSFER = [pytest.param(argv, id=where) for where, t in _documented() if (argv := _medtransfer_argv(t)) is not None]


def _make_words(tokens: list[str]) -> list[str] | None:
    """The words after ``make`` (``HOST=0.0.0.0 make ui`` too), or ``None`` when the line does not run make."""
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        tokens = tokens[1:]
    return tokens[1:] if tokens[:1] == ["make"] else None


MAKE = [pytest.param(words, id=where) for where, t in _documented() if (words := _make_words(t)) is not None]


class _ParseOnly(MedTransferCLI):
    """The CLI that parses and checks the command line, then stops: no model, data, trainer or run."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _parse_lightning(argv: list[str]) -> None:
    """Parse ``medtransfer <fit|validate|test> ...``; a rejected command line fails with the parser's error."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # pytest's argv
            build_cli(argv, cli_class=_ParseOnly)
    except SystemExit as stop:
        if stop.code not in (0, None):
            pytest.fail(f"medtransfer {' '.join(argv)}\n{errors.getvalue().strip().splitlines()[-1]}")


def _parse_command(name: str, argv: list[str]) -> None:
    """Parse ``medtransfer <name> ...`` with the builder of its typed function, as ``run_command`` does, and
    the options it passes on to fit with fit's parser."""
    module, function_name = COMMANDS[name].split(":")
    function = getattr(__import__(module, fromlist=[function_name]), function_name)
    parser = build_parser(function, prog=f"medtransfer {name}")
    own, fit_args = _split_fit_args(parser, argv) if _takes(function, "fit_args") else (argv, [])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(own)
    except SystemExit as stop:
        if stop.code not in (0, None):
            pytest.fail(f"medtransfer {name} {' '.join(own)}\n{errors.getvalue().strip().splitlines()[-1]}")
        return
    if fit_args or parsed.get("fit_args"):
        fit_args = [*(parsed.get("fit_args") or []), *fit_args]
        base = [] if any(a.split("=")[0] == "--config" for a in fit_args) else ["--config", DEFAULT_CONFIG]
        _parse_lightning(["fit", *base, *fit_args])


@pytest.fixture(autouse=True)
def _in_a_checkout(tmp_path, monkeypatch):
    """Run in a folder with the repository's ``configs/``, the YAML files the docs spell out (a ```yaml block
    whose first line is ``# <name>.yaml``), and ``best.yaml``, which ``medtransfer search`` writes."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for doc in DOCS:
        for name, body in _NAMED_YAML.findall(doc.read_text()):
            (tmp_path / name).write_text(body)
    (tmp_path / "best.yaml").write_text((REPO / DEFAULT_CONFIG).read_text())
    monkeypatch.chdir(tmp_path)


def test_the_docs_show_commands():
    assert len(MEDTRANSFER) > 30 and len(MAKE) > 3  # the extraction still finds them


@pytest.mark.parametrize("argv", MEDTRANSFER)
def test_a_documented_command_parses(argv):
    if not argv or argv[0] in ("-h", "--help"):
        return  # the command list
    name, options = argv[0], argv[1:]
    assert name in COMMAND_HELP, f"medtransfer has no command {name!r}"
    if options in (["--help"], ["-h"]):
        return
    if name in LIGHTNING:
        _parse_lightning([name, *options])
    else:
        _parse_command(name, options)


@pytest.mark.parametrize("words", MAKE)
def test_a_documented_make_target_exists(words):
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    words = [w for w in words if "=" not in w and not w.startswith("-")]
    assert set(words) <= targets, f"no Makefile target {sorted(set(words) - targets)}"


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--config", DEFAULT_CONFIG, "--trainer.max_epoch_count", "1"],
        ["test", "--config", DEFAULT_CONFIG, "--model.backbone_name", "resnet18"],
        ["fit", "--config", DEFAULT_CONFIG, "--config", "no_such.yaml"],
        ["predict", "scans/", "model.ckpt", "--heatmaps_folder", "h/"],
        ["baseline", "--config", DEFAULT_CONFIG, "--data.image_sizes", "28"],
        ["search", "--config", DEFAULT_CONFIG, "--spaces", "s.yaml"],
        ["learning-curve", "--configs", f"[{DEFAULT_CONFIG}]", "--", "--trainer.max_epoch_count=5"],
        ["nonesuch"],
    ],
)
def test_a_misspelt_command_fails_the_check(argv):
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        test_a_documented_command_parses(argv)
