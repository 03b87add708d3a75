"""What ``medtransfer predict`` runs: a trained model loaded from a checkpoint or an MLflow model URI, the images
read as its training read them, and a ``LightningModule`` face for ``Trainer.predict``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import Dataset

from medtransfer.checkpoints import load_checkpoint
from medtransfer.data.readers import as_color, dicom_frame_count, is_color, read_image
from medtransfer.data.transforms import build_eval_transform
from medtransfer.decisions.rule import DecisionRule
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.inference import ProbabilityModel, input_settings
from medtransfer.models.input_spec import InputSpec

__all__ = ["ImageRows", "PredictModule", "Predictor", "every_frame", "explainable_network", "load_predictor",
           "read_as_trained"]  # fmt: skip

_logger = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A trained model ready for batch prediction, from a checkpoint or an MLflow model.

    ``network`` maps normalised images to probabilities (``ProbabilityModel`` or its MLflow export), ``rule``
    turns them into decisions and referrals, ``settings`` describe the input it was trained on, and ``label``
    names the model in every output row (checkpoint path, or MLflow URI with the registered version).
    """

    network: torch.nn.Module
    rule: DecisionRule
    task: str
    class_names: list[str]
    settings: InputSpec
    label: str
    calibration: dict[str, Any] | None = None

    @property
    def share_names(self) -> list[str]:
        """What its class shares (``--prevalence``) are named by: both classes of a binary task, else each class
        or finding."""
        return self.class_names[:2] if self.task == "binary" else self.class_names


def _binary_names(task: str, names: list[str]) -> list[str]:
    return ["negative", names[0]] if task == "binary" and len(names) == 1 else names


def load_predictor(model: str | Path, device: str = "cpu", tracking_uri: str | None = None) -> Predictor:
    """A checkpoint file (loaded with ``weights_only=True``) or an MLflow model URI (``runs:/<id>/model``,
    ``models:/<name>/<version or alias>``; loaded from its ``torch.export`` archive, no pickle)."""
    if _is_model_uri(str(model)):
        return _load_mlflow_model(str(model), device, tracking_uri)
    checkpoint_path = Path(model)
    if not checkpoint_path.is_file():
        raise DataError(f"Checkpoint not found: {checkpoint_path} (or give an MLflow URI: runs:/<run id>/model)")
    raw = load_checkpoint(checkpoint_path)  # one DataError naming the file for anything but a safe checkpoint
    try:
        classifier = ClassifierModule.load_from_checkpoint(
            checkpoint_path, pretrained="none", map_location="cpu", weights_only=True
        )
    except (KeyError, RuntimeError, TypeError, ValueError) as err:  # weights or hyper-parameters that do not fit
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{checkpoint_path}: not a medtransfer model checkpoint ({first})") from None
    task = classifier.hparams.task
    names = raw.get("class_names") or [str(i) for i in range(classifier.hparams.num_classes)]
    return Predictor(network=ProbabilityModel(classifier).eval().to(device), rule=classifier.decision_rule, task=task,
                     class_names=_binary_names(task, [str(n) for n in names]), settings=input_settings(classifier, raw),
                     label=str(model), calibration=raw.get("calibration"))  # fmt: skip


def _registered_version(reference: str) -> str:
    """``name/version`` for ``name/<version>``, ``name@<alias>`` or ``name/<stage or 'latest'>``."""
    import mlflow

    client = mlflow.MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return f"{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, ref = reference.partition("/")
    if ref.isdigit():
        return reference
    stages = None if ref.lower() == "latest" else [ref]
    latest = client.get_latest_versions(name, stages=stages)
    return f"{name}/{max(int(v.version) for v in latest)}" if latest else reference


def _is_model_uri(model: str) -> bool:
    return model.split(":", 1)[0] in ("runs", "models", "file", "mlflow-artifacts", "s3", "gs", "http", "https")


@contextmanager
def _mlflow_store(tracking_uri: str | None, failure: str) -> Iterator[None]:
    """The MLflow store of ``tracking_uri``; its errors become one DataError starting with ``failure``."""
    from mlflow.exceptions import MlflowException

    from medtransfer.tracking.mlflow import resolve_tracking_uri
    from medtransfer.tracking.model_logging import tracking_at  # MLflow: only for a model URI

    with tracking_at(resolve_tracking_uri(tracking_uri)):
        try:
            yield
        except (MlflowException, OSError) as err:
            raise DataError(f"{failure}: {str(err).splitlines()[0]}") from err


def _load_mlflow_model(uri: str, device: str, tracking_uri: str | None) -> Predictor:
    import mlflow

    with _mlflow_store(tracking_uri, f"Cannot load MLflow model {uri}"):
        metadata = mlflow.models.get_model_info(uri).metadata or {}
        network = mlflow.pytorch.load_model(uri, device=device)
        label = f"models:/{_registered_version(uri[len('models:/') :])}" if uri.startswith("models:/") else uri
    if "decision" not in metadata:
        raise DataError(f"MLflow model {uri} was not logged by medtransfer (no decision rule in its metadata)")
    task = metadata["task"]
    return Predictor(network=network, rule=DecisionRule.from_dict(metadata["decision"]), task=task,
                     class_names=_binary_names(task, metadata["class_names"]),
                     settings=InputSpec.from_dict(metadata["input"]), label=label,
                     calibration=metadata.get("calibration"))  # fmt: skip


