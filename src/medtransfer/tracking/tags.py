"""What a run records beyond its config: where it ran, on what code and data, and its input pipeline."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer

__all__ = [
    "VERSIONED_PACKAGES",
    "dataset_tags",
    "describe_pipeline",
    "file_sha256",
    "git_tags",
    "resolved_data_params",
    "run_tags",
]

_logger = logging.getLogger(__name__)

#: Distributions whose versions every run records as ``version.<name>`` tags.
VERSIONED_PACKAGES = ("medtransfer", "torch", "lightning", "timm", "torchmetrics", "albumentations", "mlflow")

#: Constructor arguments of a data source that name the files defining the dataset (the first is the main one).
_SOURCE_FILES = ("csv_path", "labels_csv", "train_val_list", "test_list")


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()  # reads in chunks, never the whole file


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached by ``(path, size, mtime)``: repeated fits in one process hash a dataset once."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


file_sha256.cache_info = _sha256.cache_info  # type: ignore[attr-defined]


def git_tags(folder: str | Path | None = None) -> dict[str, str]:
    """``git.commit``, ``git.dirty`` and MLflow's ``mlflow.source.git.commit`` (shown in the UI) of the repository
    holding ``folder`` (default: the working directory); empty outside one or without ``git``."""
    folder = Path.cwd() if folder is None else Path(folder)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        _logger.info("No git information for %s: %s", folder, err)
        return {}
    commit = head.stdout.strip()
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return {"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def _source_files(datamodule: LightningDataModule) -> dict[str, Path]:
    """The files that define the dataset, by role: ``file`` (MedMNIST's npz), or a source's label table."""
    file = getattr(datamodule, "file", None)
    if file is not None:
        return {"file": Path(file)}
    arguments = getattr(getattr(datamodule, "source", None), "kwargs", None) or {}
    found = {key: Path(arguments[key]) for key in _SOURCE_FILES if arguments.get(key)}
    return {("file" if i == 0 else key): path for i, (key, path) in enumerate(found.items())}


def dataset_tags(datamodule: LightningDataModule | None) -> dict[str, str]:
    """``dataset.name``, ``dataset.file`` and ``dataset.sha256`` (the MedMNIST npz or a source's label CSV; other
    list files get ``dataset.<list>.sha256``), and ``dataset.manifest_sha256`` of the images actually used."""
    if datamodule is None:
        return {}
    tags = {"dataset.name": str(getattr(datamodule, "name", type(datamodule).__name__))}
    for role, path in _source_files(datamodule).items():
        if not path.is_file():
            continue
        if role == "file":
            tags.update({"dataset.file": str(path.resolve()), "dataset.sha256": file_sha256(path)})
        else:
            tags[f"dataset.{role}.sha256"] = file_sha256(path)
    manifest = getattr(datamodule, "manifest", None)
    if manifest is not None and len(manifest):
        tags["dataset.manifest_sha256"] = manifest.sha256()
    return tags


def _version(package: str) -> str | None:
    """The module's ``__version__`` (torch's carries its build, ``+cu130``), else the distribution's."""
    version = getattr(sys.modules.get(package), "__version__", None)
    if version is not None:
        return str(version)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_tags(trainer: Trainer, datamodule: LightningDataModule | None = None) -> dict[str, str]:
    """Every tag that places a run: git, dataset, ``version.<package>``, host, devices and ``precision``."""
    tags = git_tags()
    tags.update(dataset_tags(datamodule if datamodule is not None else trainer.datamodule))
    tags.update({f"version.{name}": v for name in VERSIONED_PACKAGES if (v := _version(name)) is not None})
    tags["version.python"] = platform.python_version()
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    tags.update(host=socket.gethostname(), accelerator=accelerator, devices=str(trainer.num_devices))
    tags.update(num_nodes=str(trainer.num_nodes), world_size=str(trainer.world_size), precision=str(trainer.precision))
    root_device = getattr(trainer.strategy, "root_device", None)
    if root_device is not None and root_device.type == "cuda":
        tags["device_name"] = torch.cuda.get_device_name(root_device)
    return tags


def _compact(value: Any) -> str:
    """A transform argument as short text: ``{'x': (a, b), 'y': (a, b)}`` reads ``(a, b)``."""
    if isinstance(value, Mapping) and set(value) == {"x", "y"} and value["x"] == value["y"]:
        value = value["x"]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_compact(v) for v in value) + ")"
    return str(value)


def _describe_step(step: Any) -> str:
    """``Name(arg=value, ...)`` with the arguments that differ from the constructor's defaults."""
    arguments = step.to_dict()["transform"] if hasattr(step, "to_dict") else {}
    name = arguments.pop("__class_fullname__", type(step).__name__)
    parameters = inspect.signature(type(step).__init__).parameters  # a parameter without default is always shown
    shown = [f"{k}={_compact(v)}" for k, v in arguments.items() if k not in parameters or parameters[k].default != v]
    return f"{name}({', '.join(shown)})"


def describe_pipeline(transform: Any) -> str:
    """An albumentations pipeline as one readable line: ``Resize(height=64, width=64) > Affine(...) > ...``."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return repr(transform)
    return " > ".join(_describe_step(step) for step in steps)


def resolved_data_params(datamodule: LightningDataModule | None) -> dict[str, str]:
    """``data.resolved.*`` params after ``setup``: image size, mean, std, interpolation and the pipelines applied."""
    params: dict[str, str] = {}
    spec = getattr(datamodule, "input_spec", None)
    if spec is not None:
        params["data.resolved.image_size"] = str(spec.size)
        params["data.resolved.mean"], params["data.resolved.std"] = _compact(spec.mean), _compact(spec.std)
        params["data.resolved.interpolation"] = str(spec.interpolation)
    datasets = getattr(datamodule, "datasets", None) or {}
    for split, key in (("train", "data.resolved.train_pipeline"), ("val", "data.resolved.eval_pipeline")):
        transform = getattr(datasets.get(split), "transform", None)
        if transform is not None:
            params[key] = describe_pipeline(transform)
    return params
