"""ImageDataModule: files on disk from each source layout, read, cropped and batched; trained through the CLI."""

from __future__ import annotations

import csv
import inspect
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.data.images import ChestXray14Source, CsvSource, FolderSource, ImageDataModule, MuraSource
from medtransfer.data.sources import chestxray14_manifest, csv_manifest, folder_manifest, mura_manifest
from medtransfer.entry import main
from medtransfer.errors import DataError

REPO = Path(__file__).resolve().parents[2]
HALF = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "batch_size": 8}


@pytest.fixture(scope="module")
def pneumonia_pngs(tmp_path_factory, pneumonia_npz) -> tuple[Path, list[dict]]:
    """60 real PneumoniaMNIST test images written as PNG, with their rows for a CSV."""
    root = tmp_path_factory.mktemp("pngs")
    with np.load(pneumonia_npz) as data:
        images, labels = data["test_images"][:60], data["test_labels"][:60, 0]
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"img{i:03d}.png"
        Image.fromarray(image).save(root / name)
        rows.append({"path": name, "label": ["normal", "pneumonia"][label], "patient": f"p{i // 2}"})
    return root, rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("source", "builder"), [(ChestXray14Source, chestxray14_manifest), (CsvSource, csv_manifest),
                            (FolderSource, folder_manifest), (MuraSource, mura_manifest)],
)  # fmt: skip
def test_a_source_takes_its_builders_options_and_help(source, builder):
    parameters = inspect.signature(builder).parameters
    assert list(inspect.signature(source).parameters) == list(parameters)  # what LightningCLI offers in YAML
    assert source.__init__.__doc__ == builder.__doc__
    required = ("a.csv", "images") if source is ChestXray14Source else ("a.csv",)
    assert list(source(*required).kwargs) == list(parameters)  # every option, defaults filled in
    with pytest.raises(TypeError, match="no_such_option"):
        source(*required, no_such_option=1)


def test_csv_source_reads_real_pixels_in_the_manifest_order(pneumonia_pngs, pneumonia_npz):
    root, rows = pneumonia_pngs
    source = CsvSource(str(_write_csv(root / "labels.csv", rows)), patient_column="patient")
    dm = ImageDataModule(source, **HALF, rotate_degrees=0, translate=0, scale=0)
    assert (dm.task, dm.class_names, dm.name) == ("binary", ["normal", "pneumonia"], "csv")
    dm.setup("fit")
    image, target = dm.datasets["test"][0]
    path = dm.datasets["test"].manifest.paths[0]
    raw = np.asarray(Image.open(path), dtype=np.float32) / 255
    assert image.shape == (3, 32, 32) and target == dm.datasets["test"].manifest.targets[0]
    assert image[0].mean().item() == pytest.approx((raw.mean() - 0.5) / 0.5, abs=0.02)
    batch, targets = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 3, 32, 32) and targets.dtype == torch.int64


def test_boxes_crop_before_resizing(pneumonia_pngs):
    root, rows = pneumonia_pngs
    boxed = [{**row, "x_min": 0, "y_min": 0, "x_max": 14, "y_max": 28} for row in rows]  # left half only
    source = CsvSource(str(_write_csv(root / "boxed.csv", boxed)), box_columns=("x_min", "y_min", "x_max", "y_max"))
    dm = ImageDataModule(source, **HALF, rotate_degrees=0, translate=0, scale=0)
    dm.setup("fit")
    image, _ = dm.datasets["val"][0]
    raw = np.asarray(Image.open(dm.datasets["val"].manifest.paths[0]), dtype=np.float32)[:, :14] / 255
    assert image[0].mean().item() == pytest.approx((raw.mean() - 0.5) / 0.5, abs=0.02)


def test_folder_source_gives_classes_from_folder_names(tmp_path, pneumonia_pngs):
    root, rows = pneumonia_pngs
    for row in rows:
        (tmp_path / row["label"]).mkdir(exist_ok=True)
        (tmp_path / row["label"] / row["path"]).write_bytes((root / row["path"]).read_bytes())
    dm = ImageDataModule(FolderSource(str(tmp_path)), **HALF)
    assert dm.class_names == ["normal", "pneumonia"] and len(dm.manifest) == 60