def read_as_trained(path: Path | bytes, color: str, frame: str | int, noted: set[str] | None = None) -> Any:
    """The image (a file, or an upload's bytes) as the model's training read it: ``color`` (``gray``/``rgb``) and
    DICOM ``frame``. A colour file given to a gray model is turned into luma, a gray file given to a colour model
    replicated to RGB, as training did; the first such file of each kind is logged (``noted`` keeps the kinds
    already said)."""
    image = read_image(path, color="auto", frame=frame)
    found = "rgb" if is_color(image) else "gray"
    if found != color and noted is not None and found not in noted:
        noted.add(found)
        how = "converted to gray (ITU-R 601 luma)" if color == "gray" else "replicated to three channels"
        _logger.warning("The model was trained on %s images; %s images such as %s are %s, as in training",
                        color, found, "uploads" if isinstance(path, bytes) else path, how)  # fmt: skip
    return as_color(image, color)


def every_frame(paths: list[Path]) -> tuple[list[Path], list[int | None]]:
    """Each multi-frame DICOM once per frame (``frame: all``), with its frame numbers; other files once (None)."""
    rows, frames = [], []
    for path in paths:
        count = dicom_frame_count(path)
        rows += [path] * count
        frames += list(range(count)) if count > 1 else [None]
    return rows, frames


class ImageRows(Dataset):
    """Decoded, transformed images; an unreadable file yields its error instead of failing the batch.
    ``frames``: per row, the DICOM frame to read (``frame: all``; ``None`` in it: by ``frame``), else ``None``."""

    def __init__(
        self, paths: list[Path], transform: Any, color: str = "gray", frame: str = "middle",
        frames: list[int | None] | None = None,
    ) -> None:  # fmt: skip
        self.paths, self.transform, self.color, self.frame, self.frames = paths, transform, color, frame, frames
        self.noted: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int, noted: set[str] | None = None) -> Any:
        """Row ``index``'s image as the model's training read it (:func:`read_as_trained`)."""
        frame = self.frame if self.frames is None or self.frames[index] is None else self.frames[index]
        return read_as_trained(self.paths[index], self.color, frame, noted)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(image=self.read(index, self.noted))["image"], ""
        except (DataError, OSError, ValueError) as err:  # one bad file never stops the run
            return index, None, " ".join(str(err).split())  # the whole reason, on one line

    @staticmethod
    def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
        """A batch of ``(indices of the read rows, their images or None, [(index, error)] of the unread)``."""
        good = [(i, x) for i, x, _ in items if x is not None]
        failed = [(i, error) for i, x, error in items if x is None]
        images = torch.stack([x for _, x in good]) if good else None
        return [i for i, _ in good], images, failed


def image_rows(paths: list[Path], settings: InputSpec, frame: str | None) -> ImageRows:
    """The images read and transformed as in training; ``frame: all`` gives a multi-frame DICOM a row per frame."""
    frame = frame or settings.dicom_frame
    frames = None
    if frame == "all":  # one row per frame; files of one frame read it as their first
        paths, frames = every_frame(paths)
    transform = build_eval_transform(
        settings.size, settings.channels, settings.mean, settings.std, settings.interpolation, color=settings.color,
    )  # fmt: skip
    return ImageRows(paths, transform, settings.color, "first" if frame == "all" else frame, frames)


def explainable_network(predictor: Predictor, model: str, device: str, tracking_uri: str | None) -> torch.nn.Module:
    """The network with the layers heatmaps need: the predictor's own, or for an exported graph (an MLflow model)
    the best checkpoint ``medtransfer fit`` logged in the same run (same weights)."""
    if hasattr(getattr(predictor.network, "backbone", None), "forward_features"):
        return predictor.network
    import mlflow

    with _mlflow_store(tracking_uri, f"Cannot fetch the checkpoint of MLflow model {model}"):
        run_id = mlflow.models.get_model_info(model).run_id
        client = mlflow.MlflowClient()
        logged = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints") if a.path.endswith(".ckpt"))
        best = Path(client.get_run(run_id).data.tags.get("best_checkpoint", "")).name
        chosen = next((path for path in logged if Path(path).name == best), logged[-1] if logged else None)
        if chosen is None:
            raise DataError(
                f"--heatmaps needs the model's layers; {model} is an exported graph and its run {run_id} logged "
                "no checkpoint. Give a checkpoint file instead."
            )
        checkpoint = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=chosen))
    return load_predictor(checkpoint, device).network


class PredictModule(LightningModule):
    """A served network (``ProbabilityModel`` or its ``torch.export`` graph from MLflow) for ``Trainer.predict``:
    a batch of :class:`ImageRows` to probabilities (``None`` when every file of the batch was unreadable).

    An exported graph refuses ``train()``/``eval()``, which Lightning calls on every submodule, so it is kept
    unregistered: it stays on the device it was loaded on, and batches are moved to it."""

    def __init__(self, network: torch.nn.Module, channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        served = torch.compile(network) if compile else network
        self.graph_device: torch.device | None = None
        if isinstance(network, torch.fx.GraphModule):
            self.graph_device = next(iter([*network.parameters(), *network.buffers()])).device
            object.__setattr__(self, "network", served)  # not a submodule: see the class docstring
        else:
            self.network = served

    def predict_step(self, batch: tuple[list[int], torch.Tensor | None, list], batch_idx: int) -> torch.Tensor | None:
        _, images, _ = batch
        if images is None:
            return None
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.graph_device is not None:
            images = images.to(self.graph_device)
        return self.network(images).double()  # float64: see models.classifier.probabilities
