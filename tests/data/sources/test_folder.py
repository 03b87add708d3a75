"""Class-folder manifests over real PneumoniaMNIST PNGs."""

from __future__ import annotations

import shutil

import pytest
from manifest_files import load_xray_images, write_pngs

from medtransfer.data.sources import folder_manifest
from medtransfer.errors import DataError


@pytest.fixture(scope="module")
def xray_images(pneumonia_npz):
    return load_xray_images(pneumonia_npz)


def test_folder_classes_nested_images_and_stratified_split(tmp_path, xray_images):
    write_pngs(xray_images, tmp_path, [f"normal/{i}.png" for i in range(12)])
    write_pngs(xray_images, tmp_path, [f"pneumonia/scan{i % 2}/{i}.jpg" for i in range(8)])
    write_pngs(xray_images, tmp_path, ["normal/.hidden.png", "pneumonia/.cache/x.png", "loose.png"])
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    m = folder_manifest(tmp_path, val_fraction=0.25, test_fraction=0.25)
    assert m.task == "binary" and m.class_names == ("normal", "pneumonia") and len(m) == 20
    assert m.targets.tolist() == [0] * 12 + [1] * 8
    for split in ("val", "test"):
        assert sorted(m.subset(split).targets.tolist()) == [0, 0, 0, 1, 1]  # 5 images: 3 normal, 2 pneumonia

    write_pngs(xray_images, tmp_path, [f"covid/{i}.png" for i in range(4)])
    three = folder_manifest(tmp_path)
    assert three.task == "multiclass" and three.class_names == ("covid", "normal", "pneumonia")


def test_folder_split_folders_are_honoured(tmp_path, xray_images):
    names = [
        f"{split}/{cls}/{i}.png" for split, n in (("train", 10), ("test", 3)) for cls in ("a", "b") for i in range(n)
    ]
    write_pngs(xray_images, tmp_path, names)
    m = folder_manifest(tmp_path, val_fraction=0.2, test_fraction=0.5)  # test_fraction unused: test/ exists
    assert len(m.subset("test")) == 6 and all(path.parts[-3] == "test" for path in m.subset("test").paths)
    assert sorted(m.subset("val").targets.tolist()) == [0, 0, 1, 1]  # 20 % of train, stratified
    write_pngs(xray_images, tmp_path, ["val/a/0.png", "val/b/0.png"])
    with_val = folder_manifest(tmp_path)
    val_names = {path.relative_to(tmp_path).as_posix() for path in with_val.subset("val").paths}
    assert val_names == {"val/a/0.png", "val/b/0.png"}
    assert len(with_val.subset("train")) == 20


def test_folder_bad_layouts(tmp_path, xray_images):
    with pytest.raises(DataError, match="does not exist"):
        folder_manifest(tmp_path / "absent")
    write_pngs(xray_images, tmp_path, ["only/1.png", "only/2.png"])
    with pytest.raises(DataError, match=r"1 class folder\(s\) \['only'\]"):
        folder_manifest(tmp_path)
    write_pngs(xray_images, tmp_path, ["train/a/1.png", "train/b/1.png"])
    with pytest.raises(DataError, match=r"split folders \['train'\] beside other folders \['only'\]"):
        folder_manifest(tmp_path)
    shutil.rmtree(tmp_path / "only")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"the 'test' split is empty"):
        folder_manifest(tmp_path)
