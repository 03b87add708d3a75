"""Prepared data (``medtransfer prepare`` + ``data.prepared``): written once by LitData, read back as the same
images the raw files give, with its labels, settings and source hash checked, resumable by split."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from litdata import StreamingDataset

from medtransfer.data.images import CsvSource, ImageDataModule
from medtransfer.data.prepared import INFO_FILE, check_compatible, prepare, prepared_hash, read_info
from medtransfer.entry import main
from medtransfer.errors import DataError
from medtransfer.models.classifier import ClassifierModule

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_csv(folder: Path, sample_dir: Path, n: int = 24, boxes: bool = True) -> Path:
    """``n`` real ChestX-ray14 images as a binary CSV task (finding or not), with fixed splits and, on every
    other row, a region of interest (so prepare's crop is exercised)."""
    rows = pd.read_csv(sample_dir / "Data_Entry_2017_v2020.csv").head(n)
    frame = pd.DataFrame(
        {
            "path": [str(sample_dir / "images" / name) for name in rows["Image Index"]],
            "label": (rows["Finding Labels"] != "No Finding").astype(int),
            "split": (["train"] * (n // 2)) + (["val"] * (n // 4)) + (["test"] * (n - n // 2 - n // 4)),
        }
    )
    box = [[16, 24, 200, 230] if i % 2 == 0 and boxes else [None] * 4 for i in range(n)]
    frame[["x0", "y0", "x1", "y1"]] = pd.DataFrame(box, dtype="Int64")
    frame["label"] = np.where(np.arange(n) % 3 == 0, 1 - frame["label"], frame["label"])  # both classes per split
    path = folder / "sample.csv"
    frame.to_csv(path, index=False)
    return path


def source_of(csv: Path, **kwargs) -> CsvSource:
    return CsvSource(str(csv), split_column="split", box_columns=["x0", "y0", "x1", "y1"], **kwargs)


def datamodule(csv: Path, prepared: str | None = None, **kwargs) -> ImageDataModule:
    options = dict(image_size=SIZE, mean=MEAN, std=STD, interpolation="area", batch_size=4,
                   rotate_degrees=0, translate=0, scale=0, brightness_contrast=0, clahe=0)  # fmt: skip
    return ImageDataModule(source=source_of(csv), prepared=prepared, **(options | kwargs))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, chestxray14_sample_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prepared")
    csv = sample_csv(folder, chestxray14_sample_dir)
    prepare(datamodule(csv), str(folder / "out"), SIZE, "area", num_workers=1)
    return csv, folder / "out"


def test_prepare_records_labels_splits_hash_and_input_settings(prepared):
    csv, out = prepared
    info = read_info(str(out))
    manifest = source_of(csv).build()
    assert (info.task, info.class_names, info.size, info.interpolation) == ("binary", ["0", "1"], SIZE, "area")
    assert info.manifest_sha256 == prepared_hash(manifest)
    assert {split: entry["count"] for split, entry in info.splits.items()} == {"train": 12, "val": 6, "test": 6}
    assert all(entry["complete"] for entry in info.splits.values())
    train = manifest.subset("train").targets
    assert info.splits["train"]["positive_fraction"] == pytest.approx([train.mean()])


def test_prepared_images_are_the_decoded_cropped_resized_files(prepared):
    csv, out = prepared
    raw = datamodule(csv)
    raw.setup()
    stored = StreamingDataset(str(out / "val"))
    assert len(stored) == 6
    for index in range(len(stored)):
        item = stored[index]
        assert item["image"].shape == (SIZE, SIZE) and item["image"].dtype == np.uint8
        image, _ = raw.datasets["val"][item["row"]]
        from_prepared = raw.datasets["val"].transform(image=item["image"])["image"]
        assert torch.equal(from_prepared, image)


def _outputs(module: ClassifierModule, dataset) -> dict[int, torch.Tensor]:
    return {index: module(dataset[index][0].unsqueeze(0)).squeeze(0) for index in range(len(dataset))}


@torch.no_grad()
def test_a_model_predicts_the_same_on_prepared_data_as_on_the_raw_files(prepared):
    csv, out = prepared
    torch.manual_seed(0)
    module = ClassifierModule(backbone="resnet18", pretrained="none", task="binary").eval()
    raw, streamed = datamodule(csv), datamodule(csv, prepared=str(out))
    raw.setup()
    streamed.setup()
    for split in ("val", "test"):  # evaluation pipelines: no augmentation, no shuffling
        rows = [int(StreamingDataset(str(out / split))[i]["row"]) for i in range(len(streamed.datasets[split]))]
        expected = _outputs(module, raw.datasets[split])
        got = _outputs(module, streamed.datasets[split])
        for index, row in enumerate(rows):
            assert torch.allclose(got[index], expected[row], atol=1e-5, rtol=0), (split, row)


def test_streamed_batches_hold_every_image_once_with_its_target(prepared):
    csv, out = prepared
    module = datamodule(csv, prepared=str(out))
    module.setup()
    targets = torch.cat([y for _, y in module.val_dataloader()])
    assert sorted(targets.tolist()) == sorted(source_of(csv).build().subset("val").targets.tolist())
    x, _ = next(iter(module.train_dataloader()))
    assert x.shape == (4, 3, SIZE, SIZE)


def test_prepared_without_a_source_takes_labels_from_the_folder(prepared):
    _, out = prepared
    module = ImageDataModule(prepared=str(out), image_size=SIZE, mean=MEAN, std=STD, interpolation="area")
    assert (module.task, module.class_names, module.name) == ("binary", ["0", "1"], "prepared")
    module.setup()
    assert len(module.datasets["train"]) == 12


def test_other_input_settings_than_prepared_are_refused(prepared):
    csv, out = prepared
    module = datamodule(csv, prepared=str(out), image_size=48)
    with pytest.raises(DataError, match=r"prepared at 32px \(area\), but this run uses 48px"):
        module.setup()


def test_labels_other_than_the_models_are_refused(prepared):
    _, out = prepared
    info = read_info(str(out))
    with pytest.raises(DataError, match="prepared for a binary task, but the model's task is multilabel"):
        check_compatible(info, str(out), size=SIZE, interpolation="area", task="multilabel")
    with pytest.raises(DataError, match="holds 2 classes"):
        check_compatible(info, str(out), size=SIZE, interpolation="area", num_classes=5)


def test_options_that_need_random_access_are_refused_with_prepared_data(prepared):
    csv, out = prepared
    with pytest.raises(DataError, match="sampler: balanced"):
        datamodule(csv, prepared=str(out), sampler="balanced")


def test_a_folder_not_yet_prepared_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not prepared yet; run `medtransfer prepare` first"):
        ImageDataModule(prepared=str(tmp_path / "nothing"))


def test_an_interrupted_prepare_continues_with_the_incomplete_splits(tmp_path, chestxray14_sample_dir):
    csv = sample_csv(tmp_path, chestxray14_sample_dir, n=16)
    out = str(tmp_path / "out")
    prepare(datamodule(csv), out, SIZE, "area")
    info = json.loads((tmp_path / "out" / INFO_FILE).read_text())
    info["splits"]["test"]["complete"] = False  # as a prepare stopped while writing the test split leaves it
    (tmp_path / "out" / INFO_FILE).write_text(json.dumps(info))
    kept = (tmp_path / "out" / "train" / "index.json").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"split\(s\) \['test'\] not \(completely\) prepared"):
        datamodule(csv, prepared=out).setup()
    prepare(datamodule(csv), out, SIZE, "area")
    assert (tmp_path / "out" / "train" / "index.json").stat().st_mtime_ns == kept  # not written again
    assert read_info(out).complete("test")
    datamodule(csv, prepared=out).setup()


def test_a_changed_source_is_detected_by_hash_and_prepared_afresh(tmp_path, chestxray14_sample_dir):
    csv = sample_csv(tmp_path, chestxray14_sample_dir, n=16)
    out = str(tmp_path / "out")
    prepare(datamodule(csv), out, SIZE, "area")
    frame = pd.read_csv(csv)
    frame.loc[0, "label"] = 1 - frame.loc[0, "label"]  # one relabelled image
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match="the configured source changed since it was prepared"):
        datamodule(csv, prepared=out).setup()
    prepare(datamodule(csv), out, SIZE, "area")
    assert read_info(out).manifest_sha256 == prepared_hash(source_of(csv).build())
    datamodule(csv, prepared=out).setup()


def test_prepare_command_takes_the_fit_config(workdir, chestxray14_sample_dir, capsys):
    csv = sample_csv(workdir, chestxray14_sample_dir, n=16)
    config = workdir / "config.yaml"
    config.write_text(
        "data:\n  class_path: medtransfer.data.images.ImageDataModule\n  init_args:\n"
        f"    source:\n      class_path: medtransfer.data.images.CsvSource\n      init_args:\n"
        f"        csv_path: {csv}\n        split_column: split\n        box_columns: [x0, y0, x1, y1]\n"
        f"    image_size: 24\n    prepared: {workdir / 'out'}\n"
        "model:\n  backbone: tf_efficientnet_lite0\n"
    )
    main(["prepare", f"--config={config}"])
    assert "Prepared" in capsys.readouterr().out
    info = read_info(str(workdir / "out"))
    assert (info.size, info.interpolation) == (24, "bicubic")  # the data module's size, the backbone's filter
    assert not (workdir / "mlruns").exists()  # preparing makes no MLflow run


def test_an_image_replaced_under_the_same_name_is_prepared_afresh(tmp_path, chestxray14_sample_dir):
    csv = sample_csv(tmp_path, chestxray14_sample_dir, n=16)
    frame = pd.read_csv(csv)
    (tmp_path / "images").mkdir()
    frame["path"] = [shutil.copy(path, tmp_path / "images") for path in frame["path"]]
    frame.to_csv(csv, index=False)
    out = str(tmp_path / "out")
    prepare(datamodule(csv), out, SIZE, "area")
    written = (tmp_path / "out" / "train" / "index.json").stat().st_mtime_ns
    shutil.copy(chestxray14_sample_dir / "images" / Path(frame["path"][0]).name, frame["path"][0])  # new mtime
    os.utime(frame["path"][0], ns=(1, 1))
    datamodule(csv, prepared=out).setup()  # same names, labels and splits: fit accepts the folder
    prepare(datamodule(csv), out, SIZE, "area")
    assert (tmp_path / "out" / "train" / "index.json").stat().st_mtime_ns != written
