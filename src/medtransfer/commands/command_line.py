"""The one builder that turns a command's typed ``run_<command>`` function into its command line (jsonargparse).

Required parameters become positionals, a dataclass parameter a group (``--lr_find.phase``), and ``--config`` reads
a YAML file of the options (unless the function has its own ``config``, or its module names a ``ConfigFile``). With a
``fit_args`` parameter, every option not its own and everything after ``--`` goes to ``fit_args``, as written.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from medtransfer.errors import exit_on_user_error

__all__ = ["build_parser", "run_command"]

#: Options every parser understands, besides the function's own.
_PARSER_OPTIONS = {"help", "print_config"}


def build_parser(function: Callable[..., Any], prog: str | None = None) -> ArgumentParser:
    """The parser of ``function``'s command line."""
    description = (inspect.getdoc(function) or "").split("\n\n")[0]
    if _takes(function, "fit_args"):
        description += "\nEvery option that is not listed here (and all after `--`) goes to fit (see fit --help)."
    parser = ArgumentParser(prog=prog, description=description)
    if not (_takes(function, "config") or _takes(function, "fit_args")):  # else --config is the function's or fit's
        reader = getattr(sys.modules[function.__module__], "ConfigFile", ActionConfigFile)
        parser.add_argument("--config", action=reader, help="A YAML file of these options.")
    parser.add_function_arguments(function, as_positional=True)
    return parser


def run_command(target: str, args: list[str], prog: str | None = None) -> Any:
    """Parse ``args`` for the function ``target`` (``"module:function"``, see ``medtransfer.entry.COMMANDS``), call
    it, and return what it returns.

    Errors the user can fix end the process as one line on stderr (exit status 2)."""
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    with exit_on_user_error():
        parser = build_parser(function, prog)
        own, fit_args = _split_fit_args(parser, args) if _takes(function, "fit_args") else (list(args), [])
        with warnings.catch_warnings():  # instantiate_classes is jsonargparse's documented way in LightningCLI too
            warnings.filterwarnings("ignore", message=r".*instantiate_classes")
            init = parser.instantiate_classes(parser.parse_args(own))
        if not _takes(function, "config"):
            init.pop("config", None)
        if fit_args:  # after those given as --fit_args '[...]'
            init["fit_args"] = [*(init["fit_args"] or []), *fit_args]
        return function(**init)


def _takes(function: Callable[..., Any], parameter: str) -> bool:
    return parameter in inspect.signature(function).parameters


def _split_fit_args(parser: ArgumentParser, args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` split into the command's own (its options, their values, the positionals) and ``fit``'s (any
    other ``--option [value]``, and everything after ``--``)."""
    known = {*parser.get_defaults().keys(), *_PARSER_OPTIONS}
    own: list[str] = []
    fit: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if token == "--":
            fit += tokens
            break
        key = token[2:].split("=", 1)[0] if token.startswith("--") else None
        target = own if key is None or key in known else fit
        target.append(token)
        if key is not None and "=" not in token and tokens and not tokens[0].startswith("-"):
            target.append(tokens.pop(0))  # the option's value
    return own, fit
