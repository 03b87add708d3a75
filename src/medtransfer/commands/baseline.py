"""``medtransfer baseline``: logistic regression on downsampled pixels or on frozen backbone features, the
yardstick a fine-tuned network has to beat.

A scikit-learn ``StandardScaler`` + ``LogisticRegression`` learns on the training split, its ``C`` chosen by
validation AUROC; threshold and abstention band are fitted on validation by the network's
:class:`~medtransfer.decisions.fitting.DecisionFitting`, and the test report is the network's too, so the run
carries the same ``val/*`` and ``test/*`` metrics and sits beside network runs in ``medtransfer compare``.
``--config`` reads a ``fit`` YAML: ``data`` as is, the decision settings of ``model``; training sections skipped.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from jsonargparse import ActionConfigFile
from timm.data import resolve_model_data_config
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection

from medtransfer.data.base import ClassificationDataModule
from medtransfer.decisions.fitting import DecisionFitting
from medtransfer.decisions.report import guarantee_report, report_metrics, selective_report
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.thresholds import ThresholdPolicy
from medtransfer.errors import DataError
from medtransfer.metrics import functional as F
from medtransfer.metrics.defined import stage_metrics
from medtransfer.models.backbones import create_backbone
from medtransfer.models.input_spec import InputSpec
from medtransfer.progress import Progress
from medtransfer.tracking.datasets import log_dataset_inputs
from medtransfer.tracking.mlflow import open_run
from medtransfer.tracking.redaction import redact
from medtransfer.tracking.ui import ui_hint

__all__ = ["DEFAULT_CS", "BaselineResult", "ConfigFile", "run_baseline"]

_logger = logging.getLogger(__name__)

Features = Literal["pixels", "backbone"]

#: Inverse regularisation strengths tried, each scored by validation AUROC.
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)

#: Sections of a ``medtransfer fit`` config that only training uses; ``--config`` skips them.
_TRAINING_SECTIONS = ("trainer", "finetuning", "checkpoint", "seed_everything", "test_after_fit", "ckpt_path",
                      "optimizer", "lr_scheduler", "log_model")  # fmt: skip
#: Keys of a fit config's ``model`` section that mean the same here.
_SHARED_MODEL_KEYS = ("backbone", "pretrained", "threshold_policy", "threshold_target", "target_coverage",
                      "target_risk", "confidence_score")  # fmt: skip


@dataclass
class BaselineResult:
    """What one baseline run produced: its MLflow run and model name, the chosen ``C``, every logged metric."""

    run_id: str
    name: str
    experiment_id: str
    tracking_uri: str
    C: float
    metrics: dict[str, float] = field(default_factory=dict)


class ConfigFile(ActionConfigFile):
    """``--config``: a ``medtransfer fit`` YAML (or a baseline one), minus what only training uses."""

    def __call__(self, parser, cfg, values, option_string=None):
        path = Path(values)
        source = path.read_text() if path.is_file() else values
        try:
            config = yaml.safe_load(source)
        except yaml.YAMLError as err:
            raise DataError(f"--config {values}: not valid YAML: {err}") from err
        if not isinstance(config, dict):
            raise DataError(f"--config {values}: expected a YAML mapping of options, got {type(config).__name__}")
        model = config.pop("model", None) or {}
        model = model.get("init_args", model) if isinstance(model, dict) else {}
        for key in _TRAINING_SECTIONS:
            config.pop(key, None)
        for key in _SHARED_MODEL_KEYS:
            if key in model:
                config.setdefault(key, model[key])
        self.apply_config(parser, cfg, self.dest, yaml.safe_dump(config))


def _pipeline(max_iter: int, multilabel: bool) -> tuple[Any, Any]:
    """StandardScaler + LogisticRegression (one per label if multi-label), and the regression whose ``C`` the
    search sets; warm-started, as each ``C``'s solution is a good start for the next (weaker) penalty."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(max_iter=max_iter, warm_start=True)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(classifier) if multilabel else classifier), classifier


