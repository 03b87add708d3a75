"""``medtransfer predict``: a trained model over a folder, glob or CSV of images, to a CSV of decisions.

One row per image (probabilities, prediction, decision with the stored threshold and abstention band) or per
unreadable file (its ``error``, never fatal); the CSV is renamed into place only when every image is done.
"""

from __future__ import annotations

import glob
import json
import logging
import signal
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from medtransfer.commands.predict_writer import HeatmapWriter, PredictionWriter, csv_columns
from medtransfer.commands.predictor import (
    ImageRows,
    PredictModule,
    Predictor,
    every_frame,
    explainable_network,
    load_predictor,
    read_as_trained,
)
from medtransfer.data.readers import SUPPORTED_SUFFIXES
from medtransfer.data.tables import read_csv_table, require_columns
from medtransfer.data.transforms import build_eval_transform
from medtransfer.decisions.prevalence import Prevalence, PrevalenceMethod, estimate_prevalence, given_prevalence
from medtransfer.decisions.risk_control import guarantee_verdict
from medtransfer.errors import DataError
from medtransfer.explain import DEFAULT_METHOD
from medtransfer.explain.methods import Method
from medtransfer.files import write_text_atomic
from medtransfer.models.input_spec import InputSpec

__all__ = ["PredictSummary", "Predictor", "collect_images", "load_predictor", "read_as_trained", "run_predict"]

_logger = logging.getLogger(__name__)

#: ``--precision`` as Lightning's Trainer names it: autocast to bfloat16 / float16 for speed.
Precision = Literal["32", "bf16", "16"]
_TRAINER_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


@dataclass
class PredictSummary:
    """What a prediction run did, as ``--summary`` writes it (:meth:`to_json`). ``unlike_training`` is ``None``
    when the model holds no statistics of its validation images; ``findings`` (multi-label only) counts
    ``positive``/``negative``/``abstain`` per finding; ``guarantee`` is the calibration's verdict; ``prevalence``
    (with ``--prevalence`` only) the class shares adapted to, or ``{"method", "adapted": false}`` when none."""

    images: int
    predicted: int
    unreadable: int
    decisions: dict[str, int]
    coverage: float
    images_per_second: float | None
    output: str
    model: str
    failures: list[dict[str, str]]
    unlike_training: int | None
    heatmaps: list[str]
    findings: dict[str, dict[str, int]] | None
    guarantee: dict[str, Any]
    prevalence: dict[str, Any] | None = None

    def to_json(self) -> str:
        values = asdict(self)
        for key in ("findings", "prevalence"):  # only multi-label summaries, only runs with --prevalence
            if values[key] is None:
                del values[key]
        return json.dumps(values, indent=2) + "\n"


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


