"""CSV manifests over real PneumoniaMNIST PNGs: labels, splits, patients, boxes and every input error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from manifest_files import assert_patients_disjoint, labelled_csv, load_xray_images, write_csv, write_pngs

from medtransfer.data.sources import csv_manifest
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def xray_images(pneumonia_npz):
    return load_xray_images(pneumonia_npz)


BOX = ("x_min", "y_min", "x_max", "y_max")


def test_csv_binary_by_class_name_is_stratified(tmp_path, xray_images):
    labels = ["pneumonia" if label else "normal" for label in xray_images[1][:40]]
    m = csv_manifest(labelled_csv(tmp_path, xray_images, 40, label=labels), val_fraction=0.25, test_fraction=0.25)
    assert m.task == "binary" and m.class_names == ("normal", "pneumonia")
    assert m.targets.dtype == np.int64 and m.targets.tolist() == xray_images[1][:40].tolist()
    assert m.paths[0] == tmp_path / "img" / "000.png" and m.patients is None
    positives = int(m.targets.sum())
    for split in ("val", "test"):  # 10 images each; each holds its share of positives, give or take one
        part = m.subset(split)
        assert len(part) == 10 and abs(int(part.targets.sum()) - positives / 4) <= 1
    assert np.array_equal(m.splits, csv_manifest(tmp_path / "labels.csv", val_fraction=0.25, test_fraction=0.25).splits)


def test_csv_multiclass_by_integer_and_class_names(tmp_path, xray_images):
    csv = labelled_csv(tmp_path, xray_images, 18, label=[str(i % 3) for i in range(18)])
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
    csv = labelled_csv(tmp_path, xray_images, n, a=a, b=b, fold=splits)
    m = csv_manifest(csv, label_columns=("a", "b"), split_column="fold")
    assert m.task == "multilabel" and m.class_names == ("a", "b")
    assert m.targets.dtype == np.float32 and m.targets.tolist() == [[x, y] for x, y in zip(a, b, strict=True)]
    assert m.splits.tolist() == ["train"] * 6 + ["val"] * 3 + ["test"] * 3


def test_csv_split_column_named_split_is_used_and_said(tmp_path, xray_images, caplog):
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    csv = labelled_csv(tmp_path, xray_images, 12, label=[i % 2 for i in range(12)], split=splits)
    with caplog.at_level("WARNING", logger="medtransfer.data.sources"):
        m = csv_manifest(csv)
    assert m.splits.tolist() == splits  # the file's own split, not a random one
    assert "'split' column" in caplog.text and "split_column" in caplog.text


def test_csv_grouped_split_keeps_patients_together(tmp_path, xray_images):
    patients = [f"p{i // 3}" for i in range(30)]  # 10 patients, 3 images each
    csv = labelled_csv(tmp_path, xray_images, 30, label=[i % 2 for i in range(30)], patient=patients)
    m = csv_manifest(csv, patient_column="patient", seed=3)
    assert m.patients.tolist() == patients
    for patient in set(patients):
        assert len(set(m.splits[m.patients == patient])) == 1
    assert_patients_disjoint(m)
    assert [len(set(m.subset(split).patients)) for split in ("train", "val", "test")] == [7, 1, 2]
    assert not np.array_equal(m.splits, csv_manifest(csv, patient_column="patient", seed=4).splits)


def test_csv_boxes_and_image_root(tmp_path, xray_images):
    boxes = {"x_min": [1, "", 0], "y_min": [2, "", 0], "x_max": [10, "", 27.5], "y_max": [20, "", 28]}
    csv = labelled_csv(tmp_path, xray_images, 3, label=["a", "b", "a"], fold=["train", "val", "test"], **boxes)
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
    csv = labelled_csv(tmp_path, xray_images, 12, label=[i % 2 for i in range(12)])
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
    csv = labelled_csv(tmp_path, xray_images, 4, **columns)
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
    csv = labelled_csv(tmp_path, xray_images, 2, label=["a", "b"], fold=["train", "val"], **boxes)
    with pytest.raises(DataError, match=match):
        csv_manifest(csv, box_columns=BOX, split_column="fold")


def test_csv_duplicated_paths_and_wrong_delimiter(tmp_path, xray_images):
    write_pngs(xray_images, tmp_path, ["a.png", "b.png"])
    rows = [{"path": "a.png", "label": 0}, {"path": "b.png", "label": 1}, {"path": "./a.png", "label": 1}]
    with pytest.raises(DataError, match=r"lines \[2, 4\], column 'path': .*a.png' is listed 2 times"):
        csv_manifest(write_csv(tmp_path / "dup.csv", rows))
    with pytest.raises(DataError, match=r"single column 'path;label'.*separated by ';'"):
        csv_manifest(write_csv(tmp_path / "semi.csv", rows[:2], sep=";"))
    with pytest.raises(DataError, match=r"separated by tabs"):
        csv_manifest(write_csv(tmp_path / "tab.csv", rows[:2], sep="\t"))
    with pytest.raises(DataError, match=r"does not exist"):
        csv_manifest(tmp_path / "nothing.csv")
