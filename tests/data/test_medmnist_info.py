"""Tests for the MedMNIST 2D dataset registry."""

import dataclasses
import re
import subprocess
import sys

import pytest

from medtransfer.data.medmnist_info import MedMNISTInfo, get_medmnist_info
from medtransfer.errors import DataError

OFFICIAL_2D_FLAGS = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)
RGB_FLAGS = {"pathmnist", "dermamnist", "retinamnist", "bloodmnist"}


def test_pneumoniamnist_is_binary_grayscale_with_official_labels():
    info = get_medmnist_info("pneumoniamnist")
    assert isinstance(info, MedMNISTInfo)
    assert info.flag == "pneumoniamnist"
    assert info.task == "binary"
    assert dict(info.labels) == {0: "normal", 1: "pneumonia"}
    assert info.num_classes == 2
    assert info.n_channels == 1
    assert info.sizes == (28, 64, 128, 224)


def test_chestmnist_is_multilabel_with_14_findings():
    info = get_medmnist_info("chestmnist")
    assert info.task == "multilabel"
    assert info.num_classes == 14
    assert list(info.labels) == list(range(14))
    assert info.labels[0] == "atelectasis"
    assert info.labels[13] == "hernia"


def test_ordinal_regression_maps_to_multiclass():
    info = get_medmnist_info("retinamnist")
    assert info.task == "multiclass"
    assert info.num_classes == 5


@pytest.mark.parametrize("flag", OFFICIAL_2D_FLAGS)
def test_every_entry_is_consistent(flag):
    info = get_medmnist_info(flag)
    assert info.flag == flag
    assert info.task in ("binary", "multiclass", "multilabel")
    assert info.n_channels == (3 if flag in RGB_FLAGS else 1)
    assert list(info.labels) == list(range(info.num_classes))
    assert info.num_classes >= 2
    assert info.task != "binary" or info.num_classes == 2
    assert info.sizes == (28, 64, 128, 224)
    for size in info.sizes:
        url, md5 = info.resource(size)
        assert re.fullmatch(r"[0-9a-f]{32}", md5)
        assert url == f"https://zenodo.org/records/10519652/files/{info.filename(size)}?download=1"


def test_md5s_are_distinct_across_all_files():
    md5s = [get_medmnist_info(f).resource(s)[1] for f in OFFICIAL_2D_FLAGS for s in get_medmnist_info(f).sizes]
    assert len(md5s) == len(set(md5s)) == 48


def test_known_official_values_spot_check():
    # Copied by hand from MedMNIST/MedMNIST medmnist/info.py (v3.0.2).
    assert get_medmnist_info("pneumoniamnist").resource(28) == (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    )
    assert get_medmnist_info("chestmnist").resource(224)[1] == "45bd33e6f06c3e8cdb481c74a89152aa"
    # Re-released without blank samples in v2.2.4: not the old record-6496656 checksum.
    assert get_medmnist_info("organamnist").resource(28)[1] == "68e3f8846a6bd62f0c9bf841c0d9eacc"


def test_filename_convention():
    info = get_medmnist_info("pneumoniamnist")
    assert info.filename(28) == "pneumoniamnist.npz"
    assert info.filename(64) == "pneumoniamnist_64.npz"
    assert info.filename(224) == "pneumoniamnist_224.npz"


def test_flag_lookup_is_case_insensitive():
    assert get_medmnist_info("PneumoniaMNIST") is get_medmnist_info("pneumoniamnist")


@pytest.mark.parametrize("flag", ["nosuchmnist", "organmnist3d", "", None])
def test_unknown_flag_raises_data_error_listing_known_flags(flag):
    with pytest.raises(DataError) as excinfo:
        get_medmnist_info(flag)
    message = str(excinfo.value)
    assert repr(flag) in message
    for known in OFFICIAL_2D_FLAGS:
        assert known in message


@pytest.mark.parametrize("size", [32, 0, "64", 64.0, True])
def test_unknown_size_raises_data_error_naming_available_sizes(size):
    info = get_medmnist_info("pneumoniamnist")
    for method in (info.resource, info.filename):
        with pytest.raises(DataError, match=r"available sizes: 28, 64, 128, 224") as excinfo:
            method(size)
        assert "pneumoniamnist" in str(excinfo.value)
        assert repr(size) in str(excinfo.value)


def test_entries_are_immutable():
    info = get_medmnist_info("pneumoniamnist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.task = "multiclass"
    with pytest.raises(TypeError):
        info.labels[2] = "other"
    with pytest.raises(TypeError):
        info.resources[28] = ("http://example.invalid/x.npz", "0" * 32)


def test_replace_keeps_mappings_read_only_and_validates_task():
    info = get_medmnist_info("pneumoniamnist")
    changed = dataclasses.replace(info, resources={28: ("http://127.0.0.1/x.npz", "0" * 32)})
    assert changed.sizes == (28,)
    with pytest.raises(TypeError):
        changed.resources[64] = ("x", "y")
    with pytest.raises(DataError, match="task"):
        dataclasses.replace(info, task="regression")


def test_reading_the_registry_imports_neither_torch_nor_the_medmnist_package():
    """``medmnist/__init__`` imports torch and torchvision; the registry reads ``medmnist/info.py`` alone."""
    code = "import sys, medtransfer.data.medmnist_info; print(*sys.modules)"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "medtransfer.data.medmnist_info" in modules
    assert "torch" not in modules and "medmnist" not in modules
