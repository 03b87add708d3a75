"""Manifests from disk: the real ChestX-ray14 sample, and CSV/folder/MURA trees of real PneumoniaMNIST images."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtransfer.commands.evaluate import CHESTXRAY14_FINDINGS
from medtransfer.data.sources import (
    Manifest,
    chestxray14_manifest,
    csv_manifest,
    folder_manifest,
    mura_manifest,
)
from medtransfer.errors import DataError

# Finding counts of the sample, from /work/shared/data/README.md.
SAMPLE_COUNTS = {
    "Infiltration": 105,
    "Atelectasis": 78,
    "Consolidation": 68,
    "Nodule": 67,
    "Effusion": 66,
    "Mass": 60,
    "Pleural_Thickening": 56,
    "Fibrosis": 48,
    "Cardiomegaly": 44,
    "Pneumothorax": 38,
    "Emphysema": 29,
    "Pneumonia": 29,
    "Hernia": 18,
    "Edema": 17,
}
SAMPLE_NO_FINDING = 72
BOX = ("x_min", "y_min", "x_max", "y_max")


# --------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def xray_images(pneumonia_npz) -> np.ndarray:
    """60 real 28x28 PneumoniaMNIST train images, the first 30 of each class in file order, and their labels."""
    with np.load(pneumonia_npz) as data:
        labels = data["train_labels"][:, 0]
        rows = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:30]]))
        return data["train_images"][rows], labels[rows]


def _write_pngs(xray_images, folder: Path, names: list[str]) -> list[Path]:
    """Write one real image per name (cycling through the images) under ``folder``."""
    images, _ = xray_images
    paths = []
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index % len(images)]).save(path)
        paths.append(path)
    return paths


def _write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


def _labelled_csv(tmp_path: Path, xray_images, n: int = 20, **columns) -> Path:
    """``tmp_path/labels.csv`` over ``n`` real PNGs in ``tmp_path/img``; ``columns`` are extra per-row lists."""
    names = [f"img/{index:03d}.png" for index in range(n)]
    _write_pngs(xray_images, tmp_path, names)
    rows = [{"path": name, **{key: values[row] for key, values in columns.items()}} for row, name in enumerate(names)]
    return _write_csv(tmp_path / "labels.csv", rows)


def _split_of(manifest: Manifest) -> dict[str, str]:
    return {path.name: split for path, split in zip(manifest.paths, manifest.splits, strict=True)}


def _assert_patients_disjoint(manifest: Manifest) -> None:
    by_split = {split: set(manifest.subset(split).patients) for split in ("train", "val", "test")}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]


# --------------------------------------------------------------------------------------------------- ChestX-ray14
@pytest.fixture(scope="module")
def sample(chestxray14_sample_dir) -> tuple[Path, Path]:
    return chestxray14_sample_dir / "Data_Entry_2017_v2020.csv", chestxray14_sample_dir / "images"


@pytest.fixture(scope="module")
def sample_manifest(sample) -> Manifest:
    return chestxray14_manifest(*sample)


@pytest.fixture
def small_sample(tmp_path, sample) -> tuple[Path, Path, pd.DataFrame]:
    """The first 12 rows of the sample (CSV as text, every column kept) and their images, copied to tmp_path."""
    labels_csv, images = sample
    lines = labels_csv.read_text().splitlines(keepends=True)[:13]
    (tmp_path / "images").mkdir()
    small = tmp_path / "Data_Entry_2017_v2020.csv"
    small.write_text("".join(lines))
    frame = pd.read_csv(small)
    for name in frame["Image Index"]:
        shutil.copy(images / name, tmp_path / "images" / name)
    return small, tmp_path / "images", frame


def test_chestxray14_sample_counts(sample_manifest, sample):
    m = sample_manifest
    assert len(m) == 500 and m.task == "multilabel" and m.class_names == CHESTXRAY14_FINDINGS
    assert m.targets.shape == (500, 14) and m.targets.dtype == np.float32
    assert dict(zip(m.class_names, m.targets.sum(axis=0).astype(int).tolist(), strict=True)) == SAMPLE_COUNTS
    assert int((m.targets.sum(axis=1) == 0).sum()) == SAMPLE_NO_FINDING
    frame = pd.read_csv(sample[0])
    assert [path.name for path in m.paths] == frame["Image Index"].tolist()
    row = frame["Finding Labels"].tolist().index("Atelectasis|Effusion|Infiltration")
    assert {m.class_names[k] for k in np.flatnonzero(m.targets[row])} == {"Atelectasis", "Effusion", "Infiltration"}
    assert all(path.is_file() for path in m.paths[:20])
    assert m.patients.tolist() == frame["Patient ID"].astype(str).tolist()
    assert m.boxes is None


def test_chestxray14_patient_split_is_disjoint_and_seeded(sample_manifest, sample):
    m = sample_manifest
    assert [len(m.subset(split)) for split in ("train", "val", "test")] == [350, 50, 100]
    _assert_patients_disjoint(m)
    again = chestxray14_manifest(*sample, seed=0)
    other = chestxray14_manifest(*sample, seed=1)
    assert np.array_equal(again.splits, m.splits)
    assert not np.array_equal(other.splits, m.splits)
    subset = m.subset("val")
    assert len(subset.paths) == len(subset.patients) == len(subset.targets) == 50 and set(subset.splits) == {"val"}


def test_chestxray14_official_lists_are_honoured(tmp_path, sample):
    names = pd.read_csv(sample[0])["Image Index"].tolist()
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:300]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join([*names[300:450], "not_in_the_label_file.png"]) + "\n")
    m = chestxray14_manifest(*sample, tmp_path / "train_val_list.txt", tmp_path / "test_list.txt", val_fraction=0.1)
    assert len(m) == 450  # the last 50 rows are in neither list
    assert {path.name for path in m.subset("test").paths} == set(names[300:450])
    assert len(m.subset("val")) == 30 and len(m.subset("train")) == 270
    _assert_patients_disjoint(m)

    only_test = chestxray14_manifest(*sample, test_list=tmp_path / "test_list.txt")
    assert len(only_test) == 500 and len(only_test.subset("test")) == 150
    assert len(only_test.subset("val")) == 35  # 10 % of the 350 other patients


def test_chestxray14_images_below_the_root_are_found(sample, chestxray14_sample_dir):
    m = chestxray14_manifest(sample[0], chestxray14_sample_dir)  # images are in chestxray14_sample/images/
    assert len(m) == 500 and m.paths[0].parent.name == "images"


def test_chestxray14_missing_image_is_an_error_or_skipped(small_sample):
    labels_csv, images, frame = small_sample
    removed = frame["Image Index"][4]  # the 5th data row: line 6
    (images / removed).unlink()
    with pytest.raises(DataError, match=rf"line 6, column 'Image Index': image .*{removed} does not exist"):
        chestxray14_manifest(labels_csv, images)
    m = chestxray14_manifest(labels_csv, images, missing="skip")
    assert len(m) == 11 and removed not in {path.name for path in m.paths}


def test_chestxray14_unknown_finding_names_the_line(small_sample):
    labels_csv, images, frame = small_sample
    frame.loc[2, "Finding Labels"] = "Effusion|Pneumonitis"  # the 3rd data row: line 4
    frame.to_csv(labels_csv, index=False)
    with pytest.raises(DataError, match=r"line 4, column 'Finding Labels': unknown finding 'Pneumonitis'"):
        chestxray14_manifest(labels_csv, images)


def test_chestxray14_lists_must_not_share_images_or_patients(tmp_path, small_sample):
    labels_csv, images, frame = small_sample
    names = frame["Image Index"].tolist()
    (tmp_path / "tv.txt").write_text("\n".join(names[:8]))
    (tmp_path / "test.txt").write_text("\n".join([names[8], names[9], names[3]]))
    with pytest.raises(DataError, match=rf"test.txt line 3: image '{names[3]}' is also in .*tv.txt \(line 4\)"):
        chestxray14_manifest(labels_csv, images, tmp_path / "tv.txt", tmp_path / "test.txt")

    (tmp_path / "test.txt").write_text("\n".join(names[8:]))
    frame.loc[9, "Patient ID"] = frame.loc[2, "Patient ID"]  # line 11 (test) and line 4 (train/val): one patient
    frame.to_csv(labels_csv, index=False)
    with pytest.raises(DataError, match=r"patient '\d+' is in splits \[.*'test'.*\] \(lines \[4, 11\]"):
        chestxray14_manifest(labels_csv, images, tmp_path / "tv.txt", tmp_path / "test.txt")


def test_chestxray14_bad_arguments(sample):
    with pytest.raises(ValueError, match="findings"):
        chestxray14_manifest(*sample, findings=("Atelectasis", "Pneumonitis"))
    with pytest.raises(ValueError, match="val_fraction"):
        chestxray14_manifest(*sample, val_fraction=1.5)
    m = chestxray14_manifest(*sample, findings=("Hernia", "Edema"))
    assert m.class_names == ("Hernia", "Edema") and m.targets.sum(axis=0).tolist() == [18, 17]


# --------------------------------------------------------------------------------------------------- CSV
def test_csv_binary_by_class_name_is_stratified(tmp_path, xray_images):
    labels = ["pneumonia" if label else "normal" for label in xray_images[1][:40]]
    m = csv_manifest(_labelled_csv(tmp_path, xray_images, 40, label=labels), val_fraction=0.25, test_fraction=0.25)
    assert m.task == "binary" and m.class_names == ("normal", "pneumonia")
    assert m.targets.dtype == np.int64 and m.targets.tolist() == xray_images[1][:40].tolist()
    assert m.paths[0] == tmp_path / "img" / "000.png" and m.patients is None
    positives = int(m.targets.sum())
    for split in ("val", "test"):  # 10 images each; each holds its share of positives, give or take one
        part = m.subset(split)
        assert len(part) == 10 and abs(int(part.targets.sum()) - positives / 4) <= 1
    assert np.array_equal(m.splits, csv_manifest(tmp_path / "labels.csv", val_fraction=0.25, test_fraction=0.25).splits)


def test_csv_multiclass_by_integer_and_class_names(tmp_path, xray_images):
    csv = _labelled_csv(tmp_path, xray_images, 18, label=[str(i % 3) for i in range(18)])
    m = csv_manifest(csv)
    assert (
        m.task == "multiclass" and m.class_names == ("0", "1", "2") and m.targets.tolist() == [i % 3 for i in range(18)]
    )
    named = csv_manifest(csv, class_names=("normal", "viral", "bacterial"))
    assert named.class_names == ("normal", "viral", "bacterial") and named.targets.tolist() == m.targets.tolist()


def test_csv_multilabel_columns_and_split_column(tmp_path, xray_images):
    n = 12
    a, b = [i % 2 for i in range(n)], [int(i % 3 == 0) for i in range(n)]
    splits = ["train"] * 6 + ["val"] * 3 + ["TEST "] * 3  # case and spaces forgiven
    csv = _labelled_csv(tmp_path, xray_images, n, a=a, b=b, fold=splits)
    m = csv_manifest(csv, label_columns=("a", "b"), split_column="fold")
    assert m.task == "multilabel" and m.class_names == ("a", "b")
    assert m.targets.dtype == np.float32 and m.targets.tolist() == [[x, y] for x, y in zip(a, b, strict=True)]
    assert m.splits.tolist() == ["train"] * 6 + ["val"] * 3 + ["test"] * 3


def test_csv_split_column_named_split_is_used_and_said(tmp_path, xray_images, caplog):
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    csv = _labelled_csv(tmp_path, xray_images, 12, label=[i % 2 for i in range(12)], split=splits)
    with caplog.at_level("WARNING", logger="medtransfer.data.sources"):
        m = csv_manifest(csv)
    assert m.splits.tolist() == splits  # the file's own split, not a random one
    assert "'split' column" in caplog.text and "split_column" in caplog.text


def test_csv_grouped_split_keeps_patients_together(tmp_path, xray_images):
    patients = [f"p{i // 3}" for i in range(30)]  # 10 patients, 3 images each
    csv = _labelled_csv(tmp_path, xray_images, 30, label=[i % 2 for i in range(30)], patient=patients)
    m = csv_manifest(csv, patient_column="patient", seed=3)
    assert m.patients.tolist() == patients
    for patient in set(patients):
        assert len(set(m.splits[m.patients == patient])) == 1
    _assert_patients_disjoint(m)
    assert [len(set(m.subset(split).patients)) for split in ("train", "val", "test")] == [7, 1, 2]
    assert not np.array_equal(m.splits, csv_manifest(csv, patient_column="patient", seed=4).splits)


def test_csv_boxes_and_image_root(tmp_path, xray_images):
    boxes = {"x_min": [1, "", 0], "y_min": [2, "", 0], "x_max": [10, "", 27.5], "y_max": [20, "", 28]}
    csv = _labelled_csv(tmp_path, xray_images, 3, label=["a", "b", "a"], fold=["train", "val", "test"], **boxes)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.move(csv, other / "labels.csv")
    m = csv_manifest(other / "labels.csv", image_root=tmp_path, split_column="fold", box_columns=BOX)
    assert m.boxes.shape == (3, 4) and m.boxes.dtype == np.float32
    np.testing.assert_array_equal(m.boxes[[0, 2]], [[1, 2, 10, 20], [0, 0, 27.5, 28]])
    assert np.isnan(m.boxes[1]).all()
    assert m.subset("test").boxes.tolist() == [[0, 0, 27.5, 28]]
    with pytest.raises(ValueError, match="read-only"):
        m.boxes[0, 0] = 5


def test_csv_missing_image_is_an_error_or_skipped(tmp_path, xray_images):
    csv = _labelled_csv(tmp_path, xray_images, 12, label=[i % 2 for i in range(12)])
    (tmp_path / "img" / "001.png").unlink()
    with pytest.raises(DataError, match=r"labels.csv line 3, column 'path': image .*001.png does not exist"):
        csv_manifest(csv)
    assert len(csv_manifest(csv, missing="skip")) == 11
    with pytest.raises(DataError, match="none of the 12 images"):
        csv_manifest(csv, image_root=tmp_path / "img")


@pytest.mark.parametrize(
    ("columns", "kwargs", "match"),
    [
        pytest.param(
            {"label": ["a", "b", "a", "b"]},
            {"label_columns": ("diagnosis",)},
            r"no column 'diagnosis'.*its columns are \['path', 'label'\]",
            id="missing-column",
        ),
        pytest.param(
            {"label": ["a", "b", "cat", "b"]},
            {"class_names": ("a", "b")},
            r"line 4, column 'label': unknown label 'cat'",
            id="unknown-label",
        ),
        pytest.param({"label": ["a", "", "a", "b"]}, {}, r"line 3, column 'label': the label is empty", id="empty"),
        pytest.param({"label": ["a"] * 4}, {}, r"every row has the label 'a'", id="one-class"),
        pytest.param({"label": ["a", "b", "c", "b"]}, {"task": "binary"}, r"'binary' needs 2 classes", id="3-classes"),
        pytest.param(
            {"a": [0, 1, 2, 1], "b": [1, 0, 0, 1]},
            {"label_columns": ("a", "b")},
            r"line 4, column 'a': expected a label 0 or 1, but got '2'",
            id="not-0/1",
        ),
        pytest.param(
            {"label": [0, 1, 0, 1], "fold": ["train", "val", "validation", "test"]},
            {"split_column": "fold"},
            r"line 4, column 'fold': unknown split 'validation'",
            id="unknown-split",
        ),
        pytest.param(
            {"label": [0, 1, 0, 1], "fold": ["train", "val", "train", "val"]},
            {"split_column": "fold"},
            r"the 'test' split is empty",
            id="empty-split",
        ),
        pytest.param(
            {"label": [0, 1, 0, 1], "fold": ["train", "val", "test", "train"], "pid": ["p1", "p2", "p1", "p3"]},
            {"split_column": "fold", "patient_column": "pid"},
            r"patient 'p1' is in splits \['test', 'train'\] \(lines \[2, 4\]",
            id="patient-in-two-splits",
        ),
        pytest.param(
            {"label": [0, 1, 0, 1], "pid": ["p1", "", "p2", "p3"]},
            {"patient_column": "pid"},
            r"line 3, column 'pid': the patient id is empty",
            id="empty-patient",
        ),
        pytest.param(
            {"label": [0, 1, 0, 1], "pid": ["p1"] * 4},
            {"patient_column": "pid"},
            r"the 'train' split is empty",
            id="too-few-patients",
        ),
    ],
)
def test_csv_bad_input_names_the_line_or_column(tmp_path, xray_images, columns, kwargs, match):
    csv = _labelled_csv(tmp_path, xray_images, 4, **columns)
    with pytest.raises(DataError, match=match):
        csv_manifest(csv, **kwargs)


@pytest.mark.parametrize(
    ("boxes", "match"),
    [
        pytest.param(
            {"x_min": [1, 5], "y_min": [1, 1], "x_max": [9, 5], "y_max": [9, 9]},
            r"line 3: box .* is empty or inverted; expected x_max > x_min",
            id="x-inverted",
        ),
        pytest.param(
            {"x_min": [1, 1], "y_min": [1, 9], "x_max": [9, 9], "y_max": [9, 2]},
            r"line 3: box .*y_max > y_min",
            id="y-inverted",
        ),
        pytest.param(
            {"x_min": [1, 1], "y_min": [1, ""], "x_max": [9, 9], "y_max": [9, 9]},
            r"line 3: the box lacks \['y_min'\]",
            id="partial",
        ),
        pytest.param(
            {"x_min": ["left", 1], "y_min": [1, 1], "x_max": [9, 9], "y_max": [9, 9]},
            r"line 2, column 'x_min': box coordinate 'left' is not a number",
            id="not-a-number",
        ),
    ],
)
def test_csv_bad_boxes_name_the_line(tmp_path, xray_images, boxes, match):
    csv = _labelled_csv(tmp_path, xray_images, 2, label=["a", "b"], fold=["train", "val"], **boxes)
    with pytest.raises(DataError, match=match):
        csv_manifest(csv, box_columns=BOX, split_column="fold")


def test_csv_duplicated_paths_and_wrong_delimiter(tmp_path, xray_images):
    _write_pngs(xray_images, tmp_path, ["a.png", "b.png"])
    rows = [{"path": "a.png", "label": 0}, {"path": "b.png", "label": 1}, {"path": "./a.png", "label": 1}]
    with pytest.raises(DataError, match=r"lines \[2, 4\], column 'path': .*a.png' is listed 2 times"):
        csv_manifest(_write_csv(tmp_path / "dup.csv", rows))
    with pytest.raises(DataError, match=r"single column 'path;label'.*separated by ';'"):
        csv_manifest(_write_csv(tmp_path / "semi.csv", rows[:2], sep=";"))
    with pytest.raises(DataError, match=r"separated by tabs"):
        csv_manifest(_write_csv(tmp_path / "tab.csv", rows[:2], sep="\t"))
    with pytest.raises(DataError, match=r"does not exist"):
        csv_manifest(tmp_path / "nothing.csv")


# --------------------------------------------------------------------------------------------------- folders
def test_folder_classes_nested_images_and_stratified_split(tmp_path, xray_images):
    _write_pngs(xray_images, tmp_path, [f"normal/{i}.png" for i in range(12)])
    _write_pngs(xray_images, tmp_path, [f"pneumonia/scan{i % 2}/{i}.jpg" for i in range(8)])
    _write_pngs(xray_images, tmp_path, ["normal/.hidden.png", "pneumonia/.cache/x.png", "loose.png"])
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    m = folder_manifest(tmp_path, val_fraction=0.25, test_fraction=0.25)
    assert m.task == "binary" and m.class_names == ("normal", "pneumonia") and len(m) == 20
    assert m.targets.tolist() == [0] * 12 + [1] * 8
    for split in ("val", "test"):
        assert sorted(m.subset(split).targets.tolist()) == [0, 0, 0, 1, 1]  # 5 images: 3 normal, 2 pneumonia

    _write_pngs(xray_images, tmp_path, [f"covid/{i}.png" for i in range(4)])
    three = folder_manifest(tmp_path)
    assert three.task == "multiclass" and three.class_names == ("covid", "normal", "pneumonia")


def test_folder_split_folders_are_honoured(tmp_path, xray_images):
    names = [
        f"{split}/{cls}/{i}.png" for split, n in (("train", 10), ("test", 3)) for cls in ("a", "b") for i in range(n)
    ]
    _write_pngs(xray_images, tmp_path, names)
    m = folder_manifest(tmp_path, val_fraction=0.2, test_fraction=0.5)  # test_fraction unused: test/ exists
    assert len(m.subset("test")) == 6 and all(path.parts[-3] == "test" for path in m.subset("test").paths)
    assert sorted(m.subset("val").targets.tolist()) == [0, 0, 1, 1]  # 20 % of train, stratified
    _write_pngs(xray_images, tmp_path, ["val/a/0.png", "val/b/0.png"])
    with_val = folder_manifest(tmp_path)
    val_names = {path.relative_to(tmp_path).as_posix() for path in with_val.subset("val").paths}
    assert val_names == {"val/a/0.png", "val/b/0.png"}
    assert len(with_val.subset("train")) == 20


def test_folder_bad_layouts(tmp_path, xray_images):
    with pytest.raises(DataError, match="does not exist"):
        folder_manifest(tmp_path / "absent")
    _write_pngs(xray_images, tmp_path, ["only/1.png", "only/2.png"])
    with pytest.raises(DataError, match=r"1 class folder\(s\) \['only'\]"):
        folder_manifest(tmp_path)
    _write_pngs(xray_images, tmp_path, ["train/a/1.png", "train/b/1.png"])
    with pytest.raises(DataError, match=r"split folders \['train'\] beside other folders \['only'\]"):
        folder_manifest(tmp_path)
    shutil.rmtree(tmp_path / "only")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"the 'test' split is empty"):
        folder_manifest(tmp_path)


def test_mura_tree_labels_patients_and_official_folders(tmp_path, xray_images):
    names = [
        f"XR_{part}/patient{p:05d}/study{s}_{'positive' if (p + s) % 2 else 'negative'}/image{k}.png"
        for part, patients in (("ELBOW", range(6)), ("HAND", range(4, 10)))
        for p in patients
        for s in (1, 2)
        for k in (1, 2)
    ]
    _write_pngs(xray_images, tmp_path / "MURA", names)
    m = mura_manifest(tmp_path / "MURA", val_fraction=0.2, test_fraction=0.2)
    assert m.task == "binary" and m.class_names == ("negative", "positive") and len(m) == 48
    assert all(
        target == (path.parent.name.endswith("positive")) for path, target in zip(m.paths, m.targets, strict=True)
    )
    assert set(m.patients) == {f"patient{p:05d}" for p in range(10)}
    _assert_patients_disjoint(m)  # patient00004/5 have elbow and hand studies: still one split
    assert [len(set(m.subset(split).patients)) for split in ("train", "val", "test")] == [6, 2, 2]

    official = tmp_path / "official"
    _write_pngs(
        xray_images, official, [f"train/{name}" for name in names[:32]] + [f"valid/{name}" for name in names[40:]]
    )
    o = mura_manifest(official, val_fraction=0.25)
    assert {path.relative_to(official).parts[0] for path in o.subset("test").paths} == {"valid"}
    assert len(o.subset("test")) == 8 and len(o.subset("val")) == 8  # 2 of the 8 train patients, 4 images each


def test_mura_bad_study_folder_names_the_image(tmp_path, xray_images):
    _write_pngs(xray_images, tmp_path, ["patient00001/study1_positive/image1.png", "patient00001/study2/image1.png"])
    with pytest.raises(DataError, match=r"study2.image1.png: expected a MURA layout"):
        mura_manifest(tmp_path)


# --------------------------------------------------------------------------------------------------- manifest
def test_manifest_checks_shapes_and_splits(tmp_path):
    paths = (tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"`targets` to have shape \(2, 3\)"):
        Manifest(paths, np.zeros((2, 2)), np.array(["train", "val"]), ("x", "y", "z"), "multilabel")
    with pytest.raises(ValueError, match="only"):
        Manifest(paths, np.zeros(2), np.array(["train", "valid"]), ("x", "y"), "binary")
    m = Manifest(paths, [0, 1], ["train", "test"], ["x", "y"], "binary")
    assert m.targets.dtype == np.int64 and len(m) == 2 and repr(m).endswith("train=1, val=0, test=1)")
    with pytest.raises(ValueError, match="split"):
        m.subset("validation")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.task = "multiclass"
