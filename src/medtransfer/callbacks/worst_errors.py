"""Worst-errors gallery: the validation/test images the model got wrong with the most confidence.

A check a radiologist can read: are the confident mistakes label noise, artefacts or hard cases, and does the
heatmap look at the lungs?
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from medtransfer.errors import MedtransferError
from medtransfer.files import write_text_atomic
from medtransfer.plots import save_figure
from medtransfer.tracking.callbacks import log_artifacts, run_folder

__all__ = ["WorstErrorsGallery", "denormalise", "plot_gallery"]

_logger = logging.getLogger(__name__)


@dataclass(order=True)
class _Case:
    """One candidate, ordered by ``score`` (how wrong), then by arrival."""

    score: float
    order: int
    index: int
    label: int
    finding: int  # multi-label: which output the case is about; -1 otherwise
    image: Tensor
    logit: Tensor


def denormalise(image: Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalised ``(C, H, W)`` input back to a ``uint8`` ``(H, W)`` or ``(H, W, 3)`` image; a mean/std whose
    length differs from ``C`` is averaged (gray input, RGB statistics)."""
    image = image.detach().float().cpu()
    channels = image.shape[0]
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if len(mean_t) != channels:
        mean_t, std_t = mean_t.mean().expand(channels), std_t.mean().expand(channels)
    pixels = (image * std_t[:, None, None] + mean_t[:, None, None]).clamp(0, 1)
    array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if channels == 1 else array[..., :3]


