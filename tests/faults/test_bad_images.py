"""Over a thousand bad image files, mixed with good ones, through the reader, ``predict`` and training.

The corpus (``corpus.py``) classifies every file as "must be read" (valid, awkwardly encoded) or "must be
reported" (bad). ``predict`` must never crash, write one row per file and name every bad file with decision
``error``; training must reject a dataset up front naming its first bad files (``bad_images: error``) or leave
them out with a logged count (``bad_images: skip``); a SIGKILL during ``predict`` must never leave half a CSV.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from corpus import BAD_KINDS, HUGE_SIDE, Case, build_corpus
from PIL import Image

from medtransfer.commands.fit import build_cli
from medtransfer.commands.predict import run_predict
from medtransfer.data.images import CsvSource, ImageDataModule
from medtransfer.data.readers import check_image, read_image
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule

SIZE = 32
DECISIONS = {"positive", "negative", "abstain"}
TRUNCATED = ("truncated_png", "truncated_jpeg")  # bad bodies behind good headers: found only by decoding


@pytest.fixture(scope="module")
def images(pneumonia_npz) -> np.ndarray:
    with np.load(pneumonia_npz) as data:
        return data["test_images"][:100]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, images) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root, images)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A medtransfer checkpoint of EfficientNet-Lite0 (offline ImageNet weights) for 32 px input, without a fit."""
    path = tmp_path_factory.mktemp("model") / "model.ckpt"
    torch.manual_seed(0)
    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="lite0-package")
    settings = {"size": SIZE, "mean": list(model.input_spec.mean), "std": list(model.input_spec.std)}
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**dict(model.hparams), "pretrained": "none"},
            "pytorch-lightning_version": "2.6.0",
            "class_names": ["normal", "pneumonia"],
            "input": {**settings, "interpolation": "bilinear", "channels": 3},
        },
        path,
    )
    return path


