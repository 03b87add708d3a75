"""``medtransfer compare``: the runs of an MLflow experiment (fits, their child runs, baselines) side by side, with
what each fitted and its metrics, best first by one metric; optionally as CSV, markdown and a bar chart."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from medtransfer.errors import MedtransferError
from medtransfer.files import write_text_atomic

__all__ = ["STANDARD_METRICS", "CompareResult", "lower_is_better", "normalise_metric", "plot_metric", "print_table",
           "run_compare", "runs_table", "to_markdown"]  # fmt: skip

_logger = logging.getLogger(__name__)

#: Metrics every table shows beside the chosen one (``val/auroc`` as its best epoch).
STANDARD_METRICS = ("val/auroc", "test/auroc", "test/acc", "test/selective_acc_cov90", "test/aurc")

#: Name fragments of metrics where smaller is better (losses, risks, calibration errors).
_LOWER_IS_BETTER = ("loss", "aurc", "augrc", "ece", "risk", "error", "brier")


def normalise_metric(metric: str, available: Sequence[str]) -> str:
    """The logged name of ``metric``: ``test_auroc`` finds ``test/auroc``. Raises with the metrics present."""
    if metric in available:
        return metric
    matches = sorted({name for name in available if name.replace("/", "_") == metric.replace("/", "_")})
    if len(matches) == 1:
        return matches[0]
    present = ", ".join(sorted(available)) or "none"
    raise MedtransferError(f"No run logged the metric {metric!r}; metrics present: {present}")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (losses, AURC, ECE, risks)."""
    return any(part in metric.lower() for part in _LOWER_IS_BETTER)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "None") else None
    except ValueError:
        return None


def _learning_rates(params: dict[str, str]) -> str:
    """``head lr -> fine-tune lr @ unfreeze epoch`` (``0.001 -> 1e-05 @3``), the head's own phase-2 rate, the
    per-block decay and the schedule when set (``(head 1e-4) x0.7/block cosine``); ``0.001 (frozen)`` when the run
    ended before the unfreeze epoch; empty for runs without an optimizer (baselines)."""
    head = params.get("model.optimizer.lr")
    if head is None:
        return ""
    finetune, unfreeze = params.get("finetuning.finetune_lr"), params.get("finetuning.unfreeze_at_epoch")
    if finetune is None or unfreeze is None:
        return head
    epochs = _number(params.get("trainer.max_epochs"))
    if epochs is not None and epochs >= 0 and _number(unfreeze) is not None and float(unfreeze) >= epochs:
        return f"{head} (frozen)"
    head_later = params.get("finetuning.head_finetune_lr")
    text = f"{finetune} all" if unfreeze == "0" else f"{head} -> {finetune} @{unfreeze}"
    if head_later not in (None, "None", finetune):
        text += f" (head {head_later})"
    decay, schedule = params.get("finetuning.lr_decay"), params.get("finetuning.schedule")
    if _number(decay) not in (None, 1.0):
        text += f" x{decay}/block"
    if schedule not in (None, "None", "constant"):
        text += f" {schedule}"
    return text


def _best(client: Any, run: Any, metric: str) -> float | None:
    """The best value of ``metric`` over the run's epochs: the checkpoint's ``best_<metric>`` tag when the
    checkpoint monitored it, else its history's best."""
    tagged = _number(run.data.tags.get(f"best_{metric}"))
    if tagged is not None or metric not in run.data.metrics:
        return tagged
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
    return (min if lower_is_better(metric) else max)(values) if values else None


