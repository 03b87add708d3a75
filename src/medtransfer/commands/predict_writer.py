"""The rows of ``medtransfer predict``, streamed by a ``BasePredictionWriter`` as ``Trainer.predict`` yields each
batch; under DDP each rank streams its own rows and rank 0 merges them, in input order, into the one CSV."""

from __future__ import annotations

import csv
import heapq
import logging
import signal
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.nn import functional as nnf
from torch.utils.data import DataLoader

from medtransfer import explain as heatmap_methods  # torch's Captum and matplotlib: imported on first heatmap
from medtransfer.commands.predictor import Predictor
from medtransfer.data.unlike import unlike_reasons
from medtransfer.decisions import prevalence as shift
from medtransfer.decisions.prevalence import Prevalence
from medtransfer.decisions.risk_control import guarantee_verdict
from medtransfer.errors import DataError
from medtransfer.explain.choices import DEFAULT_METHOD, Method
from medtransfer.files import atomic_open
from medtransfer.progress import Progress

__all__ = ["HEATMAP_COLUMNS", "HeatmapWriter", "PredictionWriter", "adapt_prevalence", "csv_columns", "full_size_map",
           "heatmap_targets", "prediction_rows"]  # fmt: skip

_logger = logging.getLogger(__name__)


def prediction_rows(predictor: Predictor, probs: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Per image, its probability columns, ``prediction``, ``decision`` (and ``prediction_set``) by the model's rule."""
    rule, names, task = predictor.rule, predictor.class_names, predictor.task
    decisions, abstains = rule.decide(probs), rule.abstains(probs)
    sets = rule.prediction_sets(probs).tolist() if task == "multiclass" and rule.set_quantile is not None else None
    for i, (p, decision, abstain) in enumerate(zip(probs.tolist(), decisions.tolist(), abstains.tolist(), strict=True)):
        if task == "binary":
            row = {f"prob_{names[1]}": p, "prediction": names[decision]}
            row["decision"] = "abstain" if abstain else ("positive" if decision else "negative")
        elif task == "multiclass":
            row = {f"prob_{n}": v for n, v in zip(names, p, strict=True)}
            row["prediction"] = names[decision]
            row["decision"] = "abstain" if abstain else names[decision]
            if sets is not None:  # the conformal set: more than one class means the case is referred
                row["prediction_set"] = "|".join(n for n, keep in zip(names, sets[i], strict=True) if keep)
        else:
            row = {f"prob_{n}": v for n, v in zip(names, p, strict=True)}
            row["prediction"] = "|".join(n for n, d in zip(names, decision, strict=True) if d) or "none"
            referred = [n for n, a in zip(names, abstain, strict=True) if a]
            row["decision"] = "abstain:" + "|".join(referred) if referred else "decided"
        yield row


def csv_columns(predictor: Predictor, per_frame: bool, heatmaps: bool) -> list[str]:
    """The CSV's columns: path, probabilities, decisions, checks, and the ``frame`` and heatmap columns when on."""
    names, task = predictor.class_names, predictor.task
    columns = ["path", *(f"prob_{n}" for n in (names[1:] if task == "binary" else names))]
    columns += ["prediction", *(["prediction_set"] if predictor.rule.set_quantile is not None else []), "decision"]
    columns += ["unlike_training", "error", "model", *(["frame"] if per_frame else [])]
    if heatmaps:
        columns += [*HEATMAP_COLUMNS, *(["heatmap_finding"] if task == "multilabel" else [])]
    return columns


def _count_findings(counts: dict[str, Counter[str]], names: list[str], decisions: torch.Tensor,
                    abstains: torch.Tensor) -> None:  # fmt: skip
    """Add a batch's multi-label decisions to ``positive``/``negative``/``abstain`` counts per finding."""
    for j, name in enumerate(names):
        referred, positive = abstains[:, j], decisions[:, j].bool()
        found = {"abstain": referred, "positive": positive & ~referred, "negative": ~positive & ~referred}
        counts.setdefault(name, Counter()).update({key: int(mask.sum()) for key, mask in found.items()})


def heatmap_targets(predictor: Predictor, probs: torch.Tensor) -> list[list[int | None]]:
    """What each image's maps explain: the positive class / top class, or each label decided positive (the top
    label when none is)."""
    if predictor.task != "multilabel":
        return [[None] for _ in range(len(probs))]
    decided = predictor.rule.decide(probs)
    return [d.nonzero().flatten().tolist() or [int(p.argmax())] for d, p in zip(decided, probs, strict=True)]


def full_size_map(heat: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A heatmap at the model's input size resized to the image's ``(H, W)``: float32 in [0, 1]."""
    full = nnf.interpolate(heat[None, None], size=shape, mode="bilinear", align_corners=False)
    return full[0, 0].clamp(0, 1).numpy().astype(np.float32)


#: CSV columns of a written heatmap: the overlay, the raw map, its peak and the box of its hot region.
HEATMAP_COLUMNS = ("heatmap", "heatmap_npy", "peak_x", "peak_y", "peak_value", "box_x_min", "box_y_min",
                   "box_x_max", "box_y_max")  # fmt: skip
#: Share of a map's maximum that outlines the hot region whose box is written.
BOX_THRESHOLD = 0.5


class HeatmapWriter:
    """Heatmaps for the selected images of each batch, or for the ``top_k`` most positive at the end (a bounded
    heap, so memory stays flat). Per explained image (per finding decided positive, multi-label) an overlay PNG
    and the raw map at the image's size (``.npy``, float32 in [0, 1]); the row gets their paths, the peak and the
    box of the peak's region of ``map >= 0.5 * max`` (multi-label: ``|``-joined, named in ``heatmap_finding``)."""

    def __init__(self, network: torch.nn.Module, folder: Path, which: str, top_k: int, predictor: Predictor,
                 method: Method = DEFAULT_METHOD, layer: int | str | None = None, *,
                 read: Callable[[int], Any]) -> None:  # fmt: skip
        if which == "top_k" and top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}")
        self.network, self.folder, self.which, self.top_k = network, Path(folder), which, top_k
        self.predictor, self.method, self.layer = predictor, method, layer
        self.read = read  # row -> the image as the model saw it: overlays of colour images are in colour
        if layer is not None:  # a wrong name fails now, before any image is read (occlusion ignores it)
            heatmap_methods.resolve_layer(network.backbone, layer)
        self.heap: list[tuple[float, int]] = []
        self.top_probs: dict[int, torch.Tensor] = {}
        self.written: list[str] = []

    def _write(self, images: torch.Tensor, paths: list[Path], indices: list[int], targets: list) -> list[dict]:
        pairs = [(j, t) for j, labels in enumerate(targets) for t in labels]
        rows = [j for j, _ in pairs]
        target = None if pairs[0][1] is None else torch.tensor([t for _, t in pairs], device=images.device)
        with torch.autocast(images.device.type, enabled=False):
            maps = heatmap_methods.explain(self.network, images[rows].float(), target, self.method, self.layer).cpu()
        columns: list[dict[str, list[str]]] = [{} for _ in paths]
        for (j, label), heat in zip(pairs, maps, strict=True):
            image = self.read(indices[j])
            full = full_size_map(heat, image.shape[:2])
            suffix = "" if label is None else f"_{self.predictor.class_names[label]}"
            stem = self.folder / f"{indices[j]:06d}_{paths[j].stem}{suffix}"
            overlay = heatmap_methods.save_overlay(stem.with_suffix(".png"), image, full)
            picture = str(overlay.resolve())  # usable from any folder
            with atomic_open(stem.with_suffix(".npy"), "wb") as stream:
                np.save(stream, full)
            x, y, value = heatmap_methods.map_peak(full)
            box = heatmap_methods.map_box(full, BOX_THRESHOLD) or ("",) * 4
            raw = str(stem.with_suffix(".npy").resolve())
            values = [picture, raw, f"{x:.1f}", f"{y:.1f}", f"{value:.4f}", *map(str, box)]
            if label is not None:
                values.append(self.predictor.class_names[label])
            for name, text in zip((*HEATMAP_COLUMNS, "heatmap_finding"), values, strict=False):
                columns[j].setdefault(name, []).append(text)
            self.written.append(picture)
        return [{name: "|".join(texts) for name, texts in row.items()} for row in columns]

    def add(self, batch: torch.Tensor, probs: torch.Tensor, rows: list[dict], paths: list[Path], indices: list[int]):
        if self.which == "top_k":
            scores = probs if probs.ndim == 1 else probs.max(dim=-1).values
            for score, index in zip(scores.tolist(), indices, strict=True):
                (heapq.heappush if len(self.heap) < self.top_k else heapq.heappushpop)(self.heap, (score, index))
            kept = {index for _, index in self.heap}  # the probabilities of the heap's images, for their targets
            self.top_probs = {
                i: p for i, p in [*self.top_probs.items(), *zip(indices, probs, strict=True)] if i in kept
            }
            return
        chosen = [j for j, row in enumerate(rows) if self._selected(row["decision"])]
        if chosen:
            targets = heatmap_targets(self.predictor, probs[chosen])
            written = self._write(batch[chosen], [paths[j] for j in chosen], [indices[j] for j in chosen], targets)
            for j, columns in zip(chosen, written, strict=True):
                rows[j].update(columns)

    def _selected(self, decision: str) -> bool:
        abstained = decision.startswith("abstain")
        if self.which == "abstain":
            return abstained
        return self.which == "all" or (decision != "negative" and not abstained)

    def merge(self, others: list[dict[str, Any]]) -> None:
        """Take in the ``state()`` of the other ranks' writers (DDP): their written maps and top-k candidates."""
        for other in others:
            self.written += other["written"]
            self.heap, self.top_probs = self.heap + other["heap"], {**self.top_probs, **other["top_probs"]}
        self.heap = heapq.nsmallest(self.top_k, self.heap, key=lambda item: (-item[0], item[1]))
        heapq.heapify(self.heap)

    def state(self) -> dict[str, Any]:
        return {"written": self.written, "heap": self.heap, "top_probs": self.top_probs}

    def write_top_k(self, paths: list[Path], transform: Any) -> None:
        chosen = [index for _, index in sorted(self.heap, reverse=True)]
        if chosen:
            device = next(self.network.parameters()).device
            images = torch.stack([transform(image=self.read(i))["image"] for i in chosen]).to(device)
            targets = heatmap_targets(self.predictor, torch.stack([self.top_probs[i] for i in chosen]))
            self._write(images, [paths[i] for i in chosen], chosen, targets)


class PredictionWriter(BasePredictionWriter):
    """Write each predicted batch's rows to ``output`` as they come (renamed into place at the end, removed when
    the run fails), and tally what the summary reports. ``paths`` and ``frames`` (``frame: all``) are per row, in
    input order; ``reference``: the validation images' statistics (``unlike_training``)."""

    def __init__(self, output: Path, predictor: Predictor, paths: list[Path], columns: list[str],
                 frames: list[int | None] | None = None, reference: dict[str, Any] | None = None,
                 heatmaps: HeatmapWriter | None = None) -> None:  # fmt: skip
        super().__init__(write_interval="batch")
        self.output, self.predictor, self.paths, self.columns = output, predictor, paths, columns
        self.frames, self.reference, self.heatmaps = frames, reference, heatmaps
        self.counts: Counter[str] = Counter()
        self.findings: dict[str, Counter[str]] = {}  # multi-label: positive/negative/abstain per finding
        self.failures: list[dict[str, str]] = []
        self.unlike = 0
        self.probs: list[torch.Tensor] = []
        self.interrupted: BaseException | None = None
        self.is_global_zero = True  # under DDP only rank 0 holds the merged CSV and tallies, and reports them
        self._files = ExitStack()

    def _part(self, rank: int) -> Path:
        """Where rank ``rank`` streams its rows under DDP; rank 0 merges the parts into ``output``."""
        return self.output.with_name(f".{self.output.name}.rank{rank}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.is_global_zero = trainer.is_global_zero
        target = self.output if trainer.world_size == 1 else self._part(trainer.global_rank)
        handle = self._files.enter_context(
            atomic_open(target, "w", newline="", encoding="utf-8", errors="backslashreplace")
        )
        index = [] if trainer.world_size == 1 else ["_index"]  # the row's place in the input, for the merge
        self.csv = csv.DictWriter(handle, fieldnames=[*index, *self.columns])
        self.csv.writeheader()
        # images/s on a terminal, or a line every 30 s in a log; rank 0 counts its share
        self.progress = (
            Progress(-(-len(self.paths) // trainer.world_size), "predict") if trainer.is_global_zero else None
        )

    def _write(self, trainer: Trainer, index: int, row: dict[str, Any]) -> None:
        frame = {} if self.frames is None else {"frame": "" if self.frames[index] is None else self.frames[index]}
        place = {} if trainer.world_size == 1 else {"_index": index}
        self.csv.writerow({**place, "path": str(self.paths[index]), **row, "model": self.predictor.label, **frame})

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: torch.Tensor | None, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        indices, images, failed = batch
        written: list[tuple[int, dict[str, Any]]] = []  # the batch's rows, good and unreadable, in input order
        if prediction is not None:
            probs = prediction.cpu()
            self.probs.append(probs)
            rows = list(prediction_rows(self.predictor, probs))
            for row, reason in zip(rows, unlike_reasons(images, self.reference), strict=True):
                row["unlike_training"], self.unlike = reason, self.unlike + bool(reason)
            if self.heatmaps is not None:
                self.heatmaps.add(images, probs, rows, [self.paths[i] for i in indices], indices)
            self._tally(probs, rows)
            written += [(index, {**row, "error": ""}) for index, row in zip(indices, rows, strict=True)]
        for index, error in failed:
            self.failures.append({"path": str(self.paths[index]), "error": error})
            written.append((index, {"decision": "error", "error": error}))
        for index, row in sorted(written, key=lambda item: item[0]):
            self._write(trainer, index, row)
        if self.progress is not None:
            self.progress.update(len(indices) + len(failed))

    def _tally(self, probs: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        """Count the decisions of ``rows`` (and, multi-label, per finding) for the summary."""
        if self.predictor.task == "multilabel":
            rule = self.predictor.rule
            _count_findings(self.findings, self.predictor.class_names, rule.decide(probs), rule.abstains(probs))
        for row in rows:
            self.counts["abstain" if self.predictor.task == "multilabel" and row["decision"] != "decided"
                        else row["decision"]] += 1  # fmt: skip

    def adapt(self, prevalence: Callable[[torch.Tensor], Prevalence | None]) -> Prevalence | None:
        """Re-read the finished CSV, get the class shares of its probabilities from ``prevalence`` (estimated or
        given), and rewrite its probability, ``prediction`` and ``decision`` columns adapted to them (Bayes'
        re-weighting; heatmaps stay those of the unadapted decisions); the tallies follow. ``None`` (nothing
        rewritten) when ``prevalence`` gives none."""
        with self.output.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        good = [row for row in rows if not row["error"]]
        task, names = self.predictor.task, self.predictor.class_names
        columns = [f"prob_{n}" for n in (names[1:] if task == "binary" else names)]
        probs = torch.tensor([[float(row[c]) for c in columns] for row in good], dtype=torch.float64)
        probs = probs.reshape(len(good), len(columns))  # also when every file was unreadable
        probs = probs[:, 0] if task == "binary" else probs
        shares = prevalence(probs)
        if shares is None:
            return None
        adapted = shift.adapt_probabilities(probs, shares.source, shares.estimated, task)
        self.counts, self.findings = Counter(), {}
        new_rows = list(prediction_rows(self.predictor, adapted))
        self._tally(adapted, new_rows)
        for row, new in zip(good, new_rows, strict=True):
            row.update(new)
        with atomic_open(self.output, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        return shares

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.progress is not None:
            self.progress.close()
        self._files.close()  # the CSV (under DDP: this rank's part) is complete: renamed into place
        if trainer.world_size > 1:
            self._merge(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.interrupted = exception  # Lightning turns a KeyboardInterrupt into exit(1); run_predict re-raises it
        self._files.__exit__(type(exception), exception, exception.__traceback__)  # removes the temporary file

    def _merge(self, trainer: Trainer) -> None:
        """Rank 0 takes in every rank's rows (in input order) and tallies; the other ranks' parts are removed."""
        states = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, self._state())
        if not trainer.is_global_zero:
            return
        rows: dict[int, dict[str, str]] = {}
        for rank in range(trainer.world_size):
            part = self._part(rank)
            with part.open(newline="", encoding="utf-8") as handle:
                rows.update((int(row.pop("_index")), row) for row in csv.DictReader(handle))
            part.unlink()
        with atomic_open(self.output, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows[index] for index in sorted(rows))
        for state in states[1:]:
            self.counts.update(state["counts"])
            for name, counter in state["findings"].items():
                self.findings.setdefault(name, Counter()).update(counter)
            self.failures += state["failures"]
            self.unlike, self.probs = self.unlike + state["unlike"], self.probs + state["probs"]
        if self.heatmaps is not None:
            self.heatmaps.merge([state["heatmaps"] for state in states[1:]])

    def _state(self) -> dict[str, Any]:
        heatmaps = self.heatmaps.state() if self.heatmaps is not None else None
        return {"counts": self.counts, "findings": self.findings, "failures": self.failures, "unlike": self.unlike,
                "probs": self.probs, "heatmaps": heatmaps}  # fmt: skip


def summarise(writer: PredictionWriter, predictor: Predictor, images: int, seconds: float, output: Path,
               explainer: HeatmapWriter | None) -> dict[str, Any]:  # fmt: skip
    """The fields of the run's ``PredictSummary`` from the writer's tallies, with the guarantee's verdict on these
    probabilities."""
    counts, predicted = writer.counts, sum(writer.counts.values())
    decided = sum(v for k, v in counts.items() if not k.startswith("abstain"))
    findings = None
    if predictor.task == "multilabel":
        findings = {name: dict(writer.findings.get(name, {})) for name in predictor.class_names}
    return dict(
        images=images, predicted=predicted, unreadable=len(writer.failures), decisions=dict(counts),
        coverage=decided / max(1, predicted), images_per_second=images / seconds if seconds else None,
        output=str(output), model=predictor.label, failures=writer.failures,
        unlike_training=writer.unlike if predictor.settings.reference else None,
        heatmaps=explainer.written if explainer is not None else [], findings=findings,
        guarantee=guarantee_verdict(predictor.rule, predictor.calibration, writer.probs),
    )  # fmt: skip


def adapt_prevalence(writer: PredictionWriter, predictor: Predictor, shares: str | list[float],
                     method: shift.PrevalenceMethod) -> dict[str, Any]:  # fmt: skip
    """Adapt the written CSV to the estimated or given class shares; the summary's ``prevalence`` entry."""
    result = writer.adapt(lambda probs: shift.batch_prevalence(probs, predictor.calibration, predictor.task, shares,
                                                               method, predictor.label))  # fmt: skip
    return shift.summary_entry(result, predictor.share_names, shares, method)


def predict_rows(module: LightningModule, loader: DataLoader, writer: PredictionWriter, device: str,
                 devices: int | str, precision: str, inference_mode: bool) -> None:  # fmt: skip
    """``Trainer.predict`` with ``writer`` streaming the rows (heatmaps need gradients: no inference mode then).
    A Ctrl-C stays a ``KeyboardInterrupt`` (Lightning would exit with status 1 and leave SIGINT ignored)."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # "GPU available: ..." lines: not ours
    level, handler = quiet.level, signal.getsignal(signal.SIGINT)
    quiet.setLevel(logging.WARNING)
    try:
        trainer = Trainer(
            accelerator="gpu" if device == "cuda" else device, devices=devices, precision=precision,
            inference_mode=inference_mode, callbacks=[writer], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        with warnings.catch_warnings():  # the number of workers is the --num_workers the user chose
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
            warnings.filterwarnings("ignore", message=r"predict returned None")  # a batch of unreadable files only
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's, not ours
            trainer.predict(module, loader, return_predictions=False)
    except SystemExit:
        if isinstance(writer.interrupted, KeyboardInterrupt):
            raise writer.interrupted from None
        raise
    finally:
        quiet.setLevel(level)
        signal.signal(signal.SIGINT, handler)