def plot_gallery(pictures: list[np.ndarray], titles: list[str], ncols: int = 4, title: str = "") -> Figure:
    """A grid of images (``uint8``, gray or RGB), each with a short caption."""
    ncols = max(1, min(ncols, len(pictures)))
    nrows = max(1, -(-len(pictures) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, caption in zip(axes.flat, pictures, titles, strict=False):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class WorstErrorsGallery(Callback):
    """Save the ``k`` most confidently wrong validation (and test) images with label, probability and heatmap.

    A forward hook reads each evaluation batch's input and logits (no second pass) and a bounded heap per true
    class (and finding, for multi-label tasks) keeps the ``k`` best candidates, so memory stays at ``2k`` images.
    The threshold fitted on that same validation epoch then decides which are wrong; they are ranked by
    ``1 - p(label)``. A multi-label panel is one finding of one image, its heatmap the evidence for that finding.

    Writes ``worst_errors_{val,test}.{png,csv}`` (``index`` is the position in the evaluation loader) after
    ``test``, ``validate`` and at the end of ``fit`` (with ``every_n_epochs`` also during fit), to ``dirpath``
    and the MLflow run's ``diagnostics/``. Under DDP rank 0 draws its own shard.

    Args:
        k: number of images in the gallery.
        every_n_epochs: also draw the validation gallery every this many epochs during fit (0: only at the end).
        heatmap: overlay :func:`medtransfer.explain.explain`'s heatmap (positive class, or the decided class).
        ncols: images per row.
        dirpath: folder for the PNG/CSV files; ``None``: ``<root>/<experiment>/<run>/diagnostics``.
    """

    def __init__(
        self, k: int = 16, every_n_epochs: int = 0, heatmap: bool = True, ncols: int = 4, dirpath: str | None = None
    ) -> None:
        if k < 1:
            raise ValueError(f"Expected argument `k` to be at least 1, but got {k}")
        if every_n_epochs < 0:
            raise ValueError(f"Expected argument `every_n_epochs` to be >= 0, but got {every_n_epochs}")
        self.k, self.every_n_epochs, self.heatmap, self.ncols, self.dirpath = k, every_n_epochs, heatmap, ncols, dirpath
        self.paths: list[Path] = []
        self._heaps: dict[int, list[_Case]] = {}
        self._seen: dict[int, int] = {}
        self._order = itertools.count()
        self._captured: tuple[Tensor, Tensor] | None = None
        self._handle: RemovableHandle | None = None
        self._pending_val = False  # the last validation epoch of fit is collected but not drawn yet

    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self._captured = (args[0], output)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _collect(self, pl_module: LightningModule, batch: Any, dataloader_idx: int) -> None:
        """Offer this batch's cases to the heaps: per true label (and finding) ranked by logit, as the threshold is
        not final yet; for multiclass tasks one heap of misclassified images (argmax needs no threshold)."""
        captured, self._captured = self._captured, None
        if captured is None or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return
        x, logits, y = captured[0], captured[1].detach().float(), batch[1].detach().long()
        offset = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = offset + len(y)
        images, findings, row_logits = torch.arange(len(y)), torch.full((len(y),), -1), logits
        if pl_module.hparams.task == "multilabel":  # one candidate per (image, finding)
            images = images.repeat_interleave(y.shape[1])
            findings = torch.arange(y.shape[1]).repeat(len(y))
            y, logits = y.reshape(-1), logits.reshape(-1)
        if pl_module.hparams.task in ("binary", "multilabel"):
            # each finding has its own threshold: wrongness is monotone in the logit only within one finding
            buckets, scores = y + 2 * findings.clamp(min=0), torch.where(y == 1, -logits, logits)
        else:
            probs = pl_module.predict_proba(logits)
            scores = 1 - probs.gather(1, y[:, None]).squeeze(1)
            scores = scores.masked_fill(probs.argmax(dim=1) == y, float("-inf"))
            buckets = torch.zeros_like(y)
        copies: dict[int, tuple[Tensor, Tensor]] = {}
        for bucket in buckets.unique().tolist():
            rows = torch.nonzero((buckets == bucket) & torch.isfinite(scores)).squeeze(1)
            best = rows[scores[rows].topk(min(self.k, len(rows))).indices]
            heap = self._heaps.setdefault(bucket, [])
            for row in best.tolist():
                image = int(images[row])
                if image not in copies:  # one copy per image, shared by its findings' cases
                    copies[image] = (x[image].detach().to("cpu", copy=True), row_logits[image].to("cpu", copy=True))
                case = _Case(float(scores[row]), next(self._order), offset + image, int(y[row]), int(findings[row]),
                             *copies[image])  # fmt: skip
                if len(heap) < self.k:
                    heapq.heappush(heap, case)
                else:
                    heapq.heappushpop(heap, case)

    def worst(self, pl_module: LightningModule) -> list[dict[str, Any]]:
        """At most ``k`` collected cases the current threshold gets wrong, most confident first: ``index``,
        ``finding`` (-1 unless multi-label), ``label``, ``decision``, ``prob`` (of the positive class, or of the
        decision for multiclass), ``prob_label`` (of the true label) and ``image``."""
        cases = [case for heap in self._heaps.values() for case in heap]
        if not cases:
            return []
        with torch.no_grad():
            probs = pl_module.predict_proba(torch.stack([c.logit for c in cases]).to(pl_module.device)).cpu()
            decisions = pl_module.decide(probs.to(pl_module.device)).cpu()
        labels = torch.tensor([c.label for c in cases])
        if pl_module.hparams.task == "multilabel":  # each case is one finding of its image
            column = torch.tensor([c.finding for c in cases])[:, None]
            probs, decisions = probs.gather(1, column).squeeze(1), decisions.long().gather(1, column).squeeze(1)
        if pl_module.hparams.task in ("binary", "multilabel"):
            prob, prob_label = probs, torch.where(labels == 1, probs, 1 - probs)
        else:
            prob = probs.gather(1, decisions[:, None]).squeeze(1)
            prob_label = probs.gather(1, labels[:, None]).squeeze(1)
        rows = [
            {
                "index": c.index,
                "finding": c.finding,
                "label": c.label,
                "decision": int(decisions[i]),
                "prob": float(prob[i]),
                "prob_label": float(prob_label[i]),
                "image": c.image,
            }
            for i, c in enumerate(cases)
            if decisions[i] != labels[i]
        ]
        return sorted(rows, key=lambda row: (row["prob_label"], row["index"], row["finding"]))[: self.k]

    def _heatmaps(self, pl_module: LightningModule, images: Tensor, findings: list[int]) -> Tensor | None:
        if not self.heatmap:
            return None
        from medtransfer.explain import explain  # imported when needed: drawing is rare

        target = torch.tensor(findings, device=images.device) if pl_module.hparams.task == "multilabel" else None
        try:
            return explain(pl_module, images, target).cpu()  # the default method, as predict --heatmaps
        except MedtransferError as err:
            rank_zero_warn(f"WorstErrorsGallery draws no heatmaps: {err}\nHINT: set `heatmap: false`.")
            return None

    @staticmethod
    def _statistics(trainer: Trainer, pl_module: LightningModule) -> tuple[list[float], list[float]]:
        """Mean and std the inputs were normalised with: the data module's, else the backbone's."""
        spec = getattr(trainer.datamodule, "input_spec", None) or getattr(pl_module, "input_spec", None)
        return (list(spec.mean), list(spec.std)) if spec is not None else ([0.0], [1.0])

    def _draw(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._heaps:
            return
        rows = self.worst(pl_module)
        names = getattr(trainer.datamodule, "class_names", None)
        names = [str(n) for n in names] if names else [str(i) for i in range(pl_module.hparams.num_classes)]
        folder = run_folder(trainer, self.dirpath, "diagnostics")
        multilabel = pl_module.hparams.task == "multilabel"
        columns = ["index", *(["finding"] if multilabel else []), "label", "decision", "prob", "prob_label"]
        table = pd.DataFrame([{k: v for k, v in row.items() if k != "image"} for row in rows], columns=columns)
        if multilabel:  # label and decision stay 1/0: whether the finding is present
            table["finding"] = table["finding"].map(lambda i: names[i])
        else:
            table[["label", "decision"]] = table[["label", "decision"]].map(lambda i: names[i])
        table.insert(0, "rank", range(1, len(table) + 1))
        self.paths = [write_text_atomic(folder / f"worst_errors_{stage}.csv", table.to_csv(index=False))]
        if rows:
            self.paths.append(self._figure(trainer, pl_module, rows, names, folder / f"worst_errors_{stage}.png"))
        log_artifacts(trainer, self.paths, "diagnostics")
        _logger.info("Worst %s errors (%d) in %s", stage, len(rows), folder)

    def _figure(
        self, trainer: Trainer, pl_module: LightningModule, rows: list[dict], names: list[str], path: Path
    ) -> Path:
        images = torch.stack([row["image"] for row in rows])
        heatmaps = self._heatmaps(pl_module, images, [row["finding"] for row in rows])
        mean, std = self._statistics(trainer, pl_module)
        pictures = [denormalise(row["image"], mean, std) for row in rows]
        if heatmaps is not None:
            from medtransfer.explain import overlay

            pictures = [overlay(picture, heatmap) for picture, heatmap in zip(pictures, heatmaps, strict=True)]
        captions, yes_no = [], ("no", "yes")
        for row in rows:
            if pl_module.hparams.task == "multilabel":
                captions.append(
                    f"#{row['index']} {names[row['finding']]}: truth {yes_no[row['label']]}\n"
                    f"said {yes_no[row['decision']]}, p={row['prob']:.3f}"
                )
            else:
                captions.append(
                    f"#{row['index']} truth: {names[row['label']]}\n"
                    f"said {names[row['decision']]}, p({names[row['label']]})={row['prob_label']:.3f}"
                )
        epoch = f", epoch {trainer.current_epoch}" if trainer.state.fn == TrainerFn.FITTING else ""
        title = f"{len(rows)} most confidently wrong ({path.stem.rsplit('_', 1)[-1]}{epoch})"
        return save_figure(plot_gallery(pictures, captions, self.ncols, title), path)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._heaps, self._seen, self._captured = {}, {}, None
        self._remove_hook()
        self._handle = pl_module.register_forward_hook(self._capture)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._handle is not None:
            self._collect(pl_module, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hook()

    # the same collection for the test loop
    on_test_epoch_start, on_test_batch_end = on_validation_epoch_start, on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    @override
    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs after the module fitted this epoch's threshold; draws now or keeps the cases for fit's end."""
        if trainer.sanity_checking:
            self._heaps, self._pending_val = {}, False
            return
        due = trainer.state.fn != TrainerFn.FITTING or (
            self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )
        self._pending_val = not due
        if due:
            self._draw(trainer, pl_module, "val")

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_val:
            self._draw(trainer, pl_module, "val")
            self._pending_val = False

    @override
    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._draw(trainer, pl_module, "test")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hook()
