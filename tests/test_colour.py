"""Colour data end to end: an RGB dataset given as CSV, class folders and MedMNIST-layout npz reaches the model in
three colour channels; a fit's checkpoint and MLflow model carry the colour, and test/predict reproduce its
probabilities; real colour DICOMs predict; bad colour input is one clear error naming the file."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from colour_data import CLASSES, hue_splits, write_files, write_npz
from helpers import DEFAULT_CONFIG, fit_in, tiny_fit_args
from PIL import Image
from pydicom.data import get_testdata_files
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from medtransfer.checkpoints import load_checkpoint
from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import run_predict
from medtransfer.data.images import CsvSource, FolderSource, ImageDataModule
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.data.readers import to_gray
from medtransfer.errors import DataError
from medtransfer.tracking.callbacks import find_mlflow_logger

PAIRS = {"train": 32, "val": 16, "test": 16}
SETTINGS = {"image_size": 32, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "batch_size": 16}


@pytest.fixture(scope="module")
def hue_data(tmp_path_factory) -> dict[str, Path]:
    """The hue-pair tissue tiles as PNG class folders, a CSV of those PNGs, and an npz; plus a gray npz."""
    root = tmp_path_factory.mktemp("colour")
    splits = hue_splits(PAIRS)
    folder, table = write_files(root / "files", splits)
    gray = {split: (to_gray(images), labels) for split, (images, labels) in splits.items()}
    return {"folder": folder, "csv": table, "npz": write_npz(root / "hue.npz", splits),
            "gray_npz": write_npz(root / "gray.npz", gray)}  # fmt: skip


def _datamodule(hue_data, layout: str, **kwargs):
    if layout == "npz":
        return MedMNISTDataModule(path=str(hue_data["npz"]), **SETTINGS, **kwargs)
    source = CsvSource(str(hue_data["csv"]), split_column="split") if layout == "csv" else FolderSource(
        str(hue_data["folder"]))  # fmt: skip
    return ImageDataModule(source, **SETTINGS, **kwargs)


def _pixels(batch: torch.Tensor) -> torch.Tensor:
    """A normalised batch back to 0-255 pixels."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (batch * std + mean) * 255


@pytest.mark.parametrize("layout", ["csv", "folder", "npz"])
def test_every_layout_feeds_the_model_three_colour_channels(hue_data, layout):
    dm = _datamodule(hue_data, layout)
    dm.setup("fit")
    assert dm.color_mode == "rgb"
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        batch, _ = next(iter(loader))
        pixels = _pixels(batch)
        assert batch.shape[1:] == (3, 32, 32)
        assert (pixels[:, 0] - pixels[:, 1]).abs().mean() > 20  # the tint: red up, green down (or the reverse)
    gray = _datamodule(hue_data, layout, color="gray")
    gray.setup("fit")
    pixels = _pixels(next(iter(gray.test_dataloader()))[0])
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-3, rtol=0)  # luma, replicated


def test_colour_augmentation_is_on_for_colour_data_and_off_for_gray(hue_data, pneumonia_npz):
    colour = _datamodule(hue_data, "npz")
    colour.setup("fit")
    names = [type(step).__name__ for step in colour.datasets["train"].transform.transforms]
    assert "ColorJitter" in names and "HEStain" not in names  # stain jitter: for stained histology only
    path = MedMNISTDataModule(path=str(hue_data["npz"]), flag="pathmnist", **SETTINGS)
    path.setup("fit")
    assert "HEStain" in [type(step).__name__ for step in path.datasets["train"].transform.transforms]
    gray = MedMNISTDataModule(path=str(pneumonia_npz), **SETTINGS)
    gray.setup("fit")
    assert gray.color_mode == "gray"
    names = [type(step).__name__ for step in gray.datasets["train"].transform.transforms]
    assert "ColorJitter" not in names and "HEStain" not in names


