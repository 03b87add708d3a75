"""Batch inference: a trained checkpoint over a folder, glob or CSV of images, to a CSV of decisions.

``medtransfer predict IMAGES MODEL --output predictions.csv`` (also ``python -m
medtransfer.commands.predict``). Each row holds the path, one probability per class, the predicted label, the decision
with the stored (validation-fitted) threshold and abstention band — ``positive``/``negative``/``abstain`` for
a binary task — and an ``error`` for files that could not be read, which are skipped, never fatal. Rows are
streamed to a temporary file beside the output, renamed into place only when every image is done, so an
interrupted run never leaves half a CSV.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import heapq
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as nnf
from torch.utils.data import DataLoader, Dataset

from medtransfer.checkpoints import load_checkpoint
from medtransfer.data.readers import SUPPORTED_SUFFIXES, as_color, dicom_frame_count, is_color, read_image
from medtransfer.data.tables import read_csv_table, require_columns
from medtransfer.data.transforms import build_eval_transform
from medtransfer.data.unlike import unlike_reasons
from medtransfer.decisions.risk_control import guarantee_verdict
from medtransfer.decisions.rule import DecisionRule
from medtransfer.errors import DataError, exit_on_user_error
from medtransfer.explain import DEFAULT_METHOD, explain, map_box, map_peak, resolve_layer, save_overlay
from medtransfer.explain.methods import Method
from medtransfer.files import atomic_open, write_text_atomic
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.inference import ProbabilityModel, input_settings
from medtransfer.models.input_spec import InputSpec
from medtransfer.progress import Progress
from medtransfer.tracking.mlflow import resolve_tracking_uri
from medtransfer.tracking.model_logging import tracking_at

__all__ = ["Predictor", "collect_images", "load_predictor", "main", "run_predict"]

_logger = logging.getLogger(__name__)


def collect_images(source: str, path_column: str = "path") -> list[Path]:
    """Image paths from a folder (recursive), a glob pattern, or a CSV with a ``path_column``."""
    path = Path(source)
    if path.is_dir():
        return sorted(  # every entry but a folder: a broken link or a FIFO gets a row saying so, never dropped
            p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES and (p.is_symlink() or not p.is_dir())
        )
    if path.suffix.lower() == ".csv" and path.is_file():
        table = read_csv_table(path, "image list")
        require_columns(table, [path_column], path)
        return [p if p.is_absolute() else path.parent / p for p in map(Path, table[path_column])]
    matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
    if not matches:
        raise DataError(
            f"No images at {source}: expected a folder, a glob pattern or a CSV with a {path_column!r} column"
        )
    return matches


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
    return Predictor(
        network=ProbabilityModel(classifier).eval().to(device),
        rule=classifier.decision_rule,
        task=task,
        class_names=_binary_names(task, [str(n) for n in names]),
        settings=input_settings(classifier, raw),
        label=str(model),
        calibration=raw.get("calibration"),
    )


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


def _load_mlflow_model(uri: str, device: str, tracking_uri: str | None) -> Predictor:
    import mlflow
    from mlflow.exceptions import MlflowException

    with tracking_at(resolve_tracking_uri(tracking_uri)):
        try:
            metadata = mlflow.models.get_model_info(uri).metadata or {}
            network = mlflow.pytorch.load_model(uri, device=device)
            label = f"models:/{_registered_version(uri[len('models:/') :])}" if uri.startswith("models:/") else uri
        except (MlflowException, OSError) as err:
            raise DataError(f"Cannot load MLflow model {uri}: {str(err).splitlines()[0]}") from err
    if "decision" not in metadata:
        raise DataError(f"MLflow model {uri} was not logged by medtransfer (no decision rule in its metadata)")
    task = metadata["task"]
    return Predictor(
        network=network,
        rule=DecisionRule.from_dict(metadata["decision"]),
        task=task,
        class_names=_binary_names(task, metadata["class_names"]),
        settings=InputSpec.from_dict(metadata["input"]),
        label=label,
        calibration=metadata.get("calibration"),
    )


def read_as_trained(path: Path, color: str, frame: str | int, noted: set[str] | None = None) -> Any:
    """The image as the model's training read it: ``color`` (``gray``/``rgb``) and DICOM ``frame``. A colour file
    given to a gray model is turned into luma, a gray file given to a colour model replicated to RGB, as
    training did; the first such file of each kind is logged (``noted`` keeps the kinds already said)."""
    image = read_image(path, color="auto", frame=frame)
    found = "rgb" if is_color(image) else "gray"
    if found != color and noted is not None and found not in noted:
        noted.add(found)
        how = "converted to gray (ITU-R 601 luma)" if color == "gray" else "replicated to three channels"
        _logger.warning("The model was trained on %s images; %s images such as %s are %s, as in training",
                        color, found, path, how)  # fmt: skip
    return as_color(image, color)


def _every_frame(paths: list[Path]) -> tuple[list[Path], list[int | None]]:
    """Each multi-frame DICOM once per frame (``frame: all``), with its frame numbers; other files once (None)."""
    rows, frames = [], []
    for path in paths:
        count = dicom_frame_count(path)
        rows += [path] * count
        frames += list(range(count)) if count > 1 else [None]
    return rows, frames


class _Images(Dataset):
    """Decoded, transformed images; an unreadable file yields its error instead of failing the batch.
    ``frames``: per row, the DICOM frame to read (``None``: by ``frame``)."""

    def __init__(
        self, paths: list[Path], transform: Any, color: str = "gray", frame: str = "middle",
        frames: list[int | None] | None = None,
    ) -> None:  # fmt: skip
        self.paths, self.transform, self.color, self.frame = paths, transform, color, frame
        self.frames = frames or [None] * len(paths)
        self.noted: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            frame = self.frame if self.frames[index] is None else self.frames[index]
            image = read_as_trained(self.paths[index], self.color, frame, self.noted)
            return index, self.transform(image=image)["image"], ""
        except (DataError, OSError, ValueError) as err:  # one bad file never stops the run
            return index, None, " ".join(str(err).split())  # the whole reason, on one line


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, error) for i, x, error in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failed


def _rows(predictor: Predictor, probs: torch.Tensor) -> Iterator[dict[str, Any]]:
    rule, names, task = predictor.rule, predictor.class_names, predictor.task
    decisions, abstains = rule.decide(probs), rule.abstains(probs)
    sets = rule.prediction_sets(probs).tolist() if task == "multiclass" and rule.set_quantile is not None else None
    for i, (p, decision, abstain) in enumerate(zip(probs.tolist(), decisions.tolist(), abstains.tolist(), strict=True)):
        if task == "binary":
            row = {f"prob_{names[1]}": round(p, 6), "prediction": names[decision]}
            row["decision"] = "abstain" if abstain else ("positive" if decision else "negative")
        elif task == "multiclass":
            row = {f"prob_{n}": round(v, 6) for n, v in zip(names, p, strict=True)}
            row["prediction"] = names[decision]
            row["decision"] = "abstain" if abstain else names[decision]
            if sets is not None:  # the conformal set: more than one class means the case is referred
                row["prediction_set"] = "|".join(n for n, keep in zip(names, sets[i], strict=True) if keep)
        else:
            row = {f"prob_{n}": round(v, 6) for n, v in zip(names, p, strict=True)}
            row["prediction"] = "|".join(n for n, d in zip(names, decision, strict=True) if d) or "none"
            referred = [n for n, a in zip(names, abstain, strict=True) if a]
            row["decision"] = "abstain:" + "|".join(referred) if referred else "decided"
        yield row


def _count_findings(counts: dict[str, Counter[str]], names: list[str], decisions: torch.Tensor,
                    abstains: torch.Tensor) -> None:  # fmt: skip
    """Add a batch's multi-label decisions to ``positive``/``negative``/``abstain`` counts per finding."""
    for j, name in enumerate(names):
        counter = counts.setdefault(name, Counter())
        referred = abstains[:, j]
        counter["abstain"] += int(referred.sum())
        counter["positive"] += int((decisions[:, j].bool() & ~referred).sum())
        counter["negative"] += int((~decisions[:, j].bool() & ~referred).sum())