def _check_writable(option: str, target: Path, images: str) -> None:
    """Refuse an output path before any work (a folder, an unwritable parent, the input image list itself);
    missing parents are created."""
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
    devices: int | str = 1,
    precision: Precision = "32",
    channels_last: bool = False,
    compile: bool = False,
    tracking_uri: str | None = None,
    frame: Literal["first", "middle", "all", "error"] | None = None,
    prevalence: str = "none",
    prevalence_method: PrevalenceMethod = "em",
) -> PredictSummary | None:
    """Predict every image and write one CSV row each.

    Args:
        images: a folder (searched recursively), a glob pattern, or a CSV with a path column.
        model: a ``medtransfer fit`` checkpoint or an MLflow model URI (``runs:/<id>/model``, ``models:/<name>/<ver>``).
        output: the CSV to write (atomically, when all images are done).
        summary: optional JSON of the counts per decision (and per finding), coverage and unreadable files.
        heatmaps: optional folder for heatmaps (overlay PNG, raw .npy map); their peak and box go in the CSV.
        heatmaps_for: which images get one: ``all``, ``positive`` (decided), ``abstain`` or the ``top_k`` most positive.
        top_k: how many images ``heatmaps_for: top_k`` explains.
        explain_method: ``occlusion`` (model-agnostic, robust), or the fast ``fusion``, ``layercam``, ``gradcam``.
        explain_layer: the stage explained: a ``feature_info`` index or a module name; default: the method's own.
        path_column: the column of image paths when ``images`` is a CSV.
        batch_size: images per forward pass.
        num_workers: loader worker processes decoding images.
        device: ``auto`` uses a GPU when there is one.
        devices: how many (Lightning's ``devices``); several run DDP and rank 0 merges the rows into one CSV.
        precision: ``32``, or autocast to ``bf16`` (GPU or CPU) / ``16`` (GPU) for speed.
        channels_last: NHWC memory format (faster convolutions on recent GPUs and some CPUs).
        compile: ``torch.compile`` the network first (pays off on large folders).
        tracking_uri: MLflow store of ``runs:/`` and ``models:/`` URIs (default ``$MLFLOW_TRACKING_URI``, else mlruns).
        frame: multi-frame DICOM: ``first``, ``middle``, ``all`` (a row each) or ``error``; default: the model's.
        prevalence: ``none`` keeps the model's probabilities; ``estimate`` estimates the class shares of these
            images and adapts probabilities and decisions to them (a prevalence shift only: see
            ``decisions.prevalence``); a share (``0.3``: the positive share, per finding for multi-label) or one
            per class (``0.2,0.3,0.5``) adapts to that value.
        prevalence_method: how ``estimate`` estimates: ``em`` (maximum likelihood) or ``bbse``.

    Returns:
        The summary (what ``summary`` holds); ``None`` in the processes of DDP ranks other than 0.
    """
    for name, target in (("--output", output), ("--summary", summary)):
        if target is not None:
            _check_writable(name, Path(target), images)
    shares = _parse_prevalence(prevalence)
    device = _resolve_device(device, precision)
    predictor = load_predictor(model, device, tracking_uri)
    rows = _image_rows(collect_images(images, path_column), predictor.settings, frame)
    loader = DataLoader(rows, batch_size=batch_size, num_workers=num_workers, collate_fn=ImageRows.collate,
                        pin_memory=device == "cuda")  # fmt: skip
    explainer = None
    if heatmaps is not None:  # an exported graph has no layers: the maps come from the checkpoint logged beside it
        network = explainable_network(predictor, model, device, tracking_uri)
        explainer = HeatmapWriter(network, heatmaps, heatmaps_for, top_k, predictor, explain_method, explain_layer,
                                  read=rows.read)  # fmt: skip
    output = Path(output)
    _warn_stale(output)
    columns = csv_columns(predictor, rows.frames is not None, explainer is not None and heatmaps_for != "top_k")
    writer = PredictionWriter(output, predictor, rows.paths, columns, rows.frames, predictor.settings.reference,
                              explainer)  # fmt: skip
    start = time.perf_counter()
    _predict(PredictModule(predictor.network, channels_last, compile), loader, writer, device, devices, precision,
             heatmaps is None)  # fmt: skip
    if not writer.is_global_zero:  # another DDP rank: its rows are in rank 0's CSV, which reports the whole run
        return None
    if explainer is not None and heatmaps_for == "top_k":
        explainer.write_top_k(rows.paths, rows.transform)
    adapted = None if shares is None else _adapt(writer, predictor, shares, prevalence_method)
    result = _summarise(writer, predictor, len(rows), time.perf_counter() - start, output, explainer, adapted)
    if summary is not None:
        write_text_atomic(Path(summary), result.to_json())
    _print_summary(result)
    return result


def _parse_prevalence(text: str) -> str | list[float] | None:
    """``--prevalence``: ``None`` for ``none``, ``"estimate"``, or the shares given."""
    if text in ("none", "estimate"):
        return None if text == "none" else text
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise DataError(f"--prevalence {text}: expected none, estimate, a share such as 0.3, or one share per "
                        "class such as 0.2,0.3,0.5") from None  # fmt: skip


def _adapt(writer: PredictionWriter, predictor: Predictor, shares: str | list[float],
           method: PrevalenceMethod) -> dict[str, Any]:  # fmt: skip
    """Adapt the written CSV to the estimated or given class shares; the summary's ``prevalence`` entry."""
    method_name = method if shares == "estimate" else "given"
    calibration = predictor.calibration or {}
    if "prevalence" not in calibration:
        _logger.warning("Prevalence not adapted: %s holds no calibration class shares (calibrated before "
                        "medtransfer recorded them); fit or calibrate it again", predictor.label)  # fmt: skip
        return {"method": method_name, "adapted": False}
    source, task = torch.tensor(calibration["prevalence"], dtype=torch.float64), predictor.task
    if shares == "estimate":
        confusion = calibration.get("confusion")
        confusion = None if confusion is None else torch.tensor(confusion, dtype=torch.float64)

        def choose(probs: torch.Tensor) -> Prevalence | None:
            return estimate_prevalence(probs, source, task, method, confusion)
    else:
        try:
            given = given_prevalence(shares, source, task)
        except ValueError as err:
            raise DataError(f"--prevalence {','.join(map(str, shares))}: {err}") from None

        def choose(probs: torch.Tensor) -> Prevalence | None:
            return given

    result = writer.adapt(choose)
    if result is None:
        return {"method": method_name, "adapted": False}
    names = predictor.class_names if task != "binary" else predictor.class_names[:2]
    return {**result.to_dict(names), "adapted": True}