def test_chestxray14_sample_is_multilabel_with_real_rgba_files(chestxray14_sample_dir):
    source = ChestXray14Source(
        str(chestxray14_sample_dir / "Data_Entry_2017_v2020.csv"), str(chestxray14_sample_dir / "images")
    )
    dm = ImageDataModule(source, **HALF)
    assert dm.task == "multilabel" and dm.num_classes == 14
    dm.setup("fit")
    rgba = [(split, i) for split, ds in dm.datasets.items() for i, p in enumerate(ds.manifest.paths)
            if p.name == "00000100_000.png"]  # fmt: skip
    (split, index), *_ = rgba  # one of the release's RGBA files
    image, target = dm.datasets[split][index]
    assert image.shape == (3, 32, 32) and target.shape == (14,) and target.dtype == torch.float32
    fraction = dm.positive_fraction
    assert fraction.shape == (14,) and 0 < float(fraction.min()) and float(fraction.max()) < 0.5


def test_missing_image_is_named_when_read(pneumonia_pngs, tmp_path):
    root, rows = pneumonia_pngs
    csv_path = _write_csv(tmp_path / "labels.csv", [{**row, "path": str(root / row["path"])} for row in rows])
    dm = ImageDataModule(CsvSource(str(csv_path)), **HALF)
    dm.setup("fit")
    victim = dm.datasets["train"].manifest.paths[0]
    copy = tmp_path / "keep.png"
    copy.write_bytes(victim.read_bytes())
    victim.write_bytes(b"not an image")
    try:
        with pytest.raises(DataError, match=victim.name):
            dm.datasets["train"][0]
    finally:
        victim.write_bytes(copy.read_bytes())