def _experiment_id(client: Any, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise MedtransferError(
            f"No MLflow experiment {experiment!r} in {client.tracking_uri}; experiments: {', '.join(names) or 'none'}"
        )
    return found.experiment_id


def runs_table(
    client: Any,
    experiment: str,
    metric: str = "test/auroc",
    filter_string: str = "",
    max_runs: int = 1000,
    order: Literal["auto", "descending", "ascending"] = "auto",
    mixed_datasets: bool = False,
) -> tuple[pd.DataFrame, str]:
    """One row per run of ``experiment`` and the metric's logged name, best first by ``metric`` (runs without it
    last), ranked within each ``dataset`` (validation data's name and digest) unless ``mixed_datasets``."""
    # MLflow pages the store itself up to ``max_results`` (at most 50,000 per call)
    runs = client.search_runs([_experiment_id(client, experiment)], filter_string, max_results=max_runs,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    if not runs:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise MedtransferError(f"MLflow experiment {experiment!r} has no runs{where}")
    metric = normalise_metric(metric, sorted({name for run in runs for name in run.data.metrics}))
    names = {run.info.run_id: run.info.run_name for run in runs}
    rows = [_row(client, run, metric, names) for run in runs]
    ascending = lower_is_better(metric) if order == "auto" else order == "ascending"
    table = pd.DataFrame(rows).sort_values(metric, ascending=ascending, na_position="last", kind="stable")
    if not mixed_datasets and table["dataset"].nunique() > 1:  # rank within each dataset, best group first
        first = table.groupby("dataset", sort=False).cumcount() == 0
        rank = dict(zip(table.loc[first, "dataset"], range(int(first.sum())), strict=True))
        table = table.sort_values("dataset", key=lambda d: d.map(rank), kind="stable")
    return table.reset_index(drop=True), metric


def _row(client: Any, run: Any, metric: str, names: dict[str, str]) -> dict[str, Any]:
    """A run's row: what it fitted (backbone, weights, input, epochs, learning rates) and its metrics."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    parent = tags.get("mlflow.parentRunId", "")
    row = {
        "run": run.info.run_name,
        "run_id": run.info.run_id,
        "parent": names.get(parent, parent),
        "status": run.info.status,
        "start": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
        "backbone": params.get("model.backbone", ""),
        "pretrained": params.get("model.pretrained", ""),
        "image_size": params.get("data.resolved.image_size") or params.get("data.image_size", ""),
        "epochs": params.get("trainer.max_epochs", ""),
        "lrs": _learning_rates(params),
        metric: metrics.get(metric),
    }
    for name in STANDARD_METRICS:
        column = "best val/auroc" if name == "val/auroc" else name
        if column != metric:
            row[column] = _best(client, run, name) if name == "val/auroc" else metrics.get(name)
    row["dataset"] = _dataset(run)  # last: the ranked metric keeps its column
    return row


def _dataset(run: Any) -> str:
    """``<name>@<digest>`` of the run's validation data input (every fit and baseline has one; else its test or
    training one), else the ``dataset.name`` tag of runs logged before dataset inputs; empty if neither."""
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    from medtransfer.tracking.datasets import DATASET_CONTEXT  # its module imports torch

    by_context = {next((t.value for t in i.tags if t.key == DATASET_CONTEXT), ""): i.dataset for i in inputs}
    for context in ("validation", "test", "train"):
        if context in by_context:
            dataset = by_context[context]
            return f"{dataset.name.rsplit('-', 1)[0]}@{dataset.digest[:8]}"  # name: <dataset>-<split>
    return run.data.tags.get("dataset.name", "")


def _cell(value: Any) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, metrics to 4 decimals and missing values blank."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(table: pd.DataFrame, metric: str) -> Any:
    """A matplotlib figure: horizontal bars of ``metric`` per run, in the table's order (best on top); runs without
    it left out."""
    import matplotlib.pyplot as plt

    shown = table.dropna(subset=[metric])
    pairs = zip(shown["run"], shown["parent"], strict=True)
    labels = [f"{run} (in {parent})" if parent else run for run, parent in pairs]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * max(1, len(shown))))
    bars = ax.barh(range(len(shown)), shown[metric], color="tab:blue")
    ax.bar_label(bars, fmt="%.4f", padding=3, fontsize="small")
    ax.set_yticks(range(len(shown)), labels, fontsize="small")
    ax.invert_yaxis()  # the first (best) run on top
    top = float(shown[metric].max()) if len(shown) else 1.0
    ax.set(xlabel=metric, title=f"{metric} per run", xlim=(0, max(1.0, top) * 1.15))
    fig.tight_layout()
    return fig


def print_table(table: pd.DataFrame, title: str, width: int, whole: Collection[str] = ()) -> None:
    """``table`` on the terminal (rich), numbers to 4 decimals and missing values blank; in a pipe or a log it is
    ``width`` characters wide, not squeezed into 80. Cells of ``whole`` columns never wrap (a name broken over
    lines is unreadable)."""
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title, title_justify="left")
    for column in table.columns:
        shown.add_column(str(column), justify="right" if table[column].dtype.kind in "fiu" else "left",
                         overflow="fold", no_wrap=column in whole)  # fmt: skip
    for row in table.itertuples(index=False):
        shown.add_row(*(_cell(v) for v in row))
    console = Console()
    (console if console.is_terminal else Console(width=width)).print(shown)


@dataclass(frozen=True)
class CompareResult:
    """The runs table, best run first, and the metric it is ranked by (as logged)."""

    table: pd.DataFrame
    metric: str


def run_compare(
    experiment: str = "medtransfer",
    metric: str = "test/auroc",
    tracking_uri: str | None = None,
    csv: Path | None = None,
    markdown: Path | None = None,
    plot: Path | None = None,
    filter_string: str = "",
    max_runs: int = 1000,
    order: Literal["auto", "descending", "ascending"] = "auto",
    mixed_datasets: bool = False,
) -> CompareResult:
    """Compare the runs of an MLflow experiment: a table on the terminal, optionally CSV, markdown and a plot.

    Args:
        experiment: MLflow experiment name (set by ``trainer.logger.experiment_name``).
        metric: the metric to rank by, as logged (``test/auroc``) or with ``_`` (``test_auroc``).
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``.
        csv: write the table here as CSV (full precision).
        markdown: write the table here as a markdown table.
        plot: write a bar chart (PNG) of the metric per run here.
        filter_string: an MLflow search filter, e.g. ``"params.model.backbone = 'resnet50'"``.
        max_runs: most runs to read (newest first).
        order: ``auto`` ranks losses, AURC, ECE and risks ascending and everything else descending.
        mixed_datasets: rank runs of different datasets together (by default each dataset's runs apart).
    """
    from mlflow import MlflowClient

    from medtransfer.tracking.mlflow import resolve_tracking_uri  # Lightning's: not for --help

    client = MlflowClient(resolve_tracking_uri(tracking_uri, existing=True))
    table, metric = runs_table(client, experiment, metric, filter_string, max_runs, order, mixed_datasets)
    groups = table["dataset"].nunique()
    grouped = f", ranked within each of {groups} datasets" if groups > 1 and not mixed_datasets else ""
    title = f"{len(table)} run{'s' * (len(table) != 1)} of {experiment!r} by {metric}{grouped}"
    print_table(table.drop(columns=["run_id"]), title, 240, whole=("run", "parent", "dataset"))
    _write_outputs(table, metric, csv, markdown, plot)
    return CompareResult(table, metric)


def _write_outputs(
    table: pd.DataFrame, metric: str, csv: Path | None, markdown: Path | None, plot: Path | None
) -> None:
    """The table as CSV and markdown and the metric's bar chart, each where asked."""
    if csv is not None:
        write_text_atomic(csv, table.to_csv(index=False))
        print(f"Table: {csv}")
    if markdown is not None:
        write_text_atomic(markdown, to_markdown(table))
        print(f"Markdown: {markdown}")
    if plot is not None:
        from medtransfer.plots import save_figure

        save_figure(plot_metric(table, metric), plot)
        print(f"Plot: {plot}")
