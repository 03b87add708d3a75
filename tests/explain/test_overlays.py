"""The overlays drawn for people: a heatmap blended over the image, its peak marked, written as a PNG."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.explain import overlay, save_overlay


@pytest.mark.parametrize("image", [np.full((50, 70), 100, np.uint8), np.full((50, 70, 3), 100, np.uint8)])
def test_overlay_colours_the_hot_region_and_leaves_the_cold_one_as_it_was(image):
    heatmap = torch.zeros(8, 8)
    heatmap[:4, :4] = 1.0  # hot top-left quarter
    blended = overlay(image, heatmap, alpha=0.5, mark_peak=False)
    assert blended.shape == (50, 70, 3) and blended.dtype == np.uint8
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    top = np.asarray(matplotlib.colormaps["inferno"](1.0)[:3]) * 255  # perceptually uniform: pale yellow
    np.testing.assert_allclose(blended[5, 5], 0.5 * rgb[5, 5] + 0.5 * top, atol=1)
    np.testing.assert_array_equal(blended[45, 65], rgb[45, 65])  # opacity follows the value: 0 where cold
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.0), rgb)


def test_overlay_marks_the_peak():
    image, heatmap = np.full((40, 40), 100, np.uint8), torch.zeros(40, 40)
    heatmap[30, 10] = 1.0
    marked, plain = overlay(image, heatmap), overlay(image, heatmap, mark_peak=False)
    assert tuple(marked[30, 10]) == (0, 255, 255) and tuple(marked[30, 12]) == (0, 255, 255)  # a cyan cross
    different = np.argwhere((marked != plain).any(axis=2))
    assert different.min(axis=0).tolist() >= [26, 6] and different.max(axis=0).tolist() <= [34, 14]


def test_overlay_rejects_images_that_are_not_uint8():
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((4, 4), np.float32), np.zeros((2, 2)))


def test_save_overlay_writes_a_png_and_nothing_else(tmp_path):
    path = save_overlay(tmp_path / "heatmaps" / "case1.png", np.zeros((40, 30), np.uint8), np.ones((2, 2)))
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (30, 40) and written.mode == "RGB"
    assert [p.name for p in path.parent.iterdir()] == ["case1.png"]
