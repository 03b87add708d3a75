"""Batch inference: a trained checkpoint over a folder, glob or CSV of images, to a CSV of decisions.

``medtransfer predict IMAGES MODEL --output predictions.csv`` (also ``python -m
medtransfer.predict``). Each row holds the path, one probability per class, the predicted label, the decision
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
from tqdm import tqdm

from medtransfer.checkpoints import load_checkpoint
from medtransfer.data.readers import SUPPORTED_SUFFIXES, read_image
from medtransfer.data.tables import read_csv_table, require_columns
from medtransfer.data.transforms import build_eval_transform
from medtransfer.errors import DataError, exit_on_user_error
from medtransfer.explain import DEFAULT_METHOD, explain, map_box, map_peak, resolve_layer, save_overlay
from medtransfer.explain.methods import Method
from medtransfer.files import atomic_open, write_text_atomic
from medtransfer.models.classifier import ClassifierModule
from medtransfer.models.decision import DecisionRule
from medtransfer.models.inference import ProbabilityModel, input_settings
from medtransfer.tracking.mlflow import resolve_tracking_uri
from medtransfer.tracking.model_logging import tracking_at

__all__ = ["Predictor", "collect_images", "load_predictor", "main", "run_predict"]

_logger = logging.getLogger(__name__)


def collect_images(source: str, path_column: str = "path") -> list[Path]:
    """Image paths from a folder (recursive), a glob pattern, or a CSV with a ``path_column``."""
    path = Path(source)
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES and (p.is_file() or p.is_symlink())
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
    settings: dict[str, Any]
    label: str


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
    raw = load_checkpoint(checkpoint_path)
    classifier = ClassifierModule.load_from_checkpoint(
        checkpoint_path, pretrained="none", map_location="cpu", weights_only=True
    )
    task = classifier.hparams.task
    names = raw.get("class_names") or [str(i) for i in range(classifier.hparams.num_classes)]
    return Predictor(
        network=ProbabilityModel(classifier).eval().to(device),
        rule=classifier.decision_rule,
        task=task,
        class_names=_binary_names(task, [str(n) for n in names]),
        settings=input_settings(classifier, raw),
        label=str(model),
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
        settings=metadata["input"],
        label=label,
    )


class _Images(Dataset):
    """Decoded, transformed images; an unreadable file yields its error instead of failing the batch."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(image=read_image(self.paths[index]))["image"], ""
        except (DataError, OSError, ValueError) as err:  # one bad file never stops the run
            return index, None, str(err).splitlines()[0]


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, error) for i, x, error in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failed


