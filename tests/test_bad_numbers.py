"""Bad numbers stop the work with one clear message instead of ending in NaN metrics.

* Training: :class:`~medtransfer.callbacks.finite_check.FiniteCheck` stops a fit at the first NaN/inf loss
  (naming epoch, step and batch) and an evaluation at the first NaN/inf model output (naming the stage). Its
  hooks are tested with a real Lightning ``Trainer`` on Lightning's ``BoringModel``, the fault injected by a test
  callback; the CLI test uses a real trigger: a learning rate of 1e37 overflows the head's weights, and the loss
  of the next step is infinite. (Without the check that fit ends with status 0 and ``train/loss nan``.)
* ``medtransfer evaluate``: a NaN, infinite or out-of-range probability is an error naming file, line and column.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import DEFAULT_CONFIG
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from medtransfer.callbacks.finite_check import FiniteCheck, NonFiniteError
from medtransfer.commands.evaluate import evaluate_predictions
from medtransfer.entry import main
from medtransfer.errors import MedtransferError

TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.image_size=32",
    "--test_after_fit=false",
]


# --------------------------------------------------------------------------------------------------- helpers
class PoisonWeights(Callback):
    """Fill the model's weights with ``value`` at one point of the run: the fault a test injects."""

    def __init__(self, hook: str, value: float = math.nan, at_batch: int = 0) -> None:
        self.value, self.at_batch = value, at_batch
        setattr(self, hook, self._poison)

    def _poison(self, trainer: Trainer, pl_module: BoringModel, *args) -> None:
        batch_idx = args[-1] if args and isinstance(args[-1], int) else 0
        if batch_idx == self.at_batch:
            with torch.no_grad():
                pl_module.layer.weight.fill_(self.value)


def _trainer(tmp_path: Path, *callbacks: Callback, **kwargs) -> Trainer:
    defaults = {
        "max_epochs": 2,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(default_root_dir=tmp_path, callbacks=[FiniteCheck(), *callbacks], **(defaults | kwargs))


# --------------------------------------------------------------------------------------------------- FiniteCheck
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_training_loss_stops_the_fit_naming_the_step(tmp_path, value):
    model = BoringModel()
    trainer = _trainer(tmp_path, PoisonWeights("on_train_batch_start", value, at_batch=2))
    with pytest.raises(NonFiniteError, match=r"Training loss is (nan|inf) at epoch 0, step 2 \(batch 2\): lower"):
        trainer.fit(model)
    assert trainer.global_step == 2  # stopped before the optimizer applied the bad step
    assert isinstance(NonFiniteError("x"), MedtransferError)  # so the CLI prints one line and exits 2


def test_a_non_finite_validation_output_stops_before_the_metrics(tmp_path):
    trainer = _trainer(tmp_path, PoisonWeights("on_validation_start"))
    with pytest.raises(NonFiniteError, match=r"validation output \(logits\) holds 2 NaN and 0 infinite of 2 "):
        trainer.fit(BoringModel())
    assert trainer.current_epoch == 0


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_non_finite_weights_are_caught_when_evaluating_a_model(tmp_path, stage):
    model = BoringModel()
    with torch.no_grad():
        model.layer.bias.fill_(math.inf)
    trainer = _trainer(tmp_path, limit_test_batches=2, limit_predict_batches=2)
    with pytest.raises(NonFiniteError, match=rf"The model's {'validation' if stage == 'validate' else stage} output"):
        getattr(trainer, stage)(model)


def test_a_finite_run_is_untouched_and_leaves_no_hook_behind(tmp_path):
    model = BoringModel()
    trainer = _trainer(tmp_path)
    trainer.fit(model)
    assert trainer.global_step == 8
    assert not model._forward_hooks
    trainer.validate(model)  # the hook comes back for the next stage and goes again
    assert not model._forward_hooks


# --------------------------------------------------------------------------------------------------- the CLI
def test_cli_fit_with_an_absurd_learning_rate_exits_2_naming_the_step(workdir, pneumonia_npz, capsys):
    args = [f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", *TINY]
    args += [
        "--model.optimizer.init_args.lr=1e37",
        "--trainer.callbacks+=medtransfer.callbacks.finite_check.FiniteCheck",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the step the loss first became inf: 1 at a constant rate, 2 under the default's warm-up (a smaller first rate)
    assert re.match(r"medtransfer: error: Training loss is inf at epoch 0, step (\d+) \(batch \1\): lower the", err[-1])
    assert not any(line.startswith("Traceback") for line in err)
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["medtransfer"])
    assert runs["status"].tolist() == ["FAILED"]


# --------------------------------------------------------------------------------------------------- evaluate
def _files(tmp_path: Path, value: str) -> tuple[Path, Path]:
    preds = tmp_path / "preds.csv"
    preds.write_text(f"Image Index,prob_Mass,prob_Edema\na.png,0.1,0.2\nb.png,0.8,{value}\nc.png,0.4,0.3\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("Image Index,Finding Labels\na.png,No Finding\nb.png,Mass|Edema\nc.png,Edema\n")
    return preds, labels


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nan", "the probability is NaN"),
        ("NaN", "the probability is NaN"),
        ("inf", "the probability inf is outside [0, 1]"),
        ("-inf", "the probability -inf is outside [0, 1]"),
        ("-0.01", "the probability -0.01 is outside [0, 1]"),
        ("1.5", "the probability 1.5 is outside [0, 1]"),
        ("1e400", "the probability 1e400 is outside [0, 1]"),
    ],
)
def test_evaluate_rejects_a_bad_probability_with_file_line_and_column(tmp_path, capsys, value, problem):
    preds, labels = _files(tmp_path, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(preds), str(labels)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"medtransfer: error: {preds} line 3, column 'prob_Edema': {problem}\n"


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5, 1.0001])
def test_evaluate_predictions_rejects_bad_probabilities_by_row_and_class(value):
    probs = np.array([[0.1, 0.2], [0.8, 0.9], [0.4, 0.3]])
    probs[2, 1] = value
    targets = np.array([[0, 0], [1, 1], [0, 1]])
    with pytest.raises(ValueError, match=rf"but got {value} at row 2, class 'Edema' \(1 bad value\(s\) in all\)"):
        evaluate_predictions(probs, targets, ["Mass", "Edema"])
