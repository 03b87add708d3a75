"""Batch inference: a trained checkpoint over a folder, glob or CSV of images, to a CSV of decisions.

``medtransfer predict IMAGES CHECKPOINT --output predictions.csv`` (also ``python -m
medtransfer.predict``). Each row holds the path, one probability per class, the predicted label, the decision
with the stored (validation-fitted) threshold and abstention band — ``positive``/``negative``/``abstain`` for
a binary task — and an ``error`` for files that could not be read, which are skipped, never fatal. Rows are
streamed to a temporary file beside the output, renamed into place only when every image is done, so an
interrupted run never leaves half a CSV.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medtransfer.data.readers import SUPPORTED_SUFFIXES, read_image
from medtransfer.data.tables import read_csv_table, require_columns
from medtransfer.data.transforms import build_eval_transform
from medtransfer.errors import DataError, exit_on_user_error
from medtransfer.files import atomic_open
from medtransfer.models.classifier import ClassifierModule

__all__ = ["collect_images", "load_predictor", "main", "run_predict"]

_logger = logging.getLogger(__name__)


def collect_images(source: str, path_column: str = "path") -> list[Path]:
    """Image paths from a folder (recursive), a glob pattern, or a CSV with a ``path_column``."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file())
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


def load_predictor(checkpoint: str | Path, device: str = "cpu") -> tuple[ClassifierModule, dict[str, Any], list[str]]:
    """The model of a Lightning checkpoint (loaded with ``weights_only=True``), its input settings, class names."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"Checkpoint not found: {checkpoint}")
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = ClassifierModule.load_from_checkpoint(checkpoint, pretrained="none", map_location=device, weights_only=True)
    config = model.data_config
    settings = raw.get("input") or {
        "size": config["input_size"][-1], "mean": config["mean"], "std": config["std"],
        "interpolation": config.get("interpolation", "bilinear"), "channels": model.hparams.in_chans,
    }  # fmt: skip
    names = raw.get("class_names") or [str(i) for i in range(model.hparams.num_classes)]
    if model.hparams.task == "binary" and len(names) == 1:
        names = ["negative", names[0]]
    return model.eval().to(device), settings, names


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


def _rows(model: ClassifierModule, probs: torch.Tensor, names: list[str]) -> Iterator[dict[str, Any]]:
    decisions, abstains = model.decide(probs), model.abstains(probs)
    for p, decision, abstain in zip(probs.tolist(), decisions.tolist(), abstains.tolist(), strict=True):
        task = model.hparams.task
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


def run_predict(
    images: str,
    checkpoint: str,
    output: Path = Path("predictions.csv"),
    summary: Path | None = None,
    path_column: str = "path",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> dict[str, Any]:
    """Predict every image and write one CSV row each.

    Args:
        images: a folder (searched recursively), a glob pattern, or a CSV with a path column.
        checkpoint: a Lightning checkpoint written by ``medtransfer fit``.
        output: the CSV to write (atomically, when all images are done).
        summary: optional JSON with counts per decision, coverage and the unreadable files.
        path_column: the column of image paths when ``images`` is a CSV.
        batch_size: images per forward pass.
        num_workers: loader worker processes decoding images.
        device: ``auto`` uses a GPU when there is one.
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    paths = collect_images(images, path_column)
    model, settings, names = load_predictor(checkpoint, device)
    transform = build_eval_transform(
        settings["size"], settings["channels"], settings["mean"], settings["std"], settings["interpolation"]
    )
    loader = DataLoader(_Images(paths, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    output = Path(output)
    counts: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    columns = ["path", *(f"prob_{n}" for n in (names[1:] if model.hparams.task == "binary" else names))]
    columns += ["prediction", "decision", "error", "checkpoint"]
    start = time.perf_counter()
    with atomic_open(output, "w", newline="") as handle, torch.inference_mode():
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        progress = tqdm(total=len(paths), unit="img", desc="predict", disable=None)
        for indices, batch, failed in loader:
            if batch is not None:
                probs = model.predict_proba(model(batch.to(device))).cpu()
                for index, row in zip(indices, _rows(model, probs, names), strict=True):
                    counts[row["decision"]] += 1
                    writer.writerow({"path": str(paths[index]), **row, "error": "", "checkpoint": checkpoint})
            for index, error in failed:
                failures.append({"path": str(paths[index]), "error": error})
                writer.writerow({"path": str(paths[index]), "decision": "error", "error": error,
                                 "checkpoint": checkpoint})  # fmt: skip
            progress.update(len(indices) + len(failed))
        progress.close()
    seconds = time.perf_counter() - start
    decided = sum(v for k, v in counts.items() if not k.startswith("abstain"))
    result = {
        "images": len(paths), "predicted": sum(counts.values()), "unreadable": len(failures),
        "decisions": dict(counts), "coverage": decided / max(1, sum(counts.values())),
        "images_per_second": len(paths) / seconds if seconds else None, "output": str(output), "failures": failures,
    }  # fmt: skip
    if summary is not None:
        Path(summary).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['predicted']} predicted, {len(failures)} unreadable, coverage {result['coverage']:.1%} -> {output}")
    return result


def main(args: list[str] | None = None) -> None:
    """``medtransfer predict``: the typed ``run_predict`` as a command line (jsonargparse)."""
    from jsonargparse import auto_cli

    with exit_on_user_error():
        auto_cli(run_predict, args=args, prog="medtransfer predict")


if __name__ == "__main__":
    main()