def _rows(predictor: Predictor, probs: torch.Tensor) -> Iterator[dict[str, Any]]:
    rule, names, task = predictor.rule, predictor.class_names, predictor.task
    decisions, abstains = rule.decide(probs), rule.abstains(probs)
    for p, decision, abstain in zip(probs.tolist(), decisions.tolist(), abstains.tolist(), strict=True):
        if task == "binary":
            row = {f"prob_{names[1]}": round(p, 6), "prediction": names[decision]}
            row["decision"] = "abstain" if abstain else ("positive" if decision else "negative")
        elif task == "multiclass":
            row = {f"prob_{n}": round(v, 6) for n, v in zip(names, p, strict=True)}
            row["prediction"] = names[decision]
            row["decision"] = "abstain" if abstain else names[decision]
        else:
            row = {f"prob_{n}": round(v, 6) for n, v in zip(names, p, strict=True)}
            row["prediction"] = "|".join(n for n, d in zip(names, decision, strict=True) if d) or "none"
            referred = [n for n, a in zip(names, abstain, strict=True) if a]
            row["decision"] = "abstain:" + "|".join(referred) if referred else "decided"
        yield row


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
                 method: Method = DEFAULT_METHOD, layer: int | str | None = None) -> None:  # fmt: skip
        if which == "top_k" and top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}")
        self.network, self.folder, self.which, self.top_k = network, Path(folder), which, top_k
        self.predictor, self.method, self.layer = predictor, method, layer
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
            image = read_image(paths[j])
            full = nnf.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)
            full = full[0, 0].clamp(0, 1).numpy().astype(np.float32)
            suffix = "" if label is None else f"_{self.predictor.class_names[label]}"
            stem = self.folder / f"{indices[j]:06d}_{paths[j].stem}{suffix}"
            picture = str(save_overlay(stem.with_suffix(".png"), image, full))
            with atomic_open(stem.with_suffix(".npy"), "wb") as stream:
                np.save(stream, full)
            x, y, value = map_peak(full)
            box = map_box(full, BOX_THRESHOLD) or ("",) * 4
            values = [picture, str(stem.with_suffix(".npy")), f"{x:.1f}", f"{y:.1f}", f"{value:.4f}", *map(str, box)]
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
            images = torch.stack([transform(image=read_image(paths[i]))["image"] for i in chosen]).to(device)
            targets = self._targets(torch.stack([self.top_probs[i] for i in chosen]))
            self._write(images, [paths[i] for i in chosen], chosen, targets)


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
) -> dict[str, Any]:
    """Predict every image and write one CSV row each.

    Args:
        images: a folder (searched recursively), a glob pattern, or a CSV with a path column.
        model: a Lightning checkpoint written by ``medtransfer fit``, or an MLflow model URI it logged
            (``runs:/<run id>/model``, ``models:/<name>/<version or alias>``).
        output: the CSV to write (atomically, when all images are done).
        summary: optional JSON with counts per decision, coverage and the unreadable files.
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
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    paths = collect_images(images, path_column)
    predictor = load_predictor(model, device, tracking_uri)
    settings = predictor.settings
    network = prepare_network(predictor.network, channels_last, compile)
    transform = build_eval_transform(
        settings["size"], settings["channels"], settings["mean"], settings["std"], settings["interpolation"]
    )
    loader = DataLoader(
        _Images(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device == "cuda",
    )
    output = Path(output)
    counts: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    names = predictor.class_names
    columns = ["path", *(f"prob_{n}" for n in (names[1:] if predictor.task == "binary" else names))]
    columns += ["prediction", "decision", "error", "model"]
    explainer = None
    if heatmaps is not None:  # an exported graph has no layers: the maps come from the checkpoint logged beside it
        layered = predictor.network
        if not _has_layers(layered):
            layered = load_predictor(logged_checkpoint(str(model), tracking_uri), device).network
        explainer = _HeatmapWriter(layered, heatmaps, heatmaps_for, top_k, predictor, explain_method, explain_layer)
    if explainer is not None and heatmaps_for != "top_k":
        columns += [*HEATMAP_COLUMNS, *(["heatmap_finding"] if predictor.task == "multilabel" else [])]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stale = sorted(output.parent.glob(f".{output.name}.*.tmp"))
    if stale:  # a killed run cannot clean up; another run may still own one, so they are named, not deleted
        _logger.warning("%d temporary file(s) of an interrupted run beside %s (e.g. %s): not outputs, safe to delete",
                        len(stale), output, stale[0].name)  # fmt: skip
    start = time.perf_counter()
    csv_file = atomic_open(output, "w", newline="", encoding="utf-8", errors="backslashreplace")
    with csv_file as handle, torch.inference_mode(), _autocast(device, precision):
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        progress = tqdm(total=len(paths), unit="img", desc="predict", disable=None)
        for indices, batch, failed in loader:
            if batch is not None:
                batch = batch.to(device, non_blocking=True, memory_format=memory_format)
                probs = network(batch).float().cpu()
                rows = list(_rows(predictor, probs))
                if explainer is not None:
                    explainer.add(batch, probs, rows, [paths[i] for i in indices], indices)
                for index, row in zip(indices, rows, strict=True):
                    counts[row["decision"]] += 1
                    writer.writerow({"path": str(paths[index]), **row, "error": "", "model": predictor.label})
            for index, error in failed:
                failures.append({"path": str(paths[index]), "error": error})
                writer.writerow({"path": str(paths[index]), "decision": "error", "error": error,
                                 "model": predictor.label})  # fmt: skip
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
        "model": predictor.label, "failures": failures,
        "heatmaps": explainer.written if explainer is not None else [],
    }  # fmt: skip
    if summary is not None:
        write_text_atomic(Path(summary), json.dumps(result, indent=2) + "\n")
    print(f"{result['predicted']} predicted, {len(failures)} unreadable, coverage {result['coverage']:.1%} -> {output}")
    return result


def main(args: list[str] | None = None) -> None:
    """``medtransfer predict``: the typed ``run_predict`` as a command line (jsonargparse)."""
    from jsonargparse import auto_cli

    with exit_on_user_error():
        auto_cli(run_predict, args=args, prog="medtransfer predict")


if __name__ == "__main__":
    main()
