"""Reading checkpoints safely: tensors and plain values only (``weights_only=True``), never pickled code, and no
import a checkpoint names (class paths are checked against an allow-list before anything resolves them)."""

from __future__ import annotations

import functools
import pickle
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from medtransfer.errors import DataError

__all__ = ["TRUSTED_MODULES", "check_class_paths", "load_checkpoint"]

#: Top-level packages a checkpoint's class paths (optimizer, scheduler, ``class_path``) may name. Anything else
#: would be imported by jsonargparse when Lightning rebuilds the module from its hyper-parameters.
TRUSTED_MODULES = ("torch", "lightning", "medtransfer", "timm", "torchmetrics")
#: Keys whose string values name something to import, wherever they sit in the hyper-parameters.
_CLASS_PATH_KEYS = ("class_path", "_class_path")
_PLAIN = (str, int, float, bool, type(None))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``path`` loaded with ``weights_only=True``, checked to be a Lightning checkpoint that names no foreign code;
    every failure is one ``DataError`` naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        reason = next((line for line in lines if "GLOBAL" in line), None)
        if reason is None:  # not a payload: the bytes are no pickle at all (a text file, garbage)
            detail = next((line for line in lines if "invalid load key" in line), "not a pickle")
            raise DataError(f"{path}: not a checkpoint file ({detail})") from None
        raise DataError(
            f"{path}: refused to load: it holds pickled objects beyond tensors and plain values ({reason}); "
            "medtransfer loads checkpoints with weights_only=True"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError ... for damaged archives
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable checkpoint, damaged or truncated ({first})") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = f"keys {', '.join(map(str, list(checkpoint)[:5]))}" if isinstance(checkpoint, Mapping) else "no dict"
        raise DataError(
            f"{path}: not a Lightning checkpoint (no 'state_dict'; found {found}); give a checkpoint written by "
            "medtransfer fit (e.g. mlruns/<experiment>/<run>/checkpoints/last.ckpt)"
        )
    check_class_paths(path, checkpoint.get("hyper_parameters") or {})
    return checkpoint


def check_class_paths(path: str | Path, hyper_parameters: Mapping[str, Any]) -> None:
    """Raise ``DataError`` if a class path in ``hyper_parameters`` lies outside ``TRUSTED_MODULES``.

    jsonargparse resolves a callable-typed argument by importing the module it names (``optimizer: this.s`` would
    import ``this``) before any type check, so the values of ``ClassifierModule``'s non-plain arguments and of any
    ``class_path`` are checked as strings, importing nothing.
    """
    if not isinstance(hyper_parameters, Mapping):
        return
    for key, value in hyper_parameters.items():
        if key in _class_typed_arguments():
            strings = list(_strings(value))
        elif key in _CLASS_PATH_KEYS:
            strings = [value] if isinstance(value, str) else []
        else:
            if isinstance(value, Mapping):  # a nested ``class_path``/``init_args`` config
                check_class_paths(path, value)
            strings = []
        for name in strings:
            if name.split(".")[0] not in TRUSTED_MODULES:
                raise DataError(
                    f"{path}: refused to load: hyper-parameter {key!r} names {name!r}, outside the trusted modules "
                    f"({', '.join(TRUSTED_MODULES)}); a checkpoint may not make medtransfer import code"
                )


def _strings(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (nested mappings and sequences included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


@functools.cache
def _class_typed_arguments() -> frozenset[str]:
    """``ClassifierModule``'s constructor arguments whose type is not plain data (callables, classes)."""
    from medtransfer.models.classifier import ClassifierModule

    hints = typing.get_type_hints(ClassifierModule.__init__)
    return frozenset(name for name, hint in hints.items() if name != "return" and not _is_plain(hint))


def _is_plain(hint: Any) -> bool:
    if hint in _PLAIN:
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        return all(_is_plain(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)
    return False
