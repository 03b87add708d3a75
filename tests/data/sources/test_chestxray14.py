"""ChestX-ray14 manifests from the real 500-image sample and copies of its first rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from manifest_files import assert_patients_disjoint

from medtransfer.commands.evaluate import CHESTXRAY14_FINDINGS
from medtransfer.data.sources import Manifest, chestxray14_manifest
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
    assert_patients_disjoint(m)
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
    assert_patients_disjoint(m)

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
