"""The LightningModule medtransfer trains: a timm backbone plus a new task head."""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from typing import Any, Literal

import timm
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import CatMetric, MetricCollection
from torchmetrics.classification import AUROC, Accuracy, Recall, Specificity
from torchmetrics.functional.classification import calibration_error, multilabel_auroc

from medtransfer.data.unlike import reference_from_dataset
from medtransfer.decisions.risk_control import (
    calibration_summary,
    check_exchangeability,
    control_selective_risk,
    fit_aps_quantile,
)
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import ThresholdPolicy, fit_thresholds
from medtransfer.errors import DataError
from medtransfer.metrics import functional as F
from medtransfer.metrics.defined import DefinedMean, defined_labels, mask_undefined, undefined_names
from medtransfer.models.backbones import create_backbone
from medtransfer.models.input_spec import InputSpec
from medtransfer.models.test_time_augmentation import TestTimeAugmentation, augmented_views, average_views

__all__ = ["ClassifierModule", "balanced_pos_weight"]

Task = Literal["binary", "multiclass", "multilabel"]


def _stage_metrics(task: Task, num_classes: int, stage: str) -> MetricCollection:
    """AUROC over probabilities; accuracy (and, for binary, sensitivity/specificity) over decisions."""
    kwargs: dict[str, Any] = {"task": task}
    if task == "multiclass":
        kwargs["num_classes"] = num_classes
    elif task == "multilabel":
        kwargs["num_labels"] = num_classes  # macro averages over labels
    metrics = {"auroc": AUROC(**kwargs), "acc": Accuracy(**kwargs)}
    if task != "multiclass":
        # a label without positives (or negatives) has no AUROC/sensitivity/specificity: left out of the mean
        per_label = {"average": None} if task == "multilabel" else {}
        labels = num_classes if task == "multilabel" else 1
        for name, metric in (("auroc", AUROC), ("sensitivity", Recall), ("specificity", Specificity)):
            metrics[name] = DefinedMean(metric(**kwargs, **per_label), labels)
    # no compute groups: the DefinedMean wrappers hold equal states and would be merged into one
    return MetricCollection(metrics, prefix=f"{stage}/", compute_groups=False)


def balanced_pos_weight(fraction: Tensor | Any, names: list[str] | None = None) -> Tensor:
    """CheXNet's weight of positives, ``negatives / positives`` per label, from the training positive fractions.

    A label with no positive (or no negative) training case has nothing to balance: it gets weight 1 and one
    warning naming it, instead of the clamped ``1e6`` that once made a run's validation and test loss explode
    (its rare positives weighed a million times) while the model had learnt nothing about the label.
    """
    fraction = torch.as_tensor(fraction, dtype=torch.float32).reshape(-1)
    present = (fraction > 0) & (fraction < 1)
    weight = torch.where(present, (1 - fraction) / fraction.clamp(1e-12, 1), torch.ones_like(fraction))
    missing = undefined_names(present, names)
    if missing:
        rank_zero_warn(
            f"class_weighting='balanced': {len(missing)} label(s) have no positive or no negative training case: "
            f"{', '.join(missing)}. Their positive weight is 1 (unweighted), not negatives/positives.\n"
            "HINT: the model cannot learn these labels from this training split; drop them or enlarge the split."
        )
    return weight