def test_a_colour_setting_on_one_channel_data_names_the_file(hue_data):
    dm = MedMNISTDataModule(path=str(hue_data["gray_npz"]), color="rgb", **SETTINGS)
    with pytest.raises(DataError, match=re.escape(str(hue_data["gray_npz"])) + r".*one-channel"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------------- a real fit
@pytest.fixture(scope="module")
def fitted(tmp_path_factory, hue_data) -> dict:
    """A tiny CLI fit of the default config on the colour CSV, logged to MLflow."""
    workdir = tmp_path_factory.mktemp("fit")
    cli = fit_in(workdir, [
        "fit", f"--config={DEFAULT_CONFIG}", "--data=medtransfer.data.images.ImageDataModule",
        "--data.source=medtransfer.data.images.CsvSource", f"--data.source.csv_path={hue_data['csv']}",
        "--data.source.split_column=split", "--data.batch_size=16", *tiny_fit_args(2, 1, 2),
    ])  # fmt: skip
    return {
        "store": f"sqlite:///{workdir}/mlruns/mlflow.db",
        "run_id": find_mlflow_logger(cli.trainer).run_id,
        "best": workdir / cli.trainer.checkpoint_callback.best_model_path,
        "test_probs": cli.model.test_outputs["probs"],
    }


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_checkpoint_and_the_mlflow_model_carry_the_colour(fitted):
    assert load_checkpoint(fitted["best"])["input"]["color"] == "rgb"
    mlflow.set_tracking_uri(fitted["store"])
    metadata = mlflow.models.get_model_info(f"runs:/{fitted['run_id']}/model").metadata
    assert metadata["input"]["color"] == "rgb" and metadata["input"]["channels"] == 3


def test_test_and_predict_reproduce_the_probabilities_from_checkpoint_and_mlflow(fitted, hue_data, tmp_path):
    test_csv = tmp_path / "test.csv"
    with hue_data["csv"].open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    test_csv.write_text("path\n" + "".join(f"{hue_data['folder'] / row['path']}\n" for row in rows))
    expected = fitted["test_probs"].numpy()  # the test step's probabilities, in the manifest's order
    for model in (str(fitted["best"]), f"runs:/{fitted['run_id']}/model"):
        out = tmp_path / "out.csv"
        run_predict(str(test_csv), model, output=out, tracking_uri=fitted["store"])
        got = np.array([float(row[f"prob_{CLASSES[1]}"]) for row in _read(out)])
        np.testing.assert_allclose(got, expected[: len(got)], atol=1e-5, err_msg=model)


def test_a_colour_model_given_gray_files_converts_them_and_says_so_once(fitted, tmp_path, caplog):
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i + 30, np.uint8)).save(tmp_path / f"gray{i}.png")
    with caplog.at_level(logging.WARNING, logger="medtransfer.commands.predict"):
        result = run_predict(str(tmp_path), str(fitted["best"]), output=tmp_path / "out.csv")
    assert result.predicted == 3
    notes = [r.message for r in caplog.records if "trained on rgb images" in r.message]
    assert len(notes) == 1 and "replicated to three channels" in notes[0]


def test_a_colour_checkpoint_refuses_to_test_on_gray_data(fitted, hue_data, workdir):
    with pytest.raises(DataError, match=re.escape(str(hue_data["gray_npz"])) + r".*gives gray images"):
        build_cli([
            "test", f"--config={DEFAULT_CONFIG}", f"--data.path={hue_data['gray_npz']}", "--data.image_size=32",
            f"--ckpt_path={fitted['best']}", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
        ])  # fmt: skip


# ------------------------------------------------------------------------------------------- real DICOMs
def _has_pixels(path: str) -> bool:
    return "PixelData" in pydicom.dcmread(path, force=True, stop_before_pixels=False, defer_size=64)


def test_every_pydicom_test_file_predicts_or_gets_a_one_line_reason(fitted, tmp_path):
    files = get_testdata_files("*.dcm")
    listing = tmp_path / "dicoms.csv"
    listing.write_text("path\n" + "".join(f"{path}\n" for path in files))
    result = run_predict(str(listing), str(fitted["best"]), output=tmp_path / "out.csv")
    rows = _read(tmp_path / "out.csv")
    assert len(rows) == len(files)
    with_pixels = {path for path in files if _has_pixels(path)}
    predicted = {row["path"] for row in rows if not row["error"]}
    for row in rows:
        assert row["error"] or row[f"prob_{CLASSES[1]}"], row["path"]
        assert "\n" not in row["error"] and not row["error"].endswith(":"), row["error"]
        for refusal in ("not supported", "PhotometricInterpretation", "missing dependencies", "multi-frame"):
            assert refusal not in row["error"], row["error"]
    assert predicted <= with_pixels
    share = len(predicted) / len(with_pixels)
    print(f"pydicom test files: {len(files)}, with pixel data {len(with_pixels)}, predicted {len(predicted)}")
    assert share >= 0.85, result.failures