@pytest.mark.slow
def test_cli_fits_the_14_finding_task_on_the_chestxray14_sample(tmp_path, monkeypatch, chestxray14_sample_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    main([
        "fit", f"--config={REPO / 'configs' / 'chestxray14_sample_lite0.yaml'}",
        f"--data.init_args.source.init_args.labels_csv={chestxray14_sample_dir / 'Data_Entry_2017_v2020.csv'}",
        f"--data.init_args.source.init_args.image_root={chestxray14_sample_dir / 'images'}",
        "--trainer.max_epochs=1", "--finetuning.unfreeze_at_epoch=0", "--data.init_args.image_size=32",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = mlflow.search_runs(experiment_names=["medtransfer"]).iloc[0]
    assert run["tags.mlflow.runName"].startswith("tf_efficientnet_lite0-chestxray14-")
    assert "metrics.test/auroc/Pneumonia" in run and "metrics.test/auroc/Hernia" in run
    assert run["params.data.train_transforms.1"] == "albumentations.CLAHE"  # the YAML pipeline was used
    assert 0.0 <= run["metrics.test/auroc"] <= 1.0


def test_cli_fits_a_binary_csv_dataset(tmp_path, monkeypatch, pneumonia_pngs):
    root, rows = pneumonia_pngs
    csv_path = _write_csv(root / "cli.csv", rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    main([
        "fit", f"--config={REPO / 'configs' / 'pneumonia_effnet_lite0.yaml'}",
        "--data=medtransfer.data.images.ImageDataModule",
        "--data.source=medtransfer.data.images.CsvSource", f"--data.source.csv_path={csv_path}",
        "--data.image_size=32", "--trainer.max_epochs=1", "--finetuning.unfreeze_at_epoch=0",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = mlflow.search_runs(experiment_names=["medtransfer"]).iloc[0]
    assert run["params.data.source.csv_path"] == str(csv_path)
    assert "metrics.test/auroc" in run


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_cli_fits_a_multiclass_csv_of_png_jpeg_16bit_and_dicom_files(tmp_path, monkeypatch, pneumonia_npz):
    """Three classes (normal / pneumonia, bright / pneumonia, dark) over every supported file format."""
    with np.load(pneumonia_npz) as data:
        images, labels = data["train_images"][:72], data["train_labels"][:72, 0]
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        cls = 0 if label == 0 else (1 if image.mean() >= 128 else 2)
        kind = ("png", "jpg", "png16", "dcm")[i % 4]
        name = f"case{i:03d}.{'png' if kind == 'png16' else kind}"
        if kind == "dcm":
            _write_dicom(tmp_path / name, image)
        elif kind == "png16":
            Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / name)
        else:
            Image.fromarray(image).save(tmp_path / name)
        rows.append({"path": name, "label": cls, "split": ("train", "train", "val", "test")[i % 4]})
    csv_path = _write_csv(tmp_path / "cases.csv", rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    main([
        "fit", f"--config={REPO / 'configs' / 'pneumonia_effnet_lite0.yaml'}",
        "--data=medtransfer.data.images.ImageDataModule", "--data.source=medtransfer.data.images.CsvSource",
        f"--data.source.csv_path={csv_path}", "--data.source.split_column=split",
        "--data.source.task=multiclass", "--data.image_size=32", "--trainer.max_epochs=1",
        "--finetuning.unfreeze_at_epoch=0", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = mlflow.search_runs(experiment_names=["medtransfer"]).iloc[0]
    assert run["metrics.test/acc"] >= 0.0 and "metrics.test/aurc" in run
    checkpoint = next(tmp_path.glob("mlruns/*/*/checkpoints/*.ckpt"))
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert (hparams["task"], hparams["num_classes"]) == ("multiclass", 3)


def test_mura_source_labels_by_study_folder(tmp_path, pneumonia_pngs):
    root, rows = pneumonia_pngs
    for i, row in enumerate(rows[:24]):
        study = tmp_path / f"patient{i // 3:05d}" / f"study1_{'positive' if i % 2 else 'negative'}"
        study.mkdir(parents=True, exist_ok=True)
        (study / f"image{i}.png").write_bytes((root / row["path"]).read_bytes())
    dm = ImageDataModule(MuraSource(str(tmp_path), val_fraction=0.25, test_fraction=0.25), **HALF)
    assert (dm.task, dm.name, len(dm.manifest)) == ("binary", "mura", 24)
    for path, target in zip(dm.manifest.paths, dm.manifest.targets, strict=True):
        assert path.parent.name.endswith("positive") == (target == 1)


def test_cache_decodes_once_and_matches_reading_from_disk(tmp_path, pneumonia_pngs):
    root, rows = pneumonia_pngs
    for row in rows:
        (tmp_path / row["path"]).write_bytes((root / row["path"]).read_bytes())
    source = CsvSource(str(_write_csv(tmp_path / "labels.csv", rows)))
    plain, cached = ImageDataModule(source, **HALF), ImageDataModule(source, cache=True, **HALF)
    plain.setup("fit")
    cached.setup("fit")
    expected = plain.datasets["val"][3][0]
    for row in rows:  # the cache no longer needs the files
        (tmp_path / row["path"]).unlink()
    torch.testing.assert_close(cached.datasets["val"][3][0], expected, atol=0.02, rtol=0)
    assert len(cached.datasets["train"].cache) == len(cached.datasets["train"])


def test_unreadable_images_are_skipped_with_a_count_when_configured(tmp_path, pneumonia_pngs, caplog):
    root, rows = pneumonia_pngs
    for row in rows:
        (tmp_path / row["path"]).write_bytes((root / row["path"]).read_bytes())
    for row in rows[:3]:
        (tmp_path / row["path"]).write_bytes(b"\x89PNG broken")
    source = CsvSource(str(_write_csv(tmp_path / "labels.csv", rows)))
    dm = ImageDataModule(source, bad_images="skip", **HALF)
    dm.setup("fit")
    assert sum(len(d) for d in dm.datasets.values()) == 57
    assert "Skipping 3 unreadable image(s) of 60" in caplog.text and rows[0]["path"] in caplog.text
    strict = ImageDataModule(source, **HALF)  # bad_images: error checks every header at setup
    with pytest.raises(DataError, match=rf"^3 of 60 images cannot be read .*{rows[0]['path']}"):
        strict.setup("fit")


def test_a_multilabel_modules_label_shares_raise_no_warning(chestxray14_sample_dir):
    """The label shares copy the manifest's read-only targets by name: PyTorch's "NumPy array is not writable"
    warning (once per process, hence a fresh one) is nothing a user can act on."""
    code = """if True:
        import sys, warnings
        warnings.simplefilter("error")
        from medtransfer.data.images import ChestXray14Source, ImageDataModule
        root = sys.argv[1]
        source = ChestXray14Source(labels_csv=root + "/Data_Entry_2017_v2020.csv", image_root=root + "/images")
        data = ImageDataModule(source=source, image_size=32, mean=(0.5,), std=(0.5,))
        data.prepare_data()
        data.setup("fit")
        print(tuple(data.positive_fraction.shape))
    """
    done = subprocess.run([sys.executable, "-c", code, str(chestxray14_sample_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(14,)"
