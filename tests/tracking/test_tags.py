"""Run tags and resolved data params: git state, dataset hashes, versions, devices, readable pipelines."""

from __future__ import annotations

import csv
import hashlib
import shutil
import socket
import subprocess
from pathlib import Path

import lightning
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch import Trainer
from PIL import Image

import medtransfer
from medtransfer.data.images import CsvSource, FolderSource, ImageDataModule
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.data.transforms import build_eval_transform, build_train_transform
from medtransfer.tracking.tags import (
    dataset_tags,
    describe_pipeline,
    file_sha256,
    git_tags,
    resolved_data_params,
    run_tags,
)

HALF = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository with one commit of one tracked file."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory, pneumonia_npz) -> Path:
    """40 real PneumoniaMNIST images as PNG in class folders, and a CSV of the same images."""
    root = tmp_path_factory.mktemp("pngs")
    with np.load(pneumonia_npz) as data:
        images, labels = data["test_images"][:40], data["test_labels"][:40, 0]
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"{['normal', 'pneumonia'][label]}/img{i:03d}.png"
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(root / name)
        rows.append({"path": name, "label": ["normal", "pneumonia"][label]})
    _write_csv(root / "labels.csv", rows)
    return root


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_file_sha256_is_hashlibs_digest_and_is_computed_once_per_file_version(pneumonia_npz, tmp_path):
    assert file_sha256(pneumonia_npz) == hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest()
    hits = file_sha256.cache_info().hits
    file_sha256(pneumonia_npz)
    assert file_sha256.cache_info().hits == hits + 1
    edited = tmp_path / "labels.csv"
    edited.write_text("a,b\n")
    first = file_sha256(edited)
    edited.write_text("a,b\n1,2\n")  # new size and mtime: hashed again
    assert file_sha256(edited) != first == hashlib.sha256(b"a,b\n").hexdigest()


def test_git_tags_name_the_commit_and_whether_tracked_files_changed(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert git_tags(repo) == {"git.commit": head, "git.dirty": "false", "mlflow.source.git.commit": head}
    (repo / "notes.txt").write_text("untracked files do not make a commit dirty\n")
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "train.py").write_text("print('v2')\n")
    assert git_tags(repo)["git.dirty"] == "true"


def test_git_tags_are_empty_outside_a_repository(tmp_path):
    if subprocess.run(["git", "-C", str(tmp_path), "rev-parse"], capture_output=True).returncode == 0:
        pytest.skip(f"{tmp_path} lies inside a git repository")
    assert git_tags(tmp_path) == {}


def test_medmnist_dataset_is_tagged_with_its_npz_file_and_sha256(pneumonia_npz):
    tags = dataset_tags(MedMNISTDataModule(path=str(pneumonia_npz)))
    assert tags == {
        "dataset.name": "pneumoniamnist",
        "dataset.file": str(pneumonia_npz.resolve()),
        "dataset.sha256": hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest(),
    }


def test_csv_dataset_is_tagged_with_its_label_file_and_a_manifest_hash_that_survives_a_move(png_tree, tmp_path):
    tags = dataset_tags(ImageDataModule(CsvSource(str(png_tree / "labels.csv"))))
    assert tags["dataset.name"] == "csv"
    assert tags["dataset.sha256"] == hashlib.sha256((png_tree / "labels.csv").read_bytes()).hexdigest()
    moved = shutil.copytree(png_tree, tmp_path / "moved")
    assert dataset_tags(ImageDataModule(CsvSource(str(moved / "labels.csv")))) == {
        **tags,
        "dataset.file": str((moved / "labels.csv").resolve()),
    }
    rows = list(csv.DictReader((moved / "labels.csv").open()))
    rows[0]["label"] = {"normal": "pneumonia", "pneumonia": "normal"}[rows[0]["label"]]
    _write_csv(moved / "labels.csv", rows)
    changed = dataset_tags(ImageDataModule(CsvSource(str(moved / "labels.csv"))))
    assert changed["dataset.manifest_sha256"] != tags["dataset.manifest_sha256"]
    assert changed["dataset.sha256"] != tags["dataset.sha256"]


def test_folder_dataset_has_no_file_but_a_manifest_hash_that_follows_the_split_seed(png_tree):
    tags = dataset_tags(ImageDataModule(FolderSource(str(png_tree), seed=0)))
    assert tags["dataset.name"] == "folder" and "dataset.sha256" not in tags
    assert len(tags["dataset.manifest_sha256"]) == 64
    assert dataset_tags(ImageDataModule(FolderSource(str(png_tree), seed=0))) == tags
    other_split = dataset_tags(ImageDataModule(FolderSource(str(png_tree), seed=1)))
    assert other_split["dataset.manifest_sha256"] != tags["dataset.manifest_sha256"]


def test_run_tags_place_a_run_on_code_data_software_and_hardware(repo, pneumonia_npz, monkeypatch):
    monkeypatch.chdir(repo)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    tags = run_tags(trainer, MedMNISTDataModule(path=str(pneumonia_npz)))
    assert tags["git.commit"] == _git(repo, "rev-parse", "HEAD") and tags["git.dirty"] == "false"
    assert tags["dataset.sha256"] == hashlib.sha256(pneumonia_npz.read_bytes()).hexdigest()
    assert tags["version.torch"] == torch.__version__
    assert tags["version.lightning"] == lightning.__version__
    assert tags["version.timm"] == timm.__version__
    assert tags["version.medtransfer"] == medtransfer.__version__
    assert tags["host"] == socket.gethostname()
    assert (tags["accelerator"], tags["devices"], tags["num_nodes"], tags["world_size"]) == ("cpu", "1", "1", "1")
    assert tags["precision"] == "32-true"
    assert all(isinstance(v, str) for v in tags.values())


def test_pipelines_read_as_their_steps_with_the_arguments_that_differ_from_defaults():
    train = build_train_transform(64, 3, (0.5,) * 3, (0.5,) * 3, rotate_degrees=10, clahe=0.25)
    assert describe_pipeline(train) == (
        "Resize(height=64, width=64) > Affine(p=1, rotate=(-10, 10), scale=(0.95, 1.05), shear=(0, 0), "
        "translate_percent=(-0.05, 0.05)) > CLAHE(p=0.25, clip_limit=(1, 2)) > ToRGB() > "
        "Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) > ToTensorV2()"
    )
    assert "Affine" not in describe_pipeline(build_eval_transform(64, 3, (0.5,) * 3, (0.5,) * 3))


def test_resolved_data_params_record_size_normalisation_and_pipelines_after_setup(pneumonia_npz):
    dm = MedMNISTDataModule(path=str(pneumonia_npz), **HALF, clahe=0.0, brightness_contrast=0.0)
    assert resolved_data_params(dm) == {}  # nothing is resolved before setup
    dm.setup("fit")
    params = resolved_data_params(dm)
    assert params["data.resolved.image_size"] == "32"
    assert params["data.resolved.mean"] == params["data.resolved.std"] == "(0.5, 0.5, 0.5)"
    assert params["data.resolved.interpolation"] == "bilinear"
    assert params["data.resolved.train_pipeline"].startswith("Resize(height=32, width=32) > Affine(")
    assert "CLAHE" not in params["data.resolved.train_pipeline"]
    assert params["data.resolved.eval_pipeline"] == describe_pipeline(dm.datasets["test"].transform)
