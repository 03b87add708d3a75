"""A checkpoint written before the modules were reorganised still loads, tests and predicts.

``tests/fixtures/pre_reshuffle_checkpoint.json`` keeps everything of such a checkpoint but its weights (a
32-px fit of the default config by commit bd3b247): the CLI's hyper-parameters with their class paths, the
data module's, the decision buffers, the calibration scores, class names and the ``input`` settings. The test
puts weights of the same architecture back in and runs today's code on it. (Its ``mlflow`` entry is left out:
that run lives in the store it was trained in, and each test here starts a fresh one.)
"""

from __future__ import annotations

import csv
import importlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEFAULT_CONFIG, REPO
from PIL import Image
from sklearn.metrics import roc_auc_score

from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import run_predict
from medtransfer.models.classifier import ClassifierModule

FIXTURE = REPO / "tests" / "fixtures" / "pre_reshuffle_checkpoint.json"


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory) -> Path:
    saved = json.loads(FIXTURE.read_text())
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    state = ClassifierModule(**hparams).state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == saved["state_dict_keys"]  # same architecture
    state.update({k: torch.tensor(v) for k, v in saved["decision_buffers"].items()})
    checkpoint = {k: v for k, v in saved.items() if k not in ("state_dict_keys", "decision_buffers")}
    checkpoint["state_dict"] = state
    path = tmp_path_factory.mktemp("old") / "pre_reshuffle.ckpt"
    torch.save(checkpoint, path)
    return path


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_CLASS_PATH = r"medtransfer(?:\.[a-z_]+)+\.[A-Z]\w+"
#: Class paths users' YAML files name (README, docs/, configs/, and the old checkpoint's own config).
OLD_CLASS_PATHS = sorted(
    {
        *(
            m
            for f in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]
            for m in re.findall(_CLASS_PATH, f.read_text())
        ),
        *(
            m
            for f in (REPO / "configs").rglob("*.yaml")
            for m in re.findall(r"medtransfer(?:\.[a-z_]+)+\.[A-Z]\w+", f.read_text())
        ),
        json.loads(FIXTURE.read_text())["datamodule_hyper_parameters"]["_class_path"],
        "medtransfer.models.classifier.ClassifierModule",
        "medtransfer.data.images.CsvSource",
        "medtransfer.data.medmnist.MedMNISTDataModule",
    }
)


@pytest.mark.parametrize("class_path", OLD_CLASS_PATHS)
def test_the_class_paths_users_wrote_before_the_move_still_resolve(class_path):
    assert isinstance(_resolve(class_path), type)


def test_an_old_checkpoint_loads_with_its_decision_rule(old_checkpoint):
    saved = json.loads(FIXTURE.read_text())
    module = ClassifierModule.load_from_checkpoint(old_checkpoint, weights_only=False)
    assert module.hparams.backbone == "tf_efficientnet_lite0" and module.hparams.task == "binary"
    assert float(module.decision_threshold) == pytest.approx(saved["decision_buffers"]["decision_threshold"])


def test_an_old_checkpoint_tests_through_the_cli(old_checkpoint, pneumonia_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cli = build_cli([
        "test", f"--config={DEFAULT_CONFIG}", f"--data.path={pneumonia_npz}", "--data.image_size=32",
        "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", f"--ckpt_path={old_checkpoint}",
    ])  # fmt: skip
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    stored = json.loads(FIXTURE.read_text())["decision_buffers"]
    default = float(ClassifierModule(pretrained="none").decision_threshold)
    assert stored["decision_threshold"] != pytest.approx(default)  # a fitted value, not the default
    assert metrics["test/threshold"] == pytest.approx(stored["decision_threshold"], abs=1e-7)  # the stored rule
    assert metrics["test/min_confidence"] == pytest.approx(stored["min_confidence"], abs=1e-7)
    # the same weights, loaded apart from the CLI, give the same scores on the same two batches, and their AUROC
    module = ClassifierModule.load_from_checkpoint(old_checkpoint, weights_only=False).eval()
    batches = list(itertools.islice(cli.datamodule.test_dataloader(), 2))
    with torch.no_grad():
        probs = torch.cat([module.predict_proba(module(x).float()) for x, _ in batches]).reshape(-1)
    targets = torch.cat([y for _, y in batches]).reshape(-1)
    assert len(targets) == len(cli.model.test_outputs["targets"]) and 0 < int(targets.sum()) < len(targets)
    assert torch.allclose(probs, cli.model.test_outputs["probs"].reshape(-1), atol=1e-5)
    assert metrics["test/auroc"] == pytest.approx(roc_auc_score(targets.numpy(), probs.numpy()), abs=1e-5)


def test_an_old_checkpoint_predicts_with_its_input_settings(old_checkpoint, pneumonia_npz, tmp_path):
    with np.load(pneumonia_npz) as data:
        images = data["test_images"][:6]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"case{i}.png")
    out = tmp_path / "out.csv"
    run_predict(str(tmp_path), str(old_checkpoint), output=out)
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(0.0 <= float(r["prob_pneumonia"]) <= 1.0 for r in rows)
