"""The kind of classification task, named once for every layer (data, models, decisions, metrics, commands)."""

from typing import Literal

__all__ = ["Task"]

#: binary: one probability per image; multiclass: one class of several; multilabel: any subset of findings.
Task = Literal["binary", "multiclass", "multilabel"]
