"""``medtransfer predict``: a trained model over a folder, glob or CSV of images, to a CSV of decisions.

One row per image (probabilities, prediction, decision with the stored threshold and abstention band) or per
unreadable file (its ``error``, never fatal); the CSV is renamed into place only when every image is done.
"""

from __future__ import annotations

import glob
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from medtransfer.data.readers import SUPPORTED_SUFFIXES
from medtransfer.errors import DataError
from medtransfer.explain.choices import DEFAULT_METHOD, Method
from medtransfer.files import write_text_atomic

__all__ = ["PredictSummary", "collect_images", "parse_prevalence", "prevalence_line", "resolve_device", "run_predict"]

_logger = logging.getLogger(__name__)

#: ``--precision`` as Lightning's Trainer names it: autocast to bfloat16 / float16 for speed.
Precision = Literal["32", "bf16", "16"]
_TRAINER_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def __getattr__(name: str) -> Any:
    """``Predictor``, ``load_predictor`` and ``read_as_trained``, imported on first use (``--help`` needs no torch)."""
    if name in ("Predictor", "load_predictor", "read_as_trained"):
        from medtransfer.commands import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        from medtransfer.data.tables import read_csv_table, require_columns  # pandas: only for a CSV

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
    prevalence_method: Literal["em", "bbse"] = "em",
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
    from torch.utils.data import DataLoader  # here, not at the top: --help needs none of torch, Lightning, timm

    from medtransfer.commands import predict_writer as writing
    from medtransfer.commands.predictor import ImageRows, PredictModule, explainable_network, image_rows, load_predictor

    for name, target in (("--output", output), ("--summary", summary)):
        if target is not None:
            _check_writable(name, Path(target), images)
    shares = parse_prevalence(prevalence)
    device = resolve_device(device, precision)
    predictor = load_predictor(model, device, tracking_uri)
    rows = image_rows(collect_images(images, path_column), predictor.settings, frame)
    loader = DataLoader(rows, batch_size=batch_size, num_workers=num_workers, collate_fn=ImageRows.collate,
                        pin_memory=device == "cuda")  # fmt: skip
    explainer = None
    if heatmaps is not None:  # an exported graph has no layers: the maps come from the checkpoint logged beside it
        network = explainable_network(predictor, model, device, tracking_uri)
        explainer = writing.HeatmapWriter(network, heatmaps, heatmaps_for, top_k, predictor, explain_method,
                                          explain_layer, read=rows.read)  # fmt: skip
    output = Path(output)
    _warn_stale(output)
    columns = writing.csv_columns(predictor, rows.frames is not None, explainer is not None and heatmaps_for != "top_k")
    writer = writing.PredictionWriter(output, predictor, rows.paths, columns, rows.frames, predictor.settings.reference,
                                      explainer)  # fmt: skip
    start = time.perf_counter()
    writing.predict_rows(PredictModule(predictor.network, channels_last, compile), loader, writer, device, devices,
                         _TRAINER_PRECISION[precision], heatmaps is None)  # fmt: skip
    if not writer.is_global_zero:  # another DDP rank: its rows are in rank 0's CSV, which reports the whole run
        return None
    if explainer is not None and heatmaps_for == "top_k":
        explainer.write_top_k(rows.paths, rows.transform)
    seconds = time.perf_counter() - start
    adapted = None if shares is None else writing.adapt_prevalence(writer, predictor, shares, prevalence_method)
    result = PredictSummary(
        **writing.summarise(writer, predictor, len(rows), seconds, output, explainer), prevalence=adapted
    )
    if summary is not None:
        write_text_atomic(Path(summary), result.to_json())
    _print_summary(result)
    return result


def parse_prevalence(text: str) -> str | list[float] | None:
    """``--prevalence`` (predict's and evaluate's): ``None`` for ``none``, ``"estimate"``, or the shares given."""
    if text in ("none", "estimate"):
        return None if text == "none" else text
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise DataError(f"--prevalence {text}: expected none, estimate, a share such as 0.3, or one share per "
                        "class such as 0.2,0.3,0.5") from None  # fmt: skip


def resolve_device(device: str, precision: Precision) -> str:
    """``auto``: a GPU when there is one; ``--precision 16`` is refused on the CPU."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if precision == "16" and device == "cpu":
        raise DataError("--precision 16 needs a GPU; on the CPU use --precision bf16 or 32")
    return device


def prevalence_line(entry: dict[str, Any]) -> str:
    """The printed line of an adapted ``prevalence`` entry: each class's share, interval and calibration share
    (and, where the labels are known, the true share)."""
    true = entry.get("true", {})
    return f"prevalence ({entry['method']}): " + ", ".join(
        f"{name} {share:.3f} [{entry['interval'][name][0]:.3f}, {entry['interval'][name][1]:.3f}] "
        f"(calibration {entry['source'][name]:.3f}" + (f", true {true[name]:.3f})" if name in true else ")")
        for name, share in entry["estimated"].items()
    )


def _warn_stale(output: Path) -> None:
    """Name the temporary files an interrupted run left; not deleted, as another run may still own one."""
    stale = sorted(output.parent.glob(f".{output.name}.*.tmp"))
    if stale:
        _logger.warning("%d temporary file(s) of an interrupted run beside %s (e.g. %s): not outputs, safe to delete",
                        len(stale), output, stale[0].name)  # fmt: skip


def _print_summary(result: PredictSummary) -> None:
    print(f"{result.predicted} predicted, {result.unreadable} unreadable, coverage {result.coverage:.1%} -> "
          f"{result.output}")  # fmt: skip
    if result.prevalence and result.prevalence["adapted"]:
        print(prevalence_line(result.prevalence))
    if result.unlike_training:
        _logger.warning("%d of %d image(s) are unlike the images %s was validated on (column unlike_training): "
                        "its decisions on them are unreliable.\nHINT: other modality, colour or blank images?",
                        result.unlike_training, result.predicted, result.model)  # fmt: skip
    for name, count in (result.findings or {}).items():
        print(f"  {name}: " + ", ".join(f"{count.get(k, 0)} {k}" for k in ("positive", "negative", "abstain")))