def _has_layers(network: torch.nn.Module) -> bool:
    return hasattr(getattr(network, "backbone", None), "forward_features")


def logged_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """The best checkpoint that ``medtransfer fit`` logged (``checkpoints/*.ckpt``) in the run of MLflow model
    ``uri``, downloaded: the same weights as the exported model, with the layers Grad-CAM needs."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tracking_at(resolve_tracking_uri(tracking_uri)):
        try:
            run_id = mlflow.models.get_model_info(uri).run_id
            client = mlflow.MlflowClient()
            logged = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints") if a.path.endswith(".ckpt"))
            best = Path(client.get_run(run_id).data.tags.get("best_checkpoint", "")).name
            chosen = next((path for path in logged if Path(path).name == best), logged[-1] if logged else None)
            if chosen is None:
                raise DataError(
                    f"--heatmaps needs the model's layers; {uri} is an exported graph and its run {run_id} logged "
                    "no checkpoint. Give a checkpoint file instead."
                )
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=chosen))
        except MlflowException as err:
            raise DataError(f"Cannot fetch the checkpoint of MLflow model {uri}: {str(err).splitlines()[0]}") from err


#: CSV columns of a written heatmap: the overlay, the raw map, its peak and the box of its hot region.
HEATMAP_COLUMNS = ("heatmap", "heatmap_npy", "peak_x", "peak_y", "peak_value", "box_x_min", "box_y_min",
                   "box_x_max", "box_y_max")  # fmt: skip
#: Share of a map's maximum that outlines the hot region whose box is written.
BOX_THRESHOLD = 0.5


class _HeatmapWriter:
    """Heatmaps for the selected images of each batch, or for the ``top_k`` most positive at the end (a bounded
    heap of probabilities, so memory stays flat). ``network`` has the layers (a checkpoint's).

    Per explained image (per finding above its threshold, for multi-label) it writes an overlay PNG and the raw
    map at the image's own size (``.npy``, float32 in [0, 1]); the row gets their paths, the peak's pixel
    ``x, y`` and value, and the box of the peak's region of ``map >= 0.5 * max`` (multi-label: ``|``-joined,
    one per finding in ``heatmap_finding``)."""

    def __init__(self, network: torch.nn.Module, folder: Path, which: str, top_k: int, predictor: Predictor,
                 method: Method = DEFAULT_METHOD, layer: int | str | None = None, *,
                 read: Callable[[int], Any]) -> None:  # fmt: skip
        if which == "top_k" and top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}")
        self.network, self.folder, self.which, self.top_k = network, Path(folder), which, top_k
        self.predictor, self.method, self.layer = predictor, method, layer
        self.read = read  # row -> the image as the model saw it: overlays of colour images are in colour
        if layer is not None:  # a wrong name fails now, before any image is read (occlusion ignores it)
            resolve_layer(network.backbone, layer)
        self.heap: list[tuple[float, int]] = []
        self.top_probs: dict[int, torch.Tensor] = {}
        self.written: list[str] = []

    def _score(self, probs: torch.Tensor) -> torch.Tensor:
        return probs if probs.ndim == 1 else probs.max(dim=-1).values

    def _targets(self, probs: torch.Tensor) -> list[list[int | None]]:
        """What each image's maps explain: the positive class / top class, or each label decided positive (the
        top label when none is)."""
        if self.predictor.task != "multilabel":
            return [[None] for _ in range(len(probs))]
        decided = self.predictor.rule.decide(probs)
        return [d.nonzero().flatten().tolist() or [int(p.argmax())] for d, p in zip(decided, probs, strict=True)]

    def _write(self, images: torch.Tensor, paths: list[Path], indices: list[int], targets: list) -> list[dict]:
        pairs = [(j, t) for j, labels in enumerate(targets) for t in labels]
        rows = [j for j, _ in pairs]
        target = None if pairs[0][1] is None else torch.tensor([t for _, t in pairs], device=images.device)
        with torch.autocast(images.device.type, enabled=False):
            maps = explain(self.network, images[rows].float(), target, self.method, self.layer).cpu()
        columns: list[dict[str, list[str]]] = [{} for _ in paths]
        for (j, label), heat in zip(pairs, maps, strict=True):
            image = self.read(indices[j])
            full = nnf.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)
            full = full[0, 0].clamp(0, 1).numpy().astype(np.float32)
            suffix = "" if label is None else f"_{self.predictor.class_names[label]}"
            stem = self.folder / f"{indices[j]:06d}_{paths[j].stem}{suffix}"
            picture = str(save_overlay(stem.with_suffix(".png"), image, full).resolve())  # usable from any folder
            with atomic_open(stem.with_suffix(".npy"), "wb") as stream:
                np.save(stream, full)
            x, y, value = map_peak(full)
            box = map_box(full, BOX_THRESHOLD) or ("",) * 4
            raw = str(stem.with_suffix(".npy").resolve())
            values = [picture, raw, f"{x:.1f}", f"{y:.1f}", f"{value:.4f}", *map(str, box)]
            for name, text in zip(HEATMAP_COLUMNS, values, strict=True):
                columns[j].setdefault(name, []).append(text)
            if label is not None:
                columns[j].setdefault("heatmap_finding", []).append(self.predictor.class_names[label])
            self.written.append(picture)
        return [{name: "|".join(texts) for name, texts in row.items()} for row in columns]

    def add(self, batch: torch.Tensor, probs: torch.Tensor, rows: list[dict], paths: list[Path], indices: list[int]):
        if self.which == "top_k":
            for score, index in zip(self._score(probs).tolist(), indices, strict=True):
                (heapq.heappush if len(self.heap) < self.top_k else heapq.heappushpop)(self.heap, (score, index))
            kept = {index for _, index in self.heap}  # the probabilities of the heap's images, for their targets
            self.top_probs = {
                i: p for i, p in [*self.top_probs.items(), *zip(indices, probs, strict=True)] if i in kept
            }
            return
        chosen = [j for j, row in enumerate(rows) if self._selected(row["decision"])]
        if chosen:
            targets = self._targets(probs[chosen])
            written = self._write(batch[chosen], [paths[j] for j in chosen], [indices[j] for j in chosen], targets)
            for j, columns in zip(chosen, written, strict=True):
                rows[j].update(columns)

    def _selected(self, decision: str) -> bool:
        if self.which == "all":
            return True
        if self.which == "abstain":
            return decision.startswith("abstain")
        return decision not in ("negative",) and not decision.startswith("abstain")

    def write_top_k(self, paths: list[Path], transform: Any, device: str) -> None:
        chosen = [index for _, index in sorted(self.heap, reverse=True)]
        if chosen:
            images = torch.stack([transform(image=self.read(i))["image"] for i in chosen]).to(device)
            targets = self._targets(torch.stack([self.top_probs[i] for i in chosen]))
            self._write(images, [paths[i] for i in chosen], chosen, targets)


def _check_writable(option: str, target: Path, images: str) -> None:
    """Refuse an output path before any work: an existing folder, a parent that is a file or cannot be written,
    or the input image list itself (which the output would silently replace). Missing parents are created."""
    if target.is_dir():
        raise DataError(f"{option} {target}: is a directory; give a file name, e.g. {target / 'predictions.csv'}")
    source = Path(images)
    if source.is_file() and target.resolve() == source.resolve():
        raise DataError(f"{option} {target}: is the input image list; it would be overwritten, give another name")
    parent = next((p for p in (target.parent, *target.parent.parents) if p.exists()), Path("/"))
    if not parent.is_dir():
        raise DataError(f"{option} {target}: cannot be created, {parent} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        raise DataError(f"{option} {target}: cannot be written ({err.strerror or err})") from None


Precision = Literal["32", "bf16", "16"]


def _autocast(device: str, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "16" and device == "cpu":
        raise DataError("--precision 16 needs a GPU; on the CPU use --precision bf16 or 32")
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prepare_network(
    network: torch.nn.Module, channels_last: bool = False, compile: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network with the requested memory format and, optionally, compiled by ``torch.compile``."""
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return torch.compile(network) if compile else network