def _search_C(
    Cs: Sequence[float], max_iter: int, task: str, auroc: Metric, x: dict[str, np.ndarray], y: dict[str, Tensor]
) -> tuple[float, Any, Tensor, dict[float, float]]:
    """``(C, pipeline, validation probabilities, AUROC by C)`` of the best ``C`` by validation AUROC (ties: the
    smaller). The test split is not an argument: nothing here can look at it."""
    from sklearn.exceptions import ConvergenceWarning

    pipeline, classifier = _pipeline(max_iter, task == "multilabel")
    searched: dict[float, float] = {}
    best: tuple[float, Any, Tensor] | None = None
    for C in sorted(Cs):
        classifier.set_params(C=C)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            pipeline.fit(x["train"], y["train"].numpy())
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            _logger.warning("C=%g: lbfgs did not converge in %d iterations. HINT: raise --max_iter.", C, max_iter)
        probs = _probabilities(pipeline, x["val"], task)
        searched[C] = float(auroc.clone()(probs, y["val"]))
        _logger.info("C=%g: validation AUROC %.4f", C, searched[C])
        if best is None or searched[C] > searched[best[0]]:
            best = (C, copy.deepcopy(pipeline), probs)
    if len(searched) > 1 and best[0] in (min(searched), max(searched)):
        _logger.warning("C=%g is at the edge of the grid %s. HINT: extend --Cs beyond it.", best[0], sorted(searched))
    return (*best, searched)


def _probabilities(model: Any, x: np.ndarray, task: str) -> Tensor:
    """Probabilities shaped as the network's: ``(N,)`` positive class (binary), ``(N, C)`` otherwise."""
    probs = torch.as_tensor(model.predict_proba(x), dtype=torch.float32)
    return probs[:, 1].contiguous() if task == "binary" else probs


def _prepare_data(data: ClassificationDataModule, features: Features, pixel_size: int, spec: InputSpec | None) -> None:
    """Set ``data`` up for extraction: no augmentation, and unset input settings from the backbone's timm data
    config (pixels: ``pixel_size`` and a neutral 0.5/0.5, which the standardisation undoes anyway)."""
    hp = data.hparams
    if features == "backbone":
        defaults = {"image_size": spec.size, "mean": spec.mean, "std": spec.std, "interpolation": spec.interpolation}
    else:
        defaults = {"image_size": pixel_size, "mean": (0.5,) * hp.channels, "std": (0.5,) * hp.channels}
    for key, value in defaults.items():
        if hp.get(key) is None:
            hp[key] = value
    data.train_transforms = list(data.eval_transforms)
    data.datasets = {}
    data.prepare_data()
    data.setup("fit")


@torch.inference_mode()
def _extract(
    data: ClassificationDataModule, split: str, features: Features, pixel_size: int, backbone: nn.Module | None
) -> tuple[np.ndarray, Tensor]:
    """Feature matrix ``(N, D)`` and targets of one split, batch by batch."""
    loader = DataLoader(data.datasets[split], batch_size=data.hparams.batch_size, num_workers=data.hparams.num_workers)
    rows, targets = [], []
    progress = Progress(len(data.datasets[split]), f"baseline {features} {split}")  # images/s while extracting
    for x, y in loader:
        if backbone is not None:
            rows.append(backbone(x.to(next(backbone.parameters()).device)).float().cpu())
        else:  # gray: the data modules replicate one channel to three
            x = x[:, :1]
            if x.shape[-1] != pixel_size or x.shape[-2] != pixel_size:
                x = torch.nn.functional.interpolate(x, size=(pixel_size, pixel_size), mode="area")
            rows.append(x.flatten(1))
        targets.append(torch.as_tensor(y).long())
        progress.update(len(y))
    progress.close()
    return torch.cat(rows).numpy(), torch.cat(targets)


def _scores(rule: DecisionRule, metrics: MetricCollection, probs: Tensor, targets: Tensor) -> dict[str, float]:
    """The network's stage metrics: AUROC on probabilities, the others on decisions at the fitted threshold."""
    decisions = rule.decide(probs)
    for name, metric in metrics.items(keep_base=False):
        metric.update(probs if name.endswith("/auroc") else decisions, targets)
    return {name: float(value) for name, value in metrics.compute().items()}


def _features(
    data: ClassificationDataModule, features: Features, pixel_size: int, backbone: nn.Module | None
) -> tuple[dict[str, np.ndarray], dict[str, Tensor]]:
    """Set ``data`` up for extraction, then the feature matrices and targets of the three splits; every class
    must occur in training."""
    spec = None if backbone is None else InputSpec.from_timm(resolve_model_data_config(backbone), data.hparams.channels)
    _prepare_data(data, features, pixel_size, spec)
    start = time.perf_counter()
    x, y = {}, {}
    for split in ("train", "val", "test"):
        x[split], y[split] = _extract(data, split, features, pixel_size, backbone)
    _logger.info("Features %s in %.1f s", {k: v.shape for k, v in x.items()}, time.perf_counter() - start)
    num_classes = data.num_classes
    present = num_classes if data.task == "multilabel" else len(torch.unique(y["train"]))
    if present < num_classes:
        raise DataError(
            f"The training split of {getattr(data, 'name', type(data).__name__)} holds {present} of the "
            f"{num_classes} classes; logistic regression needs training images of every class"
        )
    return x, y