def _as_written(path: Path) -> str:
    """A path as the CSV must hold it: valid UTF-8, an undecodable byte of the name shown as an escape."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def test_the_corpus_holds_over_a_thousand_bad_files_of_every_kind(corpus):
    _, cases = corpus
    bad = [case for case in cases if case.expect == "report"]
    assert len(bad) >= 1000
    kinds = {case.kind for case in bad}
    expected = set(BAD_KINDS) - ({"unreadable_permissions"} if os.geteuid() == 0 else set())
    assert kinds == expected


def test_the_reader_reads_every_valid_file_right_and_reports_every_bad_one_by_name(corpus):
    _, cases = corpus
    for case in cases:
        if case.expect == "read":
            gray = read_image(case.path)
            assert gray.dtype == np.uint8 and gray.shape == case.expected.shape, case.kind
            difference = np.abs(gray.astype(np.float64) - case.expected).mean()
            assert difference <= case.tolerance, (case.kind, difference)
        else:
            with pytest.raises(DataError) as caught:
                read_image(case.path)
            assert str(case.path) in str(caught.value), case.kind


def test_the_header_check_finds_every_bad_file_but_those_truncated_after_a_good_header(corpus):
    _, cases = corpus
    for case in cases:
        if case.expect == "read":
            check_image(case.path)
        elif case.kind not in TRUNCATED:
            with pytest.raises(DataError, match=r"\S"):
                check_image(case.path)


def test_an_image_past_pillows_pixel_limit_is_refused_from_its_header(corpus):
    _, cases = corpus
    huge = next(case.path for case in cases if case.kind == "huge_10000x10000")
    assert HUGE_SIDE**2 > Image.MAX_IMAGE_PIXELS and huge.stat().st_size < 1_000_000  # cheap to make, costly to decode
    with pytest.raises(DataError, match=r"refused before decoding: Image size \(100000000 pixels\).*MAX_IMAGE_PIXELS"):
        read_image(huge)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_predict_writes_one_row_per_file_and_names_every_bad_one(corpus, checkpoint, tmp_path, num_workers):
    root, cases = corpus
    output = tmp_path / "predictions.csv"
    result = run_predict(str(root), str(checkpoint), output=output, batch_size=32, num_workers=num_workers)
    with output.open(newline="", encoding="utf-8") as handle:  # valid UTF-8 despite the non-UTF-8 names
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(cases) == result.images
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows)
    for case in cases:
        row = by_path[_as_written(case.path)]
        if case.expect == "read":
            assert row["decision"] in DECISIONS and row["error"] == "", (case.kind, row)
        else:
            assert row["decision"] == "error" and row["error"].strip(), (case.kind, row)
    bad = sum(case.expect == "report" for case in cases)
    assert result.unreadable == bad and result.predicted == len(cases) - bad


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def mixed_csv(corpus, images, tmp_path_factory) -> tuple[Path, list[Case]]:
    """A CSV of 60 good PNGs and three bad files of each kind a CSV can name (UTF-8 paths that exist)."""
    _, cases = corpus
    folder = tmp_path_factory.mktemp("mixed")
    rows = []
    for i, image in enumerate(images[:60]):
        Image.fromarray(image).save(folder / f"good{i:02d}.png")
        rows.append({"path": f"good{i:02d}.png", "label": ["normal", "pneumonia"][i % 2]})
    bad = [
        case
        for kind in BAD_KINDS
        if kind not in ("broken_symlink", "non_utf8_name_bad_bytes")  # a missing file / a non-UTF-8 CSV
        for case in [c for c in cases if c.kind == kind][:3]
    ]
    rows += [{"path": str(case.path), "label": "normal"} for case in bad]
    return _write_csv(folder / "labels.csv", rows), bad


def test_training_rejects_a_dataset_with_bad_images_up_front_naming_the_first(mixed_csv):
    table, bad = mixed_csv
    datamodule = ImageDataModule(CsvSource(str(table)), image_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    found = [case for case in bad if case.kind not in TRUNCATED or _header_fails(case.path)]
    with pytest.raises(DataError, match=rf"^{len(found)} of {60 + len(bad)} images cannot be read") as caught:
        datamodule.setup("fit")
    message = str(caught.value)
    assert "bad_images: skip" in message
    assert sum(str(case.path) in message for case in bad) == 5  # the first five are named


def _header_fails(path: Path) -> bool:
    try:
        check_image(path)
    except DataError:
        return True
    return False


def _config(tmp_path: Path, table: Path, bad_images: str) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "lite0-package"},
        "data": {
            "class_path": "medtransfer.data.images.ImageDataModule",
            "init_args": {
                "source": {"class_path": "medtransfer.data.images.CsvSource", "init_args": {"csv_path": str(table)}},
                "bad_images": bad_images,
                "image_size": SIZE,
                "batch_size": 8,
            },
        },
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2, "enable_progress_bar": False,
            "logger": False, "callbacks": [], "default_root_dir": str(tmp_path),
        },
        "checkpoint": {"dirpath": str(tmp_path / "checkpoints")},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_fit_on_bad_images_stops_before_training_or_skips_them_with_a_count(mixed_csv, tmp_path, caplog):
    table, bad = mixed_csv
    with pytest.raises(DataError, match="images cannot be read"):
        build_cli(["fit", f"--config={_config(tmp_path, table, 'error')}"])
    assert not (tmp_path / "checkpoints").exists()  # stopped before the first step
    cli = build_cli(["fit", f"--config={_config(tmp_path, table, 'skip')}"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert f"Skipping {len(bad)} unreadable image(s) of {60 + len(bad)}" in caplog.text
    assert sum(len(d) for d in cli.datamodule.datasets.values()) == 60


@pytest.mark.slow
def test_a_sigkill_during_predict_leaves_no_csv_only_a_hidden_temporary_file(checkpoint, images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3000):
        Image.fromarray(images[i % len(images)]).save(folder / f"img{i:05d}.png")
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "medtransfer.entry", "predict", str(folder), str(checkpoint), "--output",
               str(out / "predictions.csv"), "--batch_size", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a wait for the first rows, not a timing assertion
        while not any(p.stat().st_size > 0 for p in out.glob(".predictions.csv.*.tmp")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "predict wrote no rows"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "predictions.csv").exists()
    leftovers = [p.name for p in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".predictions.csv.") and leftovers[0].endswith(".tmp")