def run_predict(
    images: str,
    model: str,
    output: Path = Path("predictions.csv"),
    summary: Path | None = None,
    heatmaps: Path | None = None,
    heatmaps_for: Literal["all", "positive", "abstain", "top_k"] = "all",
    top_k: int = 20,
    explain_method: Method = DEFAULT_METHOD,
    explain_layer: int | str | None = None,
    path_column: str = "path",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Precision = "32",
    channels_last: bool = False,
    compile: bool = False,
    tracking_uri: str | None = None,
    frame: Literal["first", "middle", "all", "error"] | None = None,
) -> dict[str, Any]:
    """Predict every image and write one CSV row each.

    Args:
        images: a folder (searched recursively), a glob pattern, or a CSV with a path column.
        model: a Lightning checkpoint written by ``medtransfer fit``, or an MLflow model URI it logged
            (``runs:/<run id>/model``, ``models:/<name>/<version or alias>``).
        output: the CSV to write (atomically, when all images are done).
        summary: optional JSON with counts per decision, coverage and the unreadable files; a multi-label model
            counts images ``decided`` on every finding or with an ``abstain``, and, under ``findings``, the
            ``positive``/``negative``/``abstain`` decisions per finding (also printed at the end).
        heatmaps: optional folder for heatmaps of the positive class (binary), the predicted class (multiclass) or
            each label decided positive (multi-label; the top label when none is): an overlay over the original
            image (``<row>_<name>[_<finding>].png``) and the raw map at the image's size (``.npy``, float32 in
            [0, 1]), listed in the columns ``heatmap``, ``heatmap_npy``, with the peak (``peak_x``, ``peak_y``
            in the image's pixels, ``peak_value``) and the box of the peak's region of ``map >= 0.5 * max``
            (``box_x_min`` .. ``box_y_max``); multi-label rows join one value per finding with ``|`` and name
            them in ``heatmap_finding``. For an MLflow model (an exported graph without layers) the maps come
            from the checkpoint logged in the same run (same weights).
        heatmaps_for: which images get one: ``all``, those decided ``positive`` (or, for multi-class and
            multi-label, decided at all), the ``abstain``-ed ones (referred to a radiologist), or the ``top_k``
            most positive (highest probability of the explained class; chosen after all rows are written).
        top_k: how many images ``heatmaps_for: top_k`` explains.
        explain_method: how heatmaps are made (:func:`medtransfer.explain.explain`): ``occlusion`` (default:
            the score's drop under a sliding grey patch; model-agnostic, 225 forward passes per image, the most
            robust on planted lesions at 64 px), or the fast gradient maps ``fusion`` (LayerCAM fused over the
            stride-8, -16 and -32 stages), ``layercam``, ``gradcam`` (on the last stage by default: 2x2 cells at
            64 px).
        explain_layer: the stage explained (fusion: the shallowest fused), as an index into the backbone's
            ``feature_info`` (0 = first, -1 = last) or a module name such as ``blocks.2``; default: the
            method's own.
        path_column: the column of image paths when ``images`` is a CSV.
        batch_size: images per forward pass.
        num_workers: loader worker processes decoding images.
        device: ``auto`` uses a GPU when there is one.
        precision: ``32``, or autocast to ``bf16`` (GPU or CPU) / ``16`` (GPU) for speed.
        channels_last: NHWC memory format (faster convolutions on recent GPUs and some CPUs).
        compile: ``torch.compile`` the network first (pays off on large folders).
        tracking_uri: MLflow store for ``runs:/`` and ``models:/`` URIs (default: ``$MLFLOW_TRACKING_URI``,
            else ``mlruns/mlflow.db``).
        frame: which frame of a multi-frame DICOM to predict (``first``, ``middle``), ``all`` (one row per
            frame, numbered in a ``frame`` column), or ``error`` to report such files as unreadable; ``None``: the
            model's ``dicom_frame``. Images are read in the model's colour
            (``color`` in its input settings); files of the other kind are converted as in training (logged).
    """
    for name, target in (("--output", output), ("--summary", summary)):
        if target is not None:
            _check_writable(name, Path(target), images)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    paths = collect_images(images, path_column)
    predictor = load_predictor(model, device, tracking_uri)
    settings = predictor.settings
    network = prepare_network(predictor.network, channels_last, compile)
    color, frame = settings.color, frame or settings.dicom_frame
    frames: list[int | None] = [None] * len(paths)
    if frame == "all":  # one row per frame; files of one frame read it as their first
        paths, frames = _every_frame(paths)
    read_frame = "first" if frame == "all" else frame
    transform = build_eval_transform(
        settings.size, settings.channels, settings.mean, settings.std, settings.interpolation, color=color,
    )  # fmt: skip
    loader = DataLoader(
        _Images(paths, transform, color, read_frame, frames),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device == "cuda",
    )
    output = Path(output)
    counts: Counter[str] = Counter()
    findings: dict[str, Counter[str]] = {}  # multi-label: positive/negative/abstain per finding
    failures: list[dict[str, str]] = []
    names = predictor.class_names
    columns = ["path", *(f"prob_{n}" for n in (names[1:] if predictor.task == "binary" else names))]
    columns += ["prediction", *(["prediction_set"] if predictor.rule.set_quantile is not None else []), "decision"]
    columns += ["unlike_training", "error", "model", *(["frame"] if frame == "all" else [])]
    reference = settings.reference  # statistics of the validation images (medtransfer.data.unlike)
    unlike = 0

    def _frame_of(row: int) -> str | int:
        return read_frame if frames[row] is None else frames[row]

    def _frame_column(row: int) -> dict[str, Any]:
        return {"frame": "" if frames[row] is None else frames[row]} if frame == "all" else {}

    explainer = None
    if heatmaps is not None:  # an exported graph has no layers: the maps come from the checkpoint logged beside it
        layered = predictor.network
        if not _has_layers(layered):
            layered = load_predictor(logged_checkpoint(str(model), tracking_uri), device).network
        explainer = _HeatmapWriter(layered, heatmaps, heatmaps_for, top_k, predictor, explain_method, explain_layer,
                                   read=lambda row: read_as_trained(paths[row], color, _frame_of(row)))  # fmt: skip
    if explainer is not None and heatmaps_for != "top_k":
        columns += [*HEATMAP_COLUMNS, *(["heatmap_finding"] if predictor.task == "multilabel" else [])]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stale = sorted(output.parent.glob(f".{output.name}.*.tmp"))
    if stale:  # a killed run cannot clean up; another run may still own one, so they are named, not deleted
        _logger.warning("%d temporary file(s) of an interrupted run beside %s (e.g. %s): not outputs, safe to delete",
                        len(stale), output, stale[0].name)  # fmt: skip
    start = time.perf_counter()
    seen_probs: list[torch.Tensor] = []
    csv_file = atomic_open(output, "w", newline="", encoding="utf-8", errors="backslashreplace")
    with csv_file as handle, torch.inference_mode(), _autocast(device, precision):
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        progress = Progress(len(paths), "predict")  # images/s on a terminal, or a line every 30 s in a log
        for indices, batch, failed in loader:
            if batch is not None:
                batch = batch.to(device, non_blocking=True, memory_format=memory_format)
                probs = network(batch).float().cpu()
                seen_probs.append(probs)
                rows = list(_rows(predictor, probs))
                for row, reason in zip(rows, unlike_reasons(batch, reference), strict=True):
                    row["unlike_training"], unlike = reason, unlike + bool(reason)
                if explainer is not None:
                    explainer.add(batch, probs, rows, [paths[i] for i in indices], indices)
                if predictor.task == "multilabel":
                    _count_findings(findings, names, predictor.rule.decide(probs), predictor.rule.abstains(probs))
                for index, row in zip(indices, rows, strict=True):
                    counts["abstain" if predictor.task == "multilabel" and row["decision"] != "decided"
                           else row["decision"]] += 1  # fmt: skip
                    writer.writerow({"path": str(paths[index]), **row, "error": "", "model": predictor.label,
                                     **_frame_column(index)})  # fmt: skip
            for index, error in failed:
                failures.append({"path": str(paths[index]), "error": error})
                writer.writerow({"path": str(paths[index]), "decision": "error", "error": error,
                                 "model": predictor.label, **_frame_column(index)})  # fmt: skip
            progress.update(len(indices) + len(failed))
        progress.close()
    if explainer is not None and heatmaps_for == "top_k":
        explainer.write_top_k(paths, transform, device)
    seconds = time.perf_counter() - start
    decided = sum(v for k, v in counts.items() if not k.startswith("abstain"))
    result = {
        "images": len(paths), "predicted": sum(counts.values()), "unreadable": len(failures),
        "decisions": dict(counts), "coverage": decided / max(1, sum(counts.values())),
        "images_per_second": len(paths) / seconds if seconds else None, "output": str(output),
        "model": predictor.label, "failures": failures, "unlike_training": unlike if reference else None,
        "heatmaps": explainer.written if explainer is not None else [],
    }  # fmt: skip
    if predictor.task == "multilabel":
        result["findings"] = {name: dict(findings.get(name, {})) for name in names}
    result["guarantee"] = guarantee_verdict(predictor.rule, predictor.calibration, seen_probs)
    if summary is not None:
        write_text_atomic(Path(summary), json.dumps(result, indent=2) + "\n")
    print(f"{result['predicted']} predicted, {len(failures)} unreadable, coverage {result['coverage']:.1%} -> {output}")
    if unlike:
        _logger.warning("%d of %d image(s) are unlike the images %s was validated on (column unlike_training): "
                        "its decisions on them are unreliable.\nHINT: other modality, colour or blank images?",
                        unlike, result["predicted"], predictor.label)  # fmt: skip
    for name, count in result.get("findings", {}).items():
        print(f"  {name}: " + ", ".join(f"{count.get(k, 0)} {k}" for k in ("positive", "negative", "abstain")))
    return result


def main(args: list[str] | None = None) -> None:
    """``medtransfer predict``: the typed ``run_predict`` as a command line (jsonargparse)."""
    from jsonargparse import auto_cli

    with exit_on_user_error():
        auto_cli(run_predict, args=args, prog="medtransfer predict")


if __name__ == "__main__":
    main()
