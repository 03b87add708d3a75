"""The one builder of command lines: every command is a typed ``run_<command>`` function returning a dataclass,
its signature is its options, and a command that runs fits hands every option it does not own to ``fit``."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing

import pytest
from helpers import DEFAULT_CONFIG

from medtransfer.commands.command_line import _split_fit_args, build_parser, run_command
from medtransfer.entry import COMMANDS


def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_is_a_typed_run_function_returning_a_dataclass(command):
    function = _function(COMMANDS[command])
    assert function.__name__ == f"run_{command.replace('-', '_')}"
    returned = typing.get_type_hints(function)["return"]
    kinds = typing.get_args(returned) if isinstance(returned, types.UnionType) else (returned,)
    assert any(dataclasses.is_dataclass(kind) for kind in kinds), returned


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_from_its_signature(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(COMMANDS[command], ["--help"], prog=f"medtransfer {command}")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medtransfer {command}")
    documented = [name for name in typing.get_type_hints(_function(COMMANDS[command])) if name != "return"]
    assert all(name in out for name in documented)


def test_options_a_command_does_not_own_go_to_fit_in_the_order_given():
    from medtransfer.commands.lr_find import run_lr_find

    parser = build_parser(run_lr_find)
    own, fit = _split_fit_args(
        parser,
        ["--config", "a.yaml", "--lr_find.phase", "finetune", "--data.path=x.npz", "--lr_find.min_lr=1e-6",
         "--trainer.max_epochs", "2", "--", "--lr_find.max_lr=9"],
    )  # fmt: skip
    assert own == ["--lr_find.phase", "finetune", "--lr_find.min_lr=1e-6"]
    assert fit == ["--config", "a.yaml", "--data.path=x.npz", "--trainer.max_epochs", "2", "--lr_find.max_lr=9"]


def test_a_command_with_its_own_config_keeps_it_and_collects_fit_args_from_both_forms():
    from medtransfer.commands.search import run_search

    parser = build_parser(run_search)
    own, fit = _split_fit_args(parser, ["--config=f.yaml", '--fit_args=["--a=1"]', "--trainer.x=1", "--", "--b=2"])
    assert own == ["--config=f.yaml", '--fit_args=["--a=1"]']
    assert fit == ["--trainer.x=1", "--b=2"]


def test_a_wrong_option_of_a_command_without_fit_args_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(COMMANDS["compare"], ["--no_such_option=1"], prog="medtransfer compare")
    assert exit_info.value.code == 2
    assert "no_such_option" in capsys.readouterr().err


def test_a_data_module_is_an_option_never_a_positional():
    from medtransfer.commands.baseline import run_baseline

    usage = build_parser(run_baseline, prog="medtransfer baseline").format_usage()
    assert "--data" in usage and " data\n" not in usage


def test_options_after_the_double_dash_reach_a_fit_args_that_defaults_to_none(workdir, capsys):
    """``search``'s ``fit_args`` defaults to ``None``: options after ``--`` still reach it (here a bad space stops
    the search before any fit, with its own one-line error)."""
    space = workdir / "space.yaml"
    space.write_text("model.optimiser.lr: {type: float, low: 0.0001, high: 0.01}\n")
    with pytest.raises(SystemExit) as stopped:
        run_command(
            COMMANDS["search"], [f"--config={DEFAULT_CONFIG}", f"--space={space}", "--", "--trainer.max_epochs=1"]
        )
    assert stopped.value.code == 2
    assert "model.optimiser.lr" in capsys.readouterr().err
