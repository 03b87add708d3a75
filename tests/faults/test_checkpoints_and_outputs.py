"""Damaged checkpoints, checkpoints naming foreign code, and bad ``--output`` paths: each is one line naming the
file at fault, before any work.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.checkpoints import load_checkpoint
from medtransfer.commands.predict import load_predictor
from medtransfer.entry import main
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory) -> Path:
    """A medtransfer checkpoint as LightningCLI writes its hyper-parameters (with Lightning's instantiator)."""
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    torch.manual_seed(0)
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="lite0-package")
    settings = {"size": 32, "mean": list(model.input_spec.mean), "std": list(model.input_spec.std)}
    hyper = {**dict(model.hparams), "pretrained": "none", "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": hyper, "pytorch-lightning_version": "2.6.0",
         "class_names": ["normal", "pneumonia"], "input": {**settings, "interpolation": "bilinear", "channels": 3}},
        path,
    )  # fmt: skip
    return path


@pytest.fixture
def images(tmp_path, pneumonia_npz) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    with np.load(pneumonia_npz) as data:
        for i, image in enumerate(data["test_images"][:3]):
            Image.fromarray(image).save(folder / f"case{i}.png")
    return folder


def _damaged(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated_zip":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("epoch: 3\nthis is a YAML note, not a checkpoint\n")
    elif kind == "plain_state_dict":
        torch.save(torch.load(good, weights_only=True)["state_dict"], path)
    return path


DAMAGE = ["truncated_zip", "zero_bytes", "text_file", "plain_state_dict"]


def _one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exited:
        call()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-500:]
    assert err.startswith("medtransfer: error:") and "Traceback" not in err and err.count("\n") == 1, err[-500:]
    return err


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_it_in_predict_and_fit(
    damage, model_checkpoint, images, pneumonia_npz, tmp_path, workdir, capsys
):
    checkpoint = _damaged(damage, model_checkpoint, tmp_path)
    with pytest.raises(DataError, match=rf"^{checkpoint}: not a (readable |Lightning )?checkpoint"):
        load_checkpoint(checkpoint)
    err = _one_line_error(capsys, lambda: main(["predict", str(images), str(checkpoint), f"--output={tmp_path}/p.csv"]))
    assert str(checkpoint) in err
    fit = ["fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", f"--ckpt_path={checkpoint}"]
    assert str(checkpoint) in _one_line_error(capsys, lambda: main(fit))
    assert not (workdir / "mlruns").exists() or not list((workdir / "mlruns").glob("*/*/checkpoints"))


def test_the_intact_checkpoint_loads(model_checkpoint):
    assert load_predictor(model_checkpoint).class_names == ["normal", "pneumonia"]


@pytest.fixture
def planted_module(tmp_path, monkeypatch) -> tuple[str, Path]:
    """``(module name, marker)``: an importable module that creates ``marker`` when imported."""
    marker = tmp_path / "imported"
    name = f"planted_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Adam: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


@pytest.mark.parametrize("where", ["optimizer", "scheduler", "nested_class_path"])
def test_a_checkpoint_naming_a_module_causes_no_import(model_checkpoint, planted_module, tmp_path, where, capsys):
    name, marker = planted_module
    checkpoint = torch.load(model_checkpoint, weights_only=True)
    if where == "nested_class_path":
        checkpoint["hyper_parameters"]["optimizer"] = {"class_path": f"{name}.Adam", "init_args": {"lr": 0.1}}
    else:
        checkpoint["hyper_parameters"][where] = f"{name}.Adam"
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.raises(DataError, match=rf"^{crafted}: refused to load: hyper-parameter 'optimizer|scheduler'"):
        load_predictor(crafted)
    assert not marker.exists() and name not in sys.modules
    err = _one_line_error(capsys, lambda: main(["predict", str(tmp_path), str(crafted), f"--output={tmp_path}/p.csv"]))
    assert "outside the trusted modules" in err
    assert not marker.exists() and name not in sys.modules


def test_a_trusted_optimizer_in_a_checkpoint_still_loads(model_checkpoint, tmp_path):
    checkpoint = torch.load(model_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = "torch.optim.SGD"
    trusted = tmp_path / "trusted.ckpt"
    torch.save(checkpoint, trusted)
    assert load_predictor(trusted).task == "binary"


def _bad_outputs(tmp_path: Path, images: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    table = tmp_path / "list.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([["path"], *[[str(p)] for p in sorted(images.iterdir())]])
    return {
        "existing_directory": (tmp_path / "a_folder", "is a directory"),
        "parent_is_a_file": (tmp_path / "a_file" / "p.csv", f"cannot be created, {tmp_path / 'a_file'} is a file"),
        "unwritable_place": (Path("/proc/medtransfer-cannot-write/p.csv"), "cannot be written"),
        "the_input_csv": (table, "is the input image list"),
    }


@pytest.mark.parametrize("case", ["existing_directory", "parent_is_a_file", "unwritable_place", "the_input_csv"])
def test_a_bad_output_path_is_refused_before_any_work(case, images, tmp_path, capsys):
    output, reason = _bad_outputs(tmp_path, images)[case]
    table = tmp_path / "list.csv"
    before = table.read_bytes()
    source = str(table) if case == "the_input_csv" else str(images)
    missing_model = tmp_path / "not_loaded_yet.ckpt"  # refused before the model is even looked for
    err = _one_line_error(capsys, lambda: main(["predict", source, str(missing_model), f"--output={output}"]))
    assert f"--output {output}: {reason}" in err
    assert table.read_bytes() == before
    summary = ["predict", str(images), str(missing_model), f"--output={tmp_path}/ok.csv", f"--summary={output}"]
    if case != "the_input_csv":
        assert f"--summary {output}: {reason}" in _one_line_error(capsys, lambda: main(summary))
