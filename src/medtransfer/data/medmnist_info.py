"""Typed view of the official MedMNIST 2D datasets and their MedMNIST+ file releases (``medmnist.INFO``).

Every URL, MD5, label and count comes from the installed ``medmnist`` package (3.0.2 points at Zenodo record
10519652, whose 28x28 OrganA/C/SMNIST files were re-released without blank samples). Sizes 64, 128 and 224
are the MedMNIST+ releases.

MedMNIST's ``"ordinal-regression"`` task (RetinaMNIST) is mapped to ``"multiclass"``; the original string is
kept in :attr:`MedMNISTInfo.official_task`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from medtransfer.errors import DataError

__all__ = ["MEDMNIST_FLAGS", "MedMNISTInfo", "Task", "get_medmnist_info"]

Task = Literal["binary", "multiclass", "multilabel"]
"""Training task: one sigmoid output, one softmax over classes, or one sigmoid per label."""

_TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class MedMNISTInfo:
    """Facts about one MedMNIST 2D dataset, as published in the official INFO.

    Attributes:
        flag: Lower-case dataset name, e.g. ``"pneumoniamnist"``.
        python_class: Class name in the ``medmnist`` package, e.g. ``"PneumoniaMNIST"``.
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"`` (ordinal regression maps to multiclass).
        official_task: The task string exactly as in the official INFO.
        n_channels: 1 for grayscale, 3 for RGB.
        labels: Class (or, for multilabel, finding) index -> name.
        n_samples: Official number of images per split (``train``, ``val``, ``test``).
        license: Licence of the released files.
        resources: Image size -> ``(url, md5)`` of the official ``.npz`` file.
    """

    flag: str
    python_class: str
    task: Task
    official_task: str
    n_channels: int
    labels: Mapping[int, str] = field(hash=False)
    n_samples: Mapping[str, int] = field(hash=False)
    license: str
    resources: Mapping[int, tuple[str, str]] = field(hash=False)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise DataError(f"MedMNIST {self.flag!r}: task must be one of {_TASKS}, got {self.task!r}")
        # Read-only views, so that the shared registry entries cannot be changed by accident.
        for name in ("labels", "n_samples", "resources"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def __deepcopy__(self, memo: dict) -> MedMNISTInfo:
        """Itself: the entry is immutable, and ``MappingProxyType`` cannot be copied (a model that refers to it,
        deep-copied by ``EMAWeightAveraging``, failed)."""
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes (multiclass/binary) or labels (multilabel)."""
        return len(self.labels)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Released image sizes, ascending."""
        return tuple(sorted(self.resources))

    def _check_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or size not in self.resources:
            sizes = ", ".join(str(s) for s in self.sizes)
            raise DataError(f"MedMNIST {self.flag!r} has no size {size!r}; available sizes: {sizes}")
        return size

    def filename(self, size: int = 28) -> str:
        """Official file name: ``{flag}.npz`` for size 28, ``{flag}_{size}.npz`` otherwise.

        Raises:
            DataError: If ``size`` was not released for this dataset.
        """
        size = self._check_size(size)
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def resource(self, size: int = 28) -> tuple[str, str]:
        """Return ``(url, md5)`` of the official file for ``size``.

        Raises:
            DataError: If ``size`` was not released for this dataset.
        """
        return self.resources[self._check_size(size)]


def _official_info() -> dict[str, dict]:
    """``medmnist.INFO``, read from ``medmnist/info.py`` alone.

    ``import medmnist`` (and so ``import medmnist.info``) runs the package ``__init__``, which imports torch,
    torchvision and the evaluator: seconds. ``info.py`` itself needs only ``os``, so it is executed on its own.
    """
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
        python_class=info["python_class"],
        task=_TASK_OF.get(info["task"], info["task"]),
        official_task=info["task"],
        n_channels=info["n_channels"],
        labels={int(index): name for index, name in info["label"].items()},
        n_samples=info["n_samples"],
        license=info["license"],
        resources={size: (info[f"url{s}"], info[f"MD5{s}"]) for size, s in suffix.items() if f"url{s}" in info},
    )


# The 2D datasets only: the six *3d flags hold volumes, which no datamodule here reads.
_REGISTRY: dict[str, MedMNISTInfo] = {
    flag: _entry(flag, info) for flag, info in _official_info().items() if not flag.endswith("3d")
}

MEDMNIST_FLAGS: tuple[str, ...] = tuple(_REGISTRY)
"""Flags of all registered MedMNIST 2D datasets, in the official order."""


def get_medmnist_info(flag: str) -> MedMNISTInfo:
    """Look up a MedMNIST 2D dataset by flag (case-insensitive), e.g. ``"pneumoniamnist"``.

    Raises:
        DataError: If the flag is unknown; the message lists the known flags.
    """
    key = flag.strip().lower() if isinstance(flag, str) else flag
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise DataError(f"Unknown MedMNIST dataset {flag!r}; known flags: {', '.join(_REGISTRY)}") from None
