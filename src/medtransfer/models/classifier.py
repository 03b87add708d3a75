"""The LightningModule medtransfer trains: a timm backbone plus a new task head."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Literal

import timm
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import CatMetric, MetricCollection

from medtransfer.data.input_spec import InputSpec
from medtransfer.data.unlike import reference_from_dataset
from medtransfer.decisions.fitting import DecisionFitting, calibration_metrics
from medtransfer.decisions.report import guarantee_report, prevalence_metrics, report_metrics, selective_report
from medtransfer.decisions.rule import DecisionRule
from medtransfer.decisions.temperature import fit_temperature
from medtransfer.decisions.thresholds import ThresholdPolicy
from medtransfer.errors import DataError
from medtransfer.metrics import functional as F
from medtransfer.metrics.defined import defined_labels, stage_metrics, undefined_names
from medtransfer.models.backbones import create_backbone
from medtransfer.models.class_weights import balanced_pos_weight
from medtransfer.models.test_time_augmentation import TestTimeAugmentation, augmented_views, average_views
from medtransfer.task import Task
from medtransfer.upstream import attached_trainer

__all__ = ["ClassifierModule", "balanced_pos_weight", "probabilities"]


def probabilities(logits: Tensor, temperature: Tensor, task: str) -> Tensor:
    """The model's probabilities, computed here only: softmax (multiclass) or sigmoid of ``logits / temperature``,
    in float64 so that confident cases keep the order of their logits (float32 rounds p > 1 - 6e-8 to 1.0)."""
    logits = logits.double() / temperature.double()
    return logits.softmax(dim=-1) if task == "multiclass" else logits.sigmoid()


class ClassifierModule(LightningModule):
    """Image classifier on a timm backbone, with ``.backbone`` and ``.head`` for the finetuning callback.

    Args:
        backbone: timm model name (``tf_efficientnet_lite0``, ``densenet121``, ``resnet50``, ...).
        pretrained: ``hub``, ``none``, ``lite0-package`` or a checkpoint path (see ``create_backbone``).
        task: ``binary`` (one logit, BCE), ``multiclass`` (softmax, cross-entropy) or ``multilabel`` (one
            sigmoid per label; thresholds and bands per label).
        num_classes: number of classes (2 for a binary task), or of labels for a multi-label task.
        in_chans: input channels the backbone expects (3: grayscale replicated; 1: adapted first conv).
        drop_rate: dropout before the new head.
        optimizer: optimizer factory; its learning rate is the head's (phase 1) learning rate.
        scheduler: optional learning-rate scheduler factory (e.g. ``ReduceLROnPlateau``); it covers the backbone
            group added at the unfreeze too.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        threshold_policy: how the decision threshold is fitted on validation after every validation epoch
            (``youden``, ``target_sensitivity``, ``target_specificity``, ``f1``, ``fixed`` = 0.5).
        threshold_target: the sensitivity or specificity that the ``target_*`` policies must reach.
        temperature_scaling: fit a temperature on the validation (calibration) logits (Guo et al. 2017) and divide
            logits by it; ``False`` leaves the network's own probabilities.
        confidence_score: how sure a decision is: ``decision_prob`` (the probability stated for the decision made),
            ``max_prob`` or ``margin`` (``|p - threshold|``; top-1 minus top-2); the least confident are referred.
        target_coverage: share of validation cases the model should decide on; the rest fall in the abstention band.
        target_risk: if set, instead the largest validation coverage whose error rate is at most this.
        delta: with ``target_risk``, certify the band: selective risk at most ``target_risk`` with probability
            ``1 - delta`` (Learn-Then-Test; see ``decisions.risk_control``), else refer all. ``None``: point estimate.
        set_alpha: multi-class: conformal (APS) sets covering the true class with probability ``1 - set_alpha``; a
            case whose set holds more than one class is referred. ``None``: no sets.
        class_weighting: ``balanced`` weighs positives by ``negatives / positives`` of the training labels
            (CheXNet's weighted BCE; binary and multi-label).
        test_time_augmentation: ``shift_scale`` averages the logits of 7 views (shifts of 5 %, zoom of 10 %, no
            flips) in eval mode, the exported model included.
        channels_last: keep weights and input batches in NHWC memory format (faster with mixed precision).
        compile: compile the backbone with ``torch.compile`` in place (checkpoint keys stay the same).
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
        temperature_scaling: bool = True,
        confidence_score: F.Score = "decision_prob",
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
        DecisionFitting(
            task, threshold_policy, threshold_target, confidence_score, target_coverage, target_risk, delta, set_alpha
        )  # checks the decision arguments (the same errors as baseline's)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)  # the CLI logs the config
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone = create_backbone(backbone, pretrained=pretrained, in_chans=in_chans)
        out_features = 1 if task == "binary" else num_classes
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.backbone.num_features, out_features))
        #: What the backbone takes (size, mean, std, interpolation), for the data module.
        self.input_spec = InputSpec.from_timm(timm.data.resolve_model_data_config(self.backbone), in_chans)
        #: Chosen on validation data; buffers, so every checkpoint carries the values fitted for its weights.
        per_label = (num_classes,) if task == "multilabel" else ()
        self.register_buffer("decision_threshold", torch.full(per_label, 0.5, dtype=torch.float64))
        self.register_buffer("temperature", torch.tensor(1.0))
        #: Decide on a case when its confidence is at least this; below it the model abstains (refers).
        self.register_buffer("min_confidence", torch.zeros(per_label, dtype=torch.float64))
        #: BCE weight of positive cases (``class_weighting``), per label for a multi-label task.
        self.register_buffer("pos_weight", torch.ones(per_label))
        self.val_logits, self.val_targets = CatMetric(), CatMetric()
        self.test_logits, self.test_targets = CatMetric(), CatMetric()
        #: The input a loaded checkpoint was trained on (``color``, ``size``, ...); ``None`` for a new model.
        self.trained_input: InputSpec | None = None
        #: What the decision rule was calibrated on and guarantees (saved in the checkpoint; ``None`` for old models).
        self.calibration: dict[str, Any] | None = None
        #: Probabilities, targets and report values of the last test epoch, for report callbacks.
        self.test_outputs: dict[str, Any] = {}
        self.train_metrics = stage_metrics(task, num_classes, "train")
        self.val_metrics = stage_metrics(task, num_classes, "val")
        self.test_metrics = stage_metrics(task, num_classes, "test")

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
        return probabilities(logits, self.temperature, self.hparams.task)

    @property
    def decision_rule(self) -> DecisionRule:
        """The stored threshold(s) and abstention band as a rule that works on probabilities alone."""
        set_quantile = (self.calibration or {}).get("set_quantile")
        return DecisionRule(
            self.hparams.task, self.decision_threshold, self.min_confidence, self.hparams.confidence_score,
            None if set_quantile is None else float(set_quantile),
        )  # fmt: skip

    @property
    def decision_fitting(self) -> DecisionFitting:
        """How the rule is fitted on validation outputs: the module's decision arguments."""
        names = {f.name for f in fields(DecisionFitting)}
        return DecisionFitting(**{name: value for name, value in self.hparams.items() if name in names})

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
        """Binary tasks: probabilities strictly between ``(low, high)`` are referred."""
        return self.decision_rule.abstention_band

    def on_fit_start(self) -> None:
        """Weigh positives for ``class_weighting="balanced"``; note the validation images' statistics for the
        checkpoint (predict's unlike-training check)."""
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
        """Fit temperature and decision rule on this epoch's validation outputs (gathered by ``CatMetric``, so
        every rank fits the same values), then score decisions."""
        logits, targets = self.val_logits.compute(), self.val_targets.compute()
        self.val_logits.reset()
        self.val_targets.reset()
        held_out = self._calibration_outputs()  # the calib split, when the data module holds one out
        fit_logits, fit_targets = held_out if held_out is not None else (logits, targets)
        if self.hparams.temperature_scaling:
            self.temperature.fill_(fit_temperature(fit_logits, fit_targets, self.hparams.task))
            self.log("val/temperature", self.temperature)
        source = "calib" if held_out is not None else "val"
        rule, self.calibration = self.decision_fitting.fit(self.predict_proba(fit_logits), fit_targets, source)
        if self.hparams.task != "multiclass":
            self.decision_threshold.copy_(rule.threshold)
            self.log("val/threshold", self.decision_threshold.mean())
        self.min_confidence.copy_(rule.min_confidence)
        self.log("val/min_confidence", self.min_confidence.mean())
        self.log_dict(calibration_metrics(self.calibration))
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
        if (
            left_out
            and stage not in warned
            and not (attached_trainer(self) is not None and self.trainer.sanity_checking)
        ):
            warned.add(stage)
            rank_zero_warn(
                f"{stage}: {len(left_out)} of {len(defined)} label(s) have no positive or no negative case in this "
                f"split: {', '.join(left_out)}. Their AUROC, AURC, sensitivity, specificity and selective metrics "
                f"are undefined (NaN, left out of the {stage} means; see {stage}/auroc_labels_defined).\n"
                "HINT: a larger or patient-stratified split, or fewer findings, gives every label cases."
            )
        return defined

    def _label_names(self) -> list[str] | None:
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        if names is None:
            return None
        names = [str(n) for n in names]
        return names[-1:] if self.hparams.task == "binary" else names

    def _calibration_outputs(self) -> tuple[Tensor, Tensor] | None:
        """Logits and targets of the data module's ``calibration_dataloader``, or ``None`` without one."""
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        loader = datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader") else None
        if loader is None:
            return None
        logits, targets = [], []
        with torch.no_grad():
            for x, y in loader:
                logits.append(self(x.to(self.device)).float())
                targets.append(y.to(self.device))
        return torch.cat(logits), torch.cat(targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        """Selective-prediction and calibration report with the stored (validation-fitted) values, and what adapting
        to the test split's estimated prevalence would do; the per-label table is kept in
        ``test_outputs["per_label"]`` for the report callback."""
        logits, targets = self.test_logits.compute(), self.test_targets.compute().long()
        self.test_logits.reset()
        self.test_targets.reset()
        probs, rule = self.predict_proba(logits), self.decision_rule
        report = selective_report(rule, probs, targets, self.temperature)
        report |= guarantee_report(rule, self.calibration, probs, targets)
        if self.hparams.task != "multiclass":
            self._defined(targets, "test")  # names the labels left out, once
        names = self._label_names() or [str(i) for i in range(self.hparams.num_classes)]
        metrics, per_label = report_metrics(report, probs, targets, names, self.hparams.task)
        self.log_dict(metrics | prevalence_metrics(rule, self.calibration, probs, targets, names))
        summary = {name: float(value.nanmean()) for name, value in report.items()}
        self.test_outputs = {"probs": probs.cpu(), "targets": targets.cpu(), "report": summary, "per_label": per_label}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the class names, input settings and calibration record with the weights, for prediction."""
        if self.calibration is not None:
            checkpoint["calibration"] = self.calibration
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        if names is not None:
            checkpoint["class_names"] = [str(name) for name in names]
        spec = getattr(datamodule, "input_spec", None)
        if isinstance(spec, InputSpec):  # with the validation images' statistics: see medtransfer.data.unlike
            checkpoint["input"] = replace(spec, reference=getattr(self, "_input_reference", None) or None).to_dict()
        elif self.trained_input:  # e.g. saved again by a later run without a data module: keep what it was
            checkpoint["input"] = self.trained_input.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the trained input settings (checked by ``test``/``predict``) and the calibration record."""
        self.trained_input = InputSpec.from_dict(checkpoint["input"]) if checkpoint.get("input") else None
        self.calibration = checkpoint.get("calibration")

    def on_test_start(self) -> None:
        """A checkpoint trained on colour (gray) images refuses a data module that feeds gray (colour) ones."""
        datamodule = getattr(self.trainer, "datamodule", None)
        trained = self.trained_input.color if self.trained_input else None
        given = getattr(datamodule, "color_mode", None)
        if trained is not None and given is not None and trained != given:
            raise DataError(
                f"The checkpoint was trained on {trained} images but {datamodule!r} gives {given} images; "
                f"set data.color: {trained} (or give data of the kind it was trained on)"
            )

    def configure_optimizers(self) -> Any:
        """One optimizer over the parameters trainable now, in named groups (``head``, ``backbone``): while the
        backbone is frozen only the head group exists; the finetuning callback adds the other at the unfreeze."""
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