class ClassifierModule(LightningModule):
    """Image classifier on a timm backbone, with ``.backbone`` and ``.head`` for the finetuning callback.

    Args:
        backbone: timm model name (``tf_efficientnet_lite0``, ``densenet121``, ``resnet50``, ...).
        pretrained: ``hub``, ``none``, ``lite0-package`` or a checkpoint path (see ``create_backbone``).
        task: ``binary`` (one logit, BCE), ``multiclass`` (softmax, cross-entropy) or ``multilabel`` (one
            sigmoid per label, e.g. ChestX-ray14's 14 findings; thresholds and bands per label).
        num_classes: number of classes (2 for a binary task), or of labels for a multi-label task.
        in_chans: input channels the backbone expects (3: grayscale replicated; 1: adapted first conv).
        drop_rate: dropout before the new head.
        optimizer: optimizer factory; its learning rate is the head's (phase 1) learning rate.
        scheduler: optional learning-rate scheduler factory, e.g. ``ReduceLROnPlateau`` (CheXNet: factor 0.1);
            it covers the backbone group added at the unfreeze too.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        threshold_policy: how the binary decision threshold is chosen on the validation set after every
            validation epoch (``youden``, ``target_sensitivity``, ``target_specificity``, ``f1``, ``fixed``
            = 0.5). It is stored in the checkpoint and applied, never re-fitted, by ``test`` and ``predict``.
        threshold_target: the sensitivity or specificity that the ``target_*`` policies must reach.
        temperature_scaling: fit a temperature on the validation logits (Guo et al. 2017) and divide
            logits by it before every probability; stored in the checkpoint like the threshold.
        confidence_score: how sure a decision is: ``margin`` (``|p - threshold|``; top-1 minus top-2 for
            multi-class) or ``max_prob``. Cases are referred to a human from the least confident up.
        target_coverage: share of validation cases the model should decide on itself; the rest fall in the
            abstention band (``refer``). Fitted on validation with the threshold, stored in the checkpoint.
        target_risk: if set, instead the largest validation coverage whose error rate is at most this.
        delta: with ``target_risk``, certify the band: the largest coverage whose selective risk is at most
            ``target_risk`` with probability at least ``1 - delta`` over the calibration draw (Learn-Then-Test,
            fixed-sequence, exact binomial; per label for multi-label; see ``models.risk_control``). When no
            coverage qualifies, every case is referred and the report says so. ``None``: point estimate.
        set_alpha: multi-class: conformal (APS) prediction sets covering the true class with probability
            ``1 - set_alpha``; a case whose set holds more than one class is referred. ``None``: no sets.
        class_weighting: ``balanced`` weighs positives by ``negatives / positives`` of the training labels
            (CheXNet's weighted BCE; binary and multi-label), read from the data module at fit start. A label
            without positive (or negative) training cases gets weight 1 and a warning naming it.
        test_time_augmentation: ``shift_scale`` averages the logits of 7 views (shifts of 5 %, zoom of 10 %, no
            flips) whenever the module is in eval mode: validation, test, predict and the exported model alike.
        channels_last: keep weights and input batches in NHWC memory format (faster convolutions with mixed
            precision on recent GPUs); the checkpoint is unchanged.
        compile: compile the backbone with ``torch.compile`` (in place, so checkpoint keys stay the same) when
            the trainer configures the model; the first steps pay the compilation.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "hub",
        task: Task = "binary",
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        threshold_policy: ThresholdPolicy = "youden",
        threshold_target: float = 0.9,
        temperature_scaling: bool = False,
        confidence_score: F.Score = "margin",
        target_coverage: float = 0.9,
        target_risk: float | None = None,
        class_weighting: Literal["none", "balanced"] = "none",
        test_time_augmentation: TestTimeAugmentation = "none",
        delta: float | None = None,
        set_alpha: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if task == "binary" and num_classes != 2:
            raise ValueError(f"Expected argument `num_classes` to be 2 for a binary task, but got {num_classes}")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be at least 2, but got {num_classes}")
        if task == "multilabel" and num_classes < 1:
            raise ValueError(f"Expected argument `num_classes` to be at least 1 label, but got {num_classes}")
        if not 0.0 < target_coverage <= 1.0:
            raise ValueError(f"Expected argument `target_coverage` to be in (0, 1], but got {target_coverage}")
        if target_risk is not None and not 0.0 <= target_risk <= 1.0:
            raise ValueError(f"Expected argument `target_risk` to be in [0, 1], but got {target_risk}")
        for name, value in (("delta", delta), ("set_alpha", set_alpha)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"Expected argument `{name}` to be in (0, 1), but got {value}")
        if delta is not None and (target_risk is None or not 0.0 < target_risk < 1.0):
            raise ValueError(f"Expected argument `target_risk` to be in (0, 1) with `delta`, but got {target_risk}")
        if set_alpha is not None and task != "multiclass":
            raise ValueError(f"Expected argument `set_alpha` only for a multiclass task, but got task={task!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)  # the CLI logs the config
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone = create_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
        out_features = 1 if task == "binary" else num_classes
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.backbone.num_features, out_features))
        #: What the backbone takes (size, mean, std, interpolation from timm's data config), for the data module.
        self.input_spec = InputSpec.from_timm(timm.data.resolve_model_data_config(self.backbone), in_chans)
        #: Chosen on validation data; buffers, so every checkpoint carries the values fitted for its weights.
        per_label = (num_classes,) if task == "multilabel" else ()
        self.register_buffer("decision_threshold", torch.full(per_label, 0.5))
        self.register_buffer("temperature", torch.tensor(1.0))
        #: Decide on a case when its confidence is at least this; below it the model abstains (refers).
        self.register_buffer("min_confidence", torch.zeros(per_label))
        #: BCE weight of positive cases (``class_weighting``), per label for a multi-label task.
        self.register_buffer("pos_weight", torch.ones(per_label))
        self.val_logits, self.val_targets = CatMetric(), CatMetric()
        self.test_logits, self.test_targets = CatMetric(), CatMetric()
        #: The input a loaded checkpoint was trained on (``color``, ``size``, ...); ``None`` for a new model.
        self.trained_input: InputSpec | None = None
        #: What the decision rule was calibrated on and what it guarantees (``risk_control``, ``set_quantile``,
        #: the calibration scores for the exchangeability check); saved in the checkpoint, ``None`` for models
        #: trained before calibration was recorded.
        self.calibration: dict[str, Any] | None = None
        #: Probabilities, targets and report values of the last test epoch, for report callbacks.
        self.test_outputs: dict[str, Any] = {}
        self.train_metrics = _stage_metrics(task, num_classes, "train")
        self.val_metrics = _stage_metrics(task, num_classes, "val")
        self.test_metrics = _stage_metrics(task, num_classes, "test")

    def configure_model(self) -> None:
        """Apply ``channels_last`` and ``compile`` once, when a trainer sets the model up (fit, test, ...)."""
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        """Return logits: shape ``(N,)`` for a binary task, ``(N, C)`` otherwise."""
        if self.hparams.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        tta = "none" if self.training else self.hparams.get("test_time_augmentation", "none")
        logits = self.head(self.backbone(augmented_views(x, tta)))
        if tta != "none":
            logits = average_views(logits, x.shape[0])
        return logits.squeeze(1) if self.hparams.task == "binary" else logits

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Probabilities from logits (after temperature scaling): sigmoid per output, or softmax (multiclass)."""
        logits = logits / self.temperature
        return logits.softmax(dim=-1) if self.hparams.task == "multiclass" else logits.sigmoid()

    @property
    def decision_rule(self) -> DecisionRule:
        """The stored threshold(s) and abstention band as a rule that works on probabilities alone."""
        set_quantile = (self.calibration or {}).get("set_quantile")
        return DecisionRule(
            self.hparams.task, self.decision_threshold, self.min_confidence, self.hparams.confidence_score,
            None if set_quantile is None else float(set_quantile),
        )  # fmt: skip

    def decide(self, probs: Tensor) -> Tensor:
        """Predicted labels: ``probs >= decision_threshold`` (per label) or the most probable class."""
        return self.decision_rule.decide(probs)

    def confidence(self, probs: Tensor) -> Tensor:
        """Confidence of each decision (see ``confidence_score``), around the stored threshold(s)."""
        return self.decision_rule.confidence(probs)

    def abstains(self, probs: Tensor) -> Tensor:
        """True where the model refers the case instead of deciding (inside the abstention band)."""
        return self.decision_rule.abstains(probs)

    @property
    def abstention_band(self) -> tuple[float, float]:
        """Binary tasks: probabilities strictly between ``(low, high)`` are referred (margin score)."""
        if self.hparams.task != "binary":
            raise ValueError("abstention_band describes a binary task; use `abstains(probs)` for the others")
        t, m = float(self.decision_threshold), float(self.min_confidence)
        return max(0.0, t - m), min(1.0, t + m)

    def fit_min_confidence(self, probs: Tensor, targets: Tensor) -> None:
        """Choose the abstention cut-off on validation outputs for ``target_coverage`` (or ``target_risk``);
        with ``delta``, the certified cut-off (per label) of ``control_selective_risk``."""
        confidence, correct = self.confidence(probs), self.decide(probs) == targets
        if self.hparams.delta is not None:
            columns = confidence.reshape(len(confidence), -1).cpu().numpy()
            hits = correct.reshape(len(correct), -1).cpu().numpy()
            hp = self.hparams
            self._risk_control = [
                control_selective_risk(columns[:, j], hits[:, j], hp.target_risk, hp.delta)
                for j in range(columns.shape[1])
            ]
            cutoffs = torch.tensor([r.cutoff for r in self._risk_control], dtype=self.min_confidence.dtype)
            self.min_confidence.copy_(cutoffs.reshape(self.min_confidence.shape))
            return
        if self.hparams.task == "multilabel":
            cutoffs = [self._cutoff(confidence[:, j], correct[:, j]) for j in range(confidence.shape[1])]
            self.min_confidence.copy_(torch.tensor(cutoffs))
        else:
            self.min_confidence.fill_(self._cutoff(confidence, correct))

    def _cutoff(self, confidence: Tensor, correct: Tensor) -> float:
        coverage, risk, cutoffs = F.risk_coverage_curve(confidence, correct)
        if self.hparams.target_risk is not None:
            ok = torch.nonzero(risk <= self.hparams.target_risk + 1e-12)
            index = int(ok[-1]) if len(ok) else 0  # none meets it: keep only the most confident group
        else:
            index = int(torch.nonzero(coverage >= self.hparams.target_coverage - 1e-9)[0])
        return float(cutoffs[index])

    def on_fit_start(self) -> None:
        """Weigh positives by the training labels' frequencies when ``class_weighting="balanced"``; note the range
        of the validation images' statistics, which checkpoints keep for predict's unlike-training check."""
        datasets = getattr(self.trainer.datamodule, "datasets", None) or {}
        self._input_reference = reference_from_dataset(datasets["val"]) if datasets.get("val") is not None else None
        if self.hparams.class_weighting == "none" or self.hparams.task == "multiclass":
            return
        fraction = getattr(self.trainer.datamodule, "positive_fraction", None)
        if fraction is None:
            raise ValueError("class_weighting='balanced' needs a data module with a `positive_fraction` property")
        self.pos_weight.copy_(balanced_pos_weight(fraction, self._label_names()).reshape(self.pos_weight.shape))

    def model_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Shared by every stage: returns loss, logits and targets."""
        x, y = batch
        logits = self(x).float()  # under bf16/16-mixed autocast: losses and metrics in float32
        if self.hparams.task == "multiclass":
            loss = nn.functional.cross_entropy(logits, y)
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=self.pos_weight)
        return loss, logits.detach(), y

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        loss, logits, y = self.model_step(batch)
        y = y.long()  # multi-label targets arrive as floats (for BCE); metrics want integers
        probs = self.predict_proba(logits)
        # sync_dist: under DDP the epoch loss is the mean over every rank's batches, not rank 0's alone
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        if stage == "test":
            self.test_logits.update(logits)
            self.test_targets.update(y)
        if stage == "val":  # decisions wait for the threshold fitted on the whole epoch
            metrics[f"{stage}/auroc"].update(probs, y)
            self.log(f"{stage}/auroc", metrics[f"{stage}/auroc"], on_step=False, on_epoch=True, prog_bar=True)
            self.val_logits.update(logits)
            self.val_targets.update(y)
            return loss
        self._update_metrics(metrics, probs, y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def _update_metrics(self, metrics: MetricCollection, probs: Tensor, target: Tensor, skip: str = "") -> None:
        decisions = self.decide(probs)
        for name, metric in metrics.items(keep_base=False):
            if name != skip:
                metric.update(probs if name.endswith("/auroc") else decisions, target)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Fit temperature and decision threshold on this epoch's validation outputs, then score decisions.

        Every rank holds the gathered outputs (``CatMetric``), so all ranks fit the same values.
        """
        logits, targets = self.val_logits.compute(), self.val_targets.compute()
        self.val_logits.reset()
        self.val_targets.reset()
        held_out = self._calibration_outputs()  # the calib split, when the data module holds one out
        fit_logits, fit_targets = held_out if held_out is not None else (logits, targets)
        if self.hparams.temperature_scaling:
            self.temperature.fill_(fit_temperature(fit_logits, fit_targets, self.hparams.task))
            self.log("val/temperature", self.temperature)
        fit_probs = self.predict_proba(fit_logits)
        if self.hparams.task != "multiclass":
            threshold = fit_thresholds(
                fit_probs, fit_targets, self.hparams.threshold_policy, self.hparams.threshold_target
            )
            self.decision_threshold.copy_(threshold.reshape(self.decision_threshold.shape))
            self.log("val/threshold", self.decision_threshold.mean())
        self.fit_min_confidence(fit_probs, fit_targets.long())
        self.log("val/min_confidence", self.min_confidence.mean())
        self._record_calibration(fit_probs, fit_targets.long(), "calib" if held_out is not None else "val")
        probs = self.predict_proba(logits)
        if self.hparams.task != "multiclass":
            self.log("val/auroc_labels_defined", float(self._defined(targets, "val").sum()))
        if self.trainer.sanity_checking:
            return
        self._update_metrics(self.val_metrics, probs, targets.long(), skip="val/auroc")
        decision_metrics = {k: m for k, m in self.val_metrics.items(keep_base=False) if k != "val/auroc"}
        self.log_dict(decision_metrics, prog_bar=True)

    def _defined(self, targets: Tensor, stage: str) -> Tensor:
        """Labels with positives and negatives in ``targets``; one warning per stage names those left out."""
        defined = defined_labels(targets).reshape(-1)
        warned: set[str] = self.__dict__.setdefault("_warned_undefined", set())
        left_out = undefined_names(defined, self._label_names())
        if left_out and stage not in warned and not (self._trainer is not None and self.trainer.sanity_checking):
            warned.add(stage)
            rank_zero_warn(
                f"{stage}: {len(left_out)} of {len(defined)} label(s) have no positive or no negative case in this "
                f"split: {', '.join(left_out)}. Their AUROC, AURC, sensitivity, specificity and selective metrics "
                f"are undefined (NaN, left out of the {stage} means; see {stage}/auroc_labels_defined).\n"
                "HINT: a larger or patient-stratified split, or fewer findings, gives every label cases."
            )
        return defined

    def _label_names(self) -> list[str] | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names is None:
            return None
        names = [str(n) for n in names]
        return names[-1:] if self.hparams.task == "binary" else names

    def _calibration_outputs(self) -> tuple[Tensor, Tensor] | None:
        """Logits and targets of the data module's ``calibration_dataloader``, or ``None`` without one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        loader = datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader") else None
        if loader is None:
            return None
        logits, targets = [], []
        with torch.no_grad():
            for x, y in loader:
                logits.append(self(x.to(self.device)).float())
                targets.append(y.to(self.device))
        return torch.cat(logits), torch.cat(targets)

    def _record_calibration(self, probs: Tensor, targets: Tensor, source: str) -> None:
        """Keep what the rule was calibrated on: scores for the exchangeability check, the certified risk
        control and the prediction sets' quantile; log the guarantee's numbers."""
        hp = self.hparams
        record: dict[str, Any] = {"source": source, "n": len(targets)}
        if hp.set_alpha is not None:
            record |= {
                "set_alpha": hp.set_alpha,
                "set_quantile": fit_aps_quantile(probs.cpu(), targets.cpu(), hp.set_alpha),
            }
        self.calibration = record  # the rule below now holds the sets
        record["scores"] = calibration_summary(self.confidence(probs).cpu(), self.decision_rule.positives(probs).cpu())
        if hp.delta is not None:
            results = [asdict(r) for r in getattr(self, "_risk_control", [])]
            record["risk_control"] = {"target_risk": hp.target_risk, "delta": hp.delta, "per_label": results}
            self.log("calib/certified_coverage", sum(r["coverage"] for r in results) / max(len(results), 1))
            self.log("calib/certified", float(all(r["certified"] for r in results)))
        if hp.set_alpha is not None:
            sets = self.decision_rule.prediction_sets(probs)
            record["set_coverage"] = float(sets[torch.arange(len(targets)), targets].double().mean())
            record["set_size"] = float(sets.sum(-1).double().mean())
            self.log("calib/set_size", record["set_size"])

    def exchangeability(self, probs: Tensor) -> Any:
        """The ``ExchangeabilityCheck`` of ``probs`` against the stored calibration scores, or ``None``."""
        scores = (self.calibration or {}).get("scores")
        if scores is None:
            return None
        return check_exchangeability(scores, self.confidence(probs).cpu(), self.decision_rule.positives(probs).cpu())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        """Selective-prediction and calibration report with the stored (validation-fitted) values.

        Multi-label tasks log the mean over labels and each label's AUROC (``test/auroc/<label>``); the full
        per-label table is kept in ``test_outputs["per_label"]`` for the report callback.
        """
        logits, targets = self.test_logits.compute(), self.test_targets.compute().long()
        self.test_logits.reset()
        self.test_targets.reset()
        probs = self.predict_proba(logits)
        report = self.selective_report(probs, targets)
        for name, value in report.items():
            self.log(f"test/{name}", value.nanmean() if value.ndim else value)
        per_label = None
        if self.hparams.task != "multiclass":
            defined = self._defined(targets, "test")
            self.log("test/auroc_labels_defined", float(defined.sum()))
        if self.hparams.task == "multilabel":
            names = self._label_names() or [str(i) for i in range(self.hparams.num_classes)]
            per_label = {"label": names}
            with warnings.catch_warnings():  # named once by _defined instead
                warnings.filterwarnings("ignore", message=r"No (positive|negative) samples in targets")
                auroc = multilabel_auroc(probs, targets, self.hparams.num_classes, average=None)
            per_label["auroc"] = mask_undefined(auroc, defined).tolist()
            per_label |= {name: value.tolist() for name, value in report.items() if value.ndim}
            for label, value, ok in zip(names, per_label["auroc"], defined.tolist(), strict=True):
                if ok:  # undefined labels are left out, never logged as 0
                    self.log(f"test/auroc/{label}", value)
        summary = {name: float(value.nanmean()) for name, value in report.items()}
        self.test_outputs = {"probs": probs.cpu(), "targets": targets.cpu(), "report": summary, "per_label": per_label}

    def selective_report(self, probs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """AURC, ECE, selective accuracy at 80/90/95 % coverage, coverage at 95/99 % accuracy, and what the
        stored abstention band does: share of cases decided and their accuracy. Per label (``(L,)``) for a
        multi-label task, scalars otherwise."""
        task, n = self.hparams.task, self.hparams.num_classes
        confidence, correct = self.confidence(probs), self.decide(probs) == targets
        decided = ~self.abstains(probs)
        if task == "multilabel":
            ece = torch.stack([calibration_error(probs[:, j], targets[:, j], task="binary") for j in range(n)])
        else:
            ece = calibration_error(probs, targets, task=task, num_classes=n, n_bins=15)
        accepted_correct = (correct & decided).sum(0).double()
        defined = defined_labels(targets) if task != "multiclass" else torch.tensor(True)
        report = {
            "aurc": F.aurc(confidence, correct),
            "eaurc": F.eaurc(confidence, correct),
            "augrc": F.augrc(confidence, correct),
            "ece": ece,
            "coverage": decided.double().mean(0),
            "selective_acc": accepted_correct / decided.sum(0).double(),  # NaN when nothing is decided
            "threshold": self.decision_threshold,
            "min_confidence": self.min_confidence,
            "temperature": self.temperature,
        }
        for coverage in (80, 90, 95):
            risk = F.selective_risk_at_coverage(confidence, correct, coverage / 100)
            report[f"selective_acc_cov{coverage}"] = 1 - risk
        for accuracy in (95, 99):
            report[f"coverage_at_acc{accuracy}"] = F.coverage_at_accuracy(confidence, correct, accuracy / 100)
        report |= self._guarantee_report(probs, targets)
        report = {name: torch.as_tensor(value, dtype=torch.float64).cpu() for name, value in report.items()}
        # a label without positives or negatives has no ranking quality to report (NaN; the means skip it)
        for name in report:
            if name.startswith(("aurc", "eaurc", "augrc", "selective_acc", "coverage_at_acc")):
                report[name] = mask_undefined(report[name], defined)
        return report

    def _guarantee_report(self, probs: Tensor, targets: Tensor) -> dict[str, Any]:
        """What the calibration promised (certified, risk bound, calibration coverage; set coverage and size) and
        the exchangeability check's p-values on these cases, warning when they differ from the calibration data."""
        calibration, report = self.calibration or {}, {}
        control = calibration.get("risk_control")
        if control is not None:
            per_label = control["per_label"]
            shape = (-1,) if self.hparams.task == "multilabel" else ()
            for name in ("certified", "risk_bound", "coverage"):
                values = torch.tensor([float(r[name]) for r in per_label], dtype=torch.float64)
                report[f"calib_{name}"] = values.reshape(shape) if shape else values[0]
            report["target_risk"], report["delta"] = control["target_risk"], control["delta"]
        if calibration.get("set_quantile") is not None:
            sets = self.decision_rule.prediction_sets(probs)
            report["set_coverage"] = sets[torch.arange(len(targets)), targets].double().mean()
            report["set_size"] = sets.sum(-1).double().mean()
        check = self.exchangeability(probs)
        if check is None:
            rank_zero_warn(
                "This model holds no calibration data (trained before medtransfer recorded it): its abstention band "
                "is a validation point estimate and no guarantee is claimed. HINT: retrain to calibrate."
            )
            return report
        report["shift_ks_p"], report["shift_rate_p"] = check.ks_p_value, check.rate_p_value
        if check.shifted:
            rank_zero_warn(f"Exchangeability: {check.message()}. The calibration guarantee may not hold here.")
        return report

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Probabilities, decisions at the stored threshold, and whether the stored band refers the case."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self.predict_proba(self(x))
        return {"probs": probs, "decision": self.decide(probs), "abstain": self.abstains(probs)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the data's class names and input settings with the weights, for batch prediction, and the
        calibration record (what the decision rule guarantees and on what data)."""
        if self.calibration is not None:
            checkpoint["calibration"] = self.calibration
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names is not None:
            checkpoint["class_names"] = [str(name) for name in names]
        spec = getattr(datamodule, "input_spec", None)
        if isinstance(spec, InputSpec):  # with the validation images' statistics: see medtransfer.data.unlike
            checkpoint["input"] = replace(spec, reference=getattr(self, "_input_reference", None) or None).to_dict()
        elif self.trained_input:  # e.g. saved again by a later run without a data module: keep what it was
            checkpoint["input"] = self.trained_input.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the input settings the weights were trained with, to check the data of ``test``/``predict``,
        and restore the calibration record (absent in checkpoints from before it was kept: no guarantee)."""
        self.trained_input = InputSpec.from_dict(checkpoint["input"]) if checkpoint.get("input") else None
        self.calibration = checkpoint.get("calibration")

    def _check_colour(self) -> None:
        """A checkpoint trained on colour (gray) images refuses a data module that feeds gray (colour) ones."""
        datamodule = getattr(self.trainer, "datamodule", None)
        trained = self.trained_input.color if self.trained_input else None
        given = getattr(datamodule, "color_mode", None)
        if trained is not None and given is not None and trained != given:
            raise DataError(
                f"The checkpoint was trained on {trained} images but {datamodule!r} gives {given} images; "
                f"set data.color: {trained} (or give data of the kind it was trained on)"
            )

    def on_test_start(self) -> None:
        self._check_colour()

    def on_predict_start(self) -> None:
        self._check_colour()

    def configure_optimizers(self) -> Any:
        """One optimizer over the parameters trainable now, in named groups (``head``, ``backbone``).

        While the finetuning callback keeps the backbone frozen, only the head group exists; the callback
        adds the backbone group when it unfreezes it.
        """
        groups = []
        for name, module in (("head", self.head), ("backbone", self.backbone)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor, "interval": "epoch"},
        }
