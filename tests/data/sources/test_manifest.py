"""The Manifest: shapes, splits and immutability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medtransfer.data.sources import Manifest


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