def _test_report(
    rule: DecisionRule, calibration: dict, probs: Tensor, targets: Tensor, names: list[str]
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The network's test metrics (``on_test_epoch_end``), and the report the figures need (not multi-label)."""
    metrics = _scores(rule, stage_metrics(rule.task, len(names), "test"), probs, targets)
    report = selective_report(rule, probs, targets) | guarantee_report(rule, calibration, probs, targets)
    metrics |= report_metrics(report, probs, targets, names, rule.task)[0]
    summary = {name: float(value.nanmean()) for name, value in report.items()}
    return metrics, None if rule.task == "multilabel" else summary


def _log_plots(logger: Any, rule: DecisionRule, calibration: dict, probs: Tensor, targets: Tensor, report: dict,
               names: list[str]) -> None:  # fmt: skip
    """The network's test figures (ROC, risk-coverage, reliability, confusion) as ``plots/`` artifacts."""
    from medtransfer import plots
    from medtransfer.tracking.report import TestReportPlots

    figures = TestReportPlots.figures(rule, probs, targets, report, names, calibration)
    with tempfile.TemporaryDirectory() as folder:
        for name, figure in figures.items():
            path = plots.save_figure(figure, Path(folder) / f"{name}.png")
            logger.experiment.log_artifact(logger.run_id, str(path), "plots")


def _log_model(logger: Any, model: Any, rule: DecisionRule, x_example: np.ndarray, names) -> None:
    """The fitted pipeline as an MLflow sklearn model under ``model/`` (pyfunc predicts probabilities)."""
    import mlflow.sklearn
    import sklearn

    metadata = {"task": rule.task, "class_names": [str(n) for n in names], "decision": rule.to_dict()}
    with tempfile.TemporaryDirectory() as folder:
        mlflow.sklearn.save_model(
            model, Path(folder) / "model", pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            input_example=x_example[:2], pyfunc_predict_fn="predict_proba", metadata=metadata,
        )  # fmt: skip
        logger.experiment.log_artifacts(logger.run_id, str(Path(folder) / "model"), "model")


def run_baseline(
    *,  # keyword-only: the data module is an option (--data.*), never a positional
    data: ClassificationDataModule,
    features: Features = "pixels",
    pixel_size: int = 28,
    backbone: str = "tf_efficientnet_lite0",
    pretrained: str = "lite0-package",
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
    threshold_policy: ThresholdPolicy = "youden",
    threshold_target: float = 0.9,
    confidence_score: F.Score = "decision_prob",
    target_coverage: float = 0.9,
    target_risk: float | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    log_model: bool = True,
    experiment_name: str = "medtransfer",
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> BaselineResult:
    """Fit a logistic-regression baseline on ``data`` and log it to MLflow like a network run.

    Args:
        data: the data module (``class_path``/``init_args``, as in ``fit``); its train/val/test splits are used,
            all through the evaluation transforms.
        features: ``pixels`` (the image resized to ``pixel_size``, flattened) or ``backbone`` (the pooled
            features of a frozen pretrained backbone, at the data's ``image_size``).
        pixel_size: side length of the pixel features.
        backbone: timm model name for ``features: backbone``.
        pretrained: its weights: ``hub``, ``lite0-package`` or a checkpoint path (see ``create_backbone``).
        Cs: inverse L2 strengths tried; the one with the best validation AUROC is kept (ties: the smaller).
        max_iter: lbfgs iterations per fit.
        threshold_policy: how the decision threshold is chosen on validation, as for a network.
        threshold_target: the sensitivity or specificity the ``target_*`` policies must reach.
        confidence_score: ``decision_prob``, ``max_prob`` or ``margin``, as for a network.
        target_coverage: share of validation cases decided; the rest fall in the abstention band.
        target_risk: if set, the largest validation coverage whose error rate is at most this, instead.
        device: where the backbone runs; ``auto`` uses a GPU when there is one.
        log_model: log the fitted scikit-learn pipeline as an MLflow model (``model/``).
        experiment_name: MLflow experiment.
        tracking_uri: MLflow store; ``None``: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``.
        run_name: MLflow run name; ``None``: ``logreg-<features>-<dataset>-<time>``.
    """
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Expected argument `Cs` to be positive numbers, but got {list(Cs)}")
    if pixel_size < 1:
        raise ValueError(f"Expected argument `pixel_size` to be a positive integer, but got {pixel_size}")
    decisions = DecisionFitting(data.task, threshold_policy, threshold_target, confidence_score, target_coverage,
                                target_risk)  # fmt: skip
    network = _frozen_backbone(backbone, pretrained, device) if features == "backbone" else None
    x, y = _features(data, features, pixel_size, network)

    val_metrics = stage_metrics(data.task, data.num_classes, "val")
    fitting = ("train", "val")  # the test split is kept out of the search
    C, model, val_probs, searched = _search_C(
        Cs, max_iter, data.task, val_metrics["val/auroc"], {k: x[k] for k in fitting}, {k: y[k] for k in fitting}
    )
    rule, calibration = decisions.fit(val_probs, y["val"])  # as the network after each validation epoch
    metrics = _scores(rule, val_metrics, val_probs, y["val"])
    metrics |= {"val/threshold": float(rule.threshold.mean()), "val/min_confidence": float(rule.min_confidence.mean())}
    test_probs = _probabilities(model, x["test"], data.task)
    names = [str(n) for n in (getattr(data, "class_names", None) or range(data.num_classes))]
    test_metrics, report = _test_report(rule, calibration, test_probs, y["test"], names)
    metrics |= test_metrics | {f"baseline/val_auroc/C_{c:g}": v for c, v in searched.items()}

    label = "logreg-pixels" if features == "pixels" else f"logreg-{backbone}-features"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = run_name or f"{label}-{getattr(data, 'name', type(data).__name__)}-{stamp}"
    with open_run(experiment_name, run_name, tracking_uri, tags={"medtransfer.command": "baseline"}) as logger:
        log_dataset_inputs(logger.experiment, logger.run_id, data)  # compare groups runs by these
        logger.log_hyperparams(_params(data, decisions, label, features, pretrained, pixel_size, C, Cs, max_iter, x))
        logger.log_metrics(metrics)
        if report is not None:
            _log_plots(logger, rule, calibration, test_probs, y["test"], report, names)
        if log_model:
            _log_model(logger, model, rule, x["val"], names)
    result = BaselineResult(logger.run_id, label, logger.experiment_id, logger.tracking_uri, C, metrics)
    _print_result(result)
    return result


def _print_result(result: BaselineResult) -> None:
    m = result.metrics
    hint = ui_hint(result.tracking_uri, result.experiment_id, result.run_id)
    print(
        f"{result.name}: C={result.C:g} (validation AUROC {m['val/auroc']:.4f}), test AUROC {m['test/auroc']:.4f}, "
        f"accuracy {m['test/acc']:.4f}\n"
        f"MLflow run {result.run_id} (experiment {result.experiment_id}) in {redact(result.tracking_uri)}"
        + (f"\n{hint}" if hint else ""),
        flush=True,
    )


def _frozen_backbone(backbone: str, pretrained: str, device: str) -> nn.Module:
    """The timm backbone in eval mode on ``device`` (``auto``: a GPU when there is one)."""
    network = create_backbone(backbone, pretrained=pretrained).eval()
    return network.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _params(data: ClassificationDataModule, decisions: DecisionFitting, label: str, features: Features,
            pretrained: str, pixel_size: int, C: float, Cs: Sequence[float], max_iter: int,
            x: dict[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """The run's params, named as a network run's (``model.*``, ``data.*``) plus ``baseline.*``."""
    model = {k: v for k, v in asdict(decisions).items() if k not in ("delta", "set_alpha")}
    return {
        "model.backbone": label, "model.pretrained": pretrained if features == "backbone" else "none",
        "model.num_classes": data.num_classes, **{f"model.{k}": v for k, v in model.items()},
        "data": f"{type(data).__module__}.{type(data).__qualname__}",
        **{f"data.{k}": v for k, v in data.hparams.items()},
        "baseline.features": features, "baseline.C": C, "baseline.Cs": ",".join(f"{c:g}" for c in sorted(Cs)),
        "baseline.max_iter": max_iter, "baseline.feature_dim": x["train"].shape[1],
        "baseline.train_images": len(x["train"]),
        **({"baseline.pixel_size": pixel_size} if features == "pixels" else {}),
    }  # fmt: skip
