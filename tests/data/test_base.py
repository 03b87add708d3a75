"""``train_fraction``: a stratified, seeded, nested subset of the training split; val and test stay whole."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medtransfer.data.base import stratified_subset
from medtransfer.data.medmnist import MedMNISTDataModule
from medtransfer.errors import DataError

NORMALISATION = {"image_size": 28, "mean": (0.5,), "std": (0.5,), "channels": 1}


def _module(path, **kwargs) -> MedMNISTDataModule:
    module = MedMNISTDataModule(path=str(path), **NORMALISATION, **kwargs)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def full(pneumonia_npz) -> MedMNISTDataModule:
    return _module(pneumonia_npz)


def test_a_fraction_keeps_each_class_share_and_leaves_val_and_test_whole(pneumonia_npz, full):
    part = _module(pneumonia_npz, train_fraction=0.1)
    counts_full = np.bincount(full.datasets["train"].targets)
    counts = np.bincount(part.datasets["train"].targets)
    assert counts.tolist() == [math.ceil(0.1 * n) for n in counts_full]  # per class: ceil(f * n_c)
    assert len(part.datasets["val"]) == len(full.datasets["val"])
    assert len(part.datasets["test"]) == len(full.datasets["test"])
    assert float(part.positive_fraction) == pytest.approx(counts[1] / counts.sum())


def test_subset_images_are_real_training_rows(pneumonia_npz, full):
    part = _module(pneumonia_npz, train_fraction=0.05)
    rows = stratified_subset(full.datasets["train"].targets, 0.05, seed=0)
    assert np.array_equal(part.datasets["train"].images, full.datasets["train"].images[rows])
    assert np.array_equal(part.datasets["train"].labels, full.datasets["train"].labels[rows])


def test_same_seed_same_subset_other_seed_other_subset(full):
    targets = full.datasets["train"].targets
    assert np.array_equal(stratified_subset(targets, 0.1, seed=3), stratified_subset(targets, 0.1, seed=3))
    assert not np.array_equal(stratified_subset(targets, 0.1, seed=3), stratified_subset(targets, 0.1, seed=4))


def test_subsets_are_nested_across_fractions(full):
    targets = full.datasets["train"].targets
    subsets = [set(stratified_subset(targets, f, seed=1)) for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)]
    for smaller, larger in itertools.pairwise(subsets):
        assert smaller < larger
    assert subsets[-1] == set(range(len(targets)))


def test_every_class_keeps_at_least_one_image():
    targets = np.array([0] * 500 + [1] * 3 + [2])
    rows = stratified_subset(targets, 0.001, seed=0)
    assert sorted(targets[rows].tolist()) == [0, 1, 2]


def test_multilabel_rows_are_stratified_by_first_positive_label():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 4)) < [0.5, 0.2, 0.1, 0.05]).astype(np.float32)
    rows = stratified_subset(targets, 0.25, seed=0)
    first = np.where(targets.any(1), targets.argmax(1), -1)
    for stratum in np.unique(first):
        assert (first[rows] == stratum).sum() == math.ceil(0.25 * (first == stratum).sum())


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(pneumonia_npz, fraction):
    with pytest.raises(DataError, match=r"train_fraction.*\(0, 1\]"):
        MedMNISTDataModule(path=str(pneumonia_npz), train_fraction=fraction)


def test_min_epoch_samples_cycles_a_small_training_set(pneumonia_npz):
    part = _module(pneumonia_npz, train_fraction=0.01, min_epoch_samples=256, batch_size=64)
    assert len(part.datasets["train"]) < 64
    loader = part.train_dataloader()
    assert len(loader) == 4  # 256 draws in batches of 64
    assert sum(len(y) for _, y in loader) == 256
    draws = np.bincount(list(loader.sampler), minlength=len(part.datasets["train"]))
    n = len(part.datasets["train"])
    assert set(draws.tolist()) <= {256 // n, 256 // n + 1}  # fresh permutations: every image, evenly
