"""Typed view of the official MedMNIST 2D datasets and their MedMNIST+ releases (sizes 64, 128, 224).

Every URL, MD5, label and count comes from the installed ``medmnist`` package's ``INFO``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import get_args

from medtransfer.errors import DataError
from medtransfer.task import Task

__all__ = ["MedMNISTInfo", "get_medmnist_info"]

_TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class MedMNISTInfo:
    """Facts about one MedMNIST 2D dataset (``flag`` e.g. ``"pneumoniamnist"``), as published in the official INFO:
    ``labels`` maps class index -> name, ``resources`` image size -> ``(url, md5)`` of the official ``.npz``."""

    flag: str
    task: Task
    n_channels: int
    labels: Mapping[int, str] = field(hash=False)
    resources: Mapping[int, tuple[str, str]] = field(hash=False)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise DataError(f"MedMNIST {self.flag!r}: task must be one of {_TASKS}, got {self.task!r}")
        for name in ("labels", "resources"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def __deepcopy__(self, memo: dict) -> MedMNISTInfo:
        """Itself: the entry is immutable, and ``MappingProxyType`` cannot be copied (a model that refers to it,
        deep-copied by ``EMAWeightAveraging``, failed)."""
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.resources))

    def _check_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size not in self.resources:
            sizes = ", ".join(str(s) for s in self.sizes)
            raise DataError(f"MedMNIST {self.flag!r} has no size {size!r}; available sizes: {sizes}")
        return size

    def filename(self, size: int = 28) -> str:
        """Official file name: ``{flag}.npz`` for size 28, ``{flag}_{size}.npz`` otherwise."""
        size = self._check_size(size)
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def resource(self, size: int = 28) -> tuple[str, str]:
        """``(url, md5)`` of the official file for ``size`` (``DataError`` for a size not released)."""
        return self.resources[self._check_size(size)]


def _official_info() -> dict[str, dict]:
    """``medmnist.INFO``, from ``medmnist/info.py`` alone: ``import medmnist`` imports torch, torchvision and the
    evaluator (seconds), while ``info.py`` needs only ``os``."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The medmnist package is not installed; run `pip install medmnist`")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_medtransfer_medmnist_info", path)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


#: Official task string -> training task; ordinal regression (RetinaMNIST) is trained as multiclass.
_TASK_OF = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "multiclass",
}


def _entry(flag: str, info: Mapping) -> MedMNISTInfo:
    suffix = {28: ""} | {size: f"_{size}" for size in (64, 128, 224)}
    return MedMNISTInfo(
        flag=flag,
        task=_TASK_OF.get(info["task"], info["task"]),
        n_channels=info["n_channels"],
        labels={int(index): name for index, name in info["label"].items()},
        resources={size: (info[f"url{s}"], info[f"MD5{s}"]) for size, s in suffix.items() if f"url{s}" in info},
    )


# The 2D datasets only: the six *3d flags hold volumes, which no datamodule here reads.
_REGISTRY: dict[str, MedMNISTInfo] = {
    flag: _entry(flag, info) for flag, info in _official_info().items() if not flag.endswith("3d")
}


def get_medmnist_info(flag: str) -> MedMNISTInfo:
    """A MedMNIST 2D dataset by flag (case-insensitive), e.g. ``"pneumoniamnist"``; an unknown flag is a
    ``DataError`` listing the known ones."""
    key = flag.strip().lower() if isinstance(flag, str) else flag
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise DataError(f"Unknown MedMNIST dataset {flag!r}; known flags: {', '.join(_REGISTRY)}") from None