# --------------------------------------------------------------------------------------------- bad input
def test_bad_colour_input_is_one_error_naming_the_file(fitted, tmp_path):
    four = tmp_path / "four_channels.tif"
    tifffile.imwrite(four, np.zeros((16, 16, 4), np.uint8), photometric="minisblack", planarconfig="contig")
    two_frames = pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    listing = tmp_path / "bad.csv"
    listing.write_text(f"path\n{four}\n{two_frames}\n")
    run_predict(str(listing), str(fitted["best"]), output=tmp_path / "out.csv", frame="error")
    errors = {Path(row["path"]).name: row["error"] for row in _read(tmp_path / "out.csv")}
    assert errors["four_channels.tif"].startswith(str(four)) and "cannot decode as TIFF" in errors["four_channels.tif"]
    assert "SC_rgb_rle_2frame.dcm" in errors["SC_rgb_rle_2frame.dcm"]
    assert "2 frames" in errors["SC_rgb_rle_2frame.dcm"] and "frame: first" in errors["SC_rgb_rle_2frame.dcm"]


# -------------------------------------------------------------------------------------------- in colour
def test_heatmap_overlays_of_colour_images_are_drawn_over_the_colour_image(fitted, hue_data, tmp_path):
    from medtransfer.explain import overlay

    images = sorted((hue_data["folder"] / "test").rglob("*.png"))[:2]
    for path in images:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / path.name).write_bytes(path.read_bytes())
    run_predict(str(tmp_path / "in"), str(fitted["best"]), output=tmp_path / "out.csv", heatmaps=tmp_path / "maps")
    for row in _read(tmp_path / "out.csv"):
        rgb = np.asarray(Image.open(row["path"]))
        heat = np.load(row["heatmap_npy"])  # the raw map at the image's size, as predict drew it
        written = np.asarray(Image.open(row["heatmap"]))
        np.testing.assert_array_equal(written, overlay(rgb, heat))  # over the colour image, not its luma
        assert not np.array_equal(written, overlay(to_gray(rgb), heat))


def test_the_worst_errors_gallery_shows_colour_inputs_in_colour(hue_data):
    from medtransfer.callbacks.worst_errors import denormalise

    dm = _datamodule(hue_data, "npz")
    dm.setup("test")
    batch, _ = next(iter(dm.test_dataloader()))
    picture = denormalise(batch[0], list(dm.input_spec.mean), list(dm.input_spec.std))
    with np.load(hue_data["npz"]) as data:
        original = data["test_images"][0]
    assert picture.shape == (32, 32, 3) and np.abs(picture[..., 0].astype(int) - picture[..., 1]).mean() > 20
    resized = np.asarray(Image.fromarray(original).resize((32, 32), Image.BILINEAR), dtype=int)
    assert np.abs(picture.astype(int) - resized).mean() < 8  # the tile, in its colours


def test_a_gray_model_reads_colour_files_as_gray_training_did_and_says_so_once(hue_data, caplog):
    from medtransfer.commands.predict import read_as_trained
    from medtransfer.data.readers import read_image

    paths = sorted((hue_data["folder"] / "test").rglob("*.png"))[:3]
    noted: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="medtransfer.commands.predict"):
        images = [read_as_trained(path, "gray", "middle", noted) for path in paths]
    for path, image in zip(paths, images, strict=True):
        np.testing.assert_array_equal(image, read_image(path))  # what a gray data module reads
    notes = [r.message for r in caplog.records if "trained on gray images" in r.message]
    assert len(notes) == 1 and "converted to gray" in notes[0]


def test_frame_all_predicts_every_frame_of_a_multiframe_dicom_as_its_own_row(fitted, tmp_path):
    two = pydicom.data.get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    one = pydicom.data.get_testdata_file("SC_rgb_rle.dcm", download=False)
    listing = tmp_path / "frames.csv"
    listing.write_text(f"path\n{two}\n{one}\n")
    run_predict(str(listing), str(fitted["best"]), output=tmp_path / "all.csv", frame="all")
    rows = _read(tmp_path / "all.csv")
    assert [(Path(r["path"]).name, r["frame"]) for r in rows] == [
        ("SC_rgb_rle_2frame.dcm", "0"), ("SC_rgb_rle_2frame.dcm", "1"), ("SC_rgb_rle.dcm", ""),
    ]  # fmt: skip
    assert not any(r["error"] for r in rows)
    for choice, row in (("first", rows[0]), ("middle", rows[1])):  # the same probabilities as one frame read alone
        run_predict(str(two), str(fitted["best"]), output=tmp_path / "one.csv", frame=choice)
        alone = float(_read(tmp_path / "one.csv")[0][f"prob_{CLASSES[1]}"])  # float32 network: batch-size noise
        assert alone == pytest.approx(float(row[f"prob_{CLASSES[1]}"]), abs=1e-6)
