"""One redaction for everything medtransfer records or prints: secret-named keys and URI credentials."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["REDACTED", "redact", "redact_yaml"]

REDACTED = "***"

#: Keys whose values are secrets, whatever they hold.
SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api_?key|access_?key|credential", re.IGNORECASE)

#: ``scheme://<userinfo>@``: the userinfo runs to the *last* ``@``, because SQLAlchemy and MLflow accept unescaped
#: ``/``, ``#``, ``?``, ``:``, ``@``, quotes and even spaces in a password, which ``urllib.parse`` would split on.
#: A string that is one URI is redacted to its last ``@``; a URI inside text (a log line) to the last ``@``
#: before whitespace.
_SCHEME = r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
_WHOLE_URI = re.compile(rf"^\s*{_SCHEME}.*@", re.DOTALL)
_URI_IN_TEXT = re.compile(rf"{_SCHEME}\S*@")


def redact(value: Any, key: Any = None) -> Any:
    """``value`` with every secret replaced by ``***``: the whole value under a secret-named ``key``, every
    secret-named entry of a mapping (nested, lists included), and the ``user:password@`` of every URI in a string.

    >>> redact("postgresql://alice:pa/ss#w?rd@db:5432/mlflow")
    'postgresql://***@db:5432/mlflow'
    >>> redact({"db_password": "hunter2", "team": "radiology"})
    {'db_password': '***', 'team': 'radiology'}
    """
    if key is not None and SECRET_KEY.search(str(key)):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        replacement = rf"\g<scheme>{REDACTED}@"
        return (
            _WHOLE_URI.sub(replacement, value, count=1)
            if _WHOLE_URI.match(value)
            else _URI_IN_TEXT.sub(replacement, value)
        )
    return value


def redact_yaml(text: str) -> str:
    """A YAML document (a config) with :func:`redact` applied to its values; its whole-line comments kept, at the
    top (inline comments are dropped by the round trip)."""
    comments = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    return comments + yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