def _resolve_device(device: str, precision: Precision) -> str:
    """``auto``: a GPU when there is one; ``--precision 16`` is refused on the CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if precision == "16" and device == "cpu":
        raise DataError("--precision 16 needs a GPU; on the CPU use --precision bf16 or 32")
    return device


def _image_rows(paths: list[Path], settings: InputSpec, frame: str | None) -> ImageRows:
    """The images read and transformed as in training; ``frame: all`` gives a multi-frame DICOM a row per frame."""
    frame = frame or settings.dicom_frame
    frames = None
    if frame == "all":  # one row per frame; files of one frame read it as their first
        paths, frames = every_frame(paths)
    transform = build_eval_transform(
        settings.size, settings.channels, settings.mean, settings.std, settings.interpolation, color=settings.color,
    )  # fmt: skip
    return ImageRows(paths, transform, settings.color, "first" if frame == "all" else frame, frames)


def _warn_stale(output: Path) -> None:
    """Name the temporary files an interrupted run left; not deleted, as another run may still own one."""
    stale = sorted(output.parent.glob(f".{output.name}.*.tmp"))
    if stale:
        _logger.warning("%d temporary file(s) of an interrupted run beside %s (e.g. %s): not outputs, safe to delete",
                        len(stale), output, stale[0].name)  # fmt: skip


def _summarise(writer: PredictionWriter, predictor: Predictor, images: int, seconds: float, output: Path,
               explainer: HeatmapWriter | None, prevalence: dict[str, Any] | None) -> PredictSummary:  # fmt: skip
    """The run's summary from the writer's tallies, with the guarantee's verdict on these probabilities."""
    counts, predicted = writer.counts, sum(writer.counts.values())
    decided = sum(v for k, v in counts.items() if not k.startswith("abstain"))
    findings = None
    if predictor.task == "multilabel":
        findings = {name: dict(writer.findings.get(name, {})) for name in predictor.class_names}
    return PredictSummary(
        images=images, predicted=predicted, unreadable=len(writer.failures), decisions=dict(counts),
        coverage=decided / max(1, predicted), images_per_second=images / seconds if seconds else None,
        output=str(output), model=predictor.label, failures=writer.failures,
        unlike_training=writer.unlike if predictor.settings.reference else None,
        heatmaps=explainer.written if explainer is not None else [], findings=findings,
        guarantee=guarantee_verdict(predictor.rule, predictor.calibration, writer.probs), prevalence=prevalence,
    )  # fmt: skip


def _print_summary(result: PredictSummary) -> None:
    print(f"{result.predicted} predicted, {result.unreadable} unreadable, coverage {result.coverage:.1%} -> "
          f"{result.output}")  # fmt: skip
    if result.prevalence and result.prevalence["adapted"]:
        shares = result.prevalence
        print(f"prevalence ({shares['method']}): " + ", ".join(
            f"{name} {share:.3f} [{shares['interval'][name][0]:.3f}, {shares['interval'][name][1]:.3f}] "
            f"(calibration {shares['source'][name]:.3f})" for name, share in shares["estimated"].items()
        ))  # fmt: skip
    if result.unlike_training:
        _logger.warning("%d of %d image(s) are unlike the images %s was validated on (column unlike_training): "
                        "its decisions on them are unreliable.\nHINT: other modality, colour or blank images?",
                        result.unlike_training, result.predicted, result.model)  # fmt: skip
    for name, count in (result.findings or {}).items():
        print(f"  {name}: " + ", ".join(f"{count.get(k, 0)} {k}" for k in ("positive", "negative", "abstain")))


def _predict(module: PredictModule, loader: DataLoader, writer: PredictionWriter, device: str, devices: int | str,
             precision: Precision, inference_mode: bool) -> None:  # fmt: skip
    """``Trainer.predict`` with ``writer`` streaming the rows (heatmaps need gradients: no inference mode then).
    A Ctrl-C stays a ``KeyboardInterrupt`` (Lightning would exit with status 1 and leave SIGINT ignored)."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # "GPU available: ..." lines: not ours
    level, handler = quiet.level, signal.getsignal(signal.SIGINT)
    quiet.setLevel(logging.WARNING)
    try:
        trainer = Trainer(
            accelerator="gpu" if device == "cuda" else device, devices=devices, precision=_TRAINER_PRECISION[precision],
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
