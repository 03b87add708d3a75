"""MURA-tree manifests over real PneumoniaMNIST PNGs."""

from __future__ import annotations

import pytest
from manifest_files import assert_patients_disjoint, load_xray_images, write_pngs

from medtransfer.data.sources import mura_manifest
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def xray_images(pneumonia_npz):
    return load_xray_images(pneumonia_npz)


def test_mura_tree_labels_patients_and_official_folders(tmp_path, xray_images):
    names = [
        f"XR_{part}/patient{p:05d}/study{s}_{'positive' if (p + s) % 2 else 'negative'}/image{k}.png"
        for part, patients in (("ELBOW", range(6)), ("HAND", range(4, 10)))
        for p in patients
        for s in (1, 2)
        for k in (1, 2)
    ]
    write_pngs(xray_images, tmp_path / "MURA", names)
    m = mura_manifest(tmp_path / "MURA", val_fraction=0.2, test_fraction=0.2)
    assert m.task == "binary" and m.class_names == ("negative", "positive") and len(m) == 48
    assert all(
        target == (path.parent.name.endswith("positive")) for path, target in zip(m.paths, m.targets, strict=True)
    )
    assert set(m.patients) == {f"patient{p:05d}" for p in range(10)}
    assert_patients_disjoint(m)  # patient00004/5 have elbow and hand studies: still one split
    assert [len(set(m.subset(split).patients)) for split in ("train", "val", "test")] == [6, 2, 2]

    official = tmp_path / "official"
    write_pngs(
        xray_images, official, [f"train/{name}" for name in names[:32]] + [f"valid/{name}" for name in names[40:]]
    )
    o = mura_manifest(official, val_fraction=0.25)
    assert {path.relative_to(official).parts[0] for path in o.subset("test").paths} == {"valid"}
    assert len(o.subset("test")) == 8 and len(o.subset("val")) == 8  # 2 of the 8 train patients, 4 images each


def test_mura_bad_study_folder_names_the_image(tmp_path, xray_images):
    write_pngs(xray_images, tmp_path, ["patient00001/study1_positive/image1.png", "patient00001/study2/image1.png"])
    with pytest.raises(DataError, match=r"study2.image1.png: expected a MURA layout"):
        mura_manifest(tmp_path)
