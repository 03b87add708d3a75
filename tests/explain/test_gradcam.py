"""Grad-CAM on the backbone's last feature map (``grad_cam``, kept for its API) and the overlays drawn for people.

Where the maps point is specified in test_methods.py: at the default 64 px, Grad-CAM's last stage has 2x2 cells,
so the lesion tests hold the default method (a multi-stage fusion) to the lesion's box instead.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as nnf

from medtransfer.errors import MedtransferError
from medtransfer.explain import grad_cam, overlay, save_overlay
from medtransfer.models.classifier import ClassifierModule


def _small(task: str = "binary", num_classes: int = 2) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(backbone="test_efficientnet", pretrained="none", task=task, num_classes=num_classes)


def test_heatmaps_have_the_input_size_and_unit_range():
    heatmaps = grad_cam(_small().eval(), torch.randn(3, 3, 64, 48))
    assert heatmaps.shape == (3, 64, 48) and heatmaps.dtype == torch.float32
    assert bool(((heatmaps >= 0) & (heatmaps <= 1)).all())
    for heatmap in heatmaps:  # each map is scaled to a maximum of 1, or all zero without positive evidence
        assert float(heatmap.max()) in (0.0, pytest.approx(1.0))


def test_leaves_no_gradients_and_every_module_in_its_mode():
    model = _small().train()
    model.backbone.bn1.eval()  # as the finetuning callback keeps frozen BatchNorm
    for p in model.backbone.parameters():
        p.requires_grad = False  # a frozen backbone still gets heatmaps
    modes = {name: m.training for name, m in model.named_modules()}
    running_mean = model.backbone.bn1.running_mean.clone()
    grad_cam(model, torch.randn(2, 3, 64, 64))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model.backbone.bn1.running_mean, running_mean)  # evaluated in eval mode


def test_works_inside_inference_mode():
    model = _small().eval()
    with torch.inference_mode():
        images = torch.randn(2, 3, 64, 64)
        heatmaps = grad_cam(model, images)
    torch.testing.assert_close(heatmaps, grad_cam(model, images.clone()))


def _class_activation_map(model: ClassifierModule, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference: with global average pooling and a linear head, Grad-CAM is CAM (Zhou et al. 2016),
    ``relu(sum_c W[k, c] A_c)``, normalised to a maximum of 1."""
    with torch.no_grad():
        features = model.backbone.forward_features(images)
        weights = model.head[1].weight[index]  # (N, C)
        cam = torch.relu(torch.einsum("nc,nchw->nhw", weights, features))[:, None]
        cam = nnf.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)  # an all-zero map stays zero


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel_heads_explain_the_given_or_top_output(task):
    model, images = _small(task, num_classes=4).eval(), torch.randn(3, 3, 64, 64)
    index = torch.tensor([0, 3, 2])
    torch.testing.assert_close(grad_cam(model, images, target=index), _class_activation_map(model, images, index))
    with torch.no_grad():
        top = model(images).argmax(dim=1)
    torch.testing.assert_close(grad_cam(model, images), grad_cam(model, images, target=top))
    torch.testing.assert_close(grad_cam(model, images, target=1), grad_cam(model, images, target=[1, 1, 1]))
    with pytest.raises(ValueError, match=r"Expected argument `target` to be in \[0, 4\)"):
        grad_cam(model, images, target=4)
    with pytest.raises(ValueError, match="one per image"):
        grad_cam(model, images, target=[1, 2])


def test_binary_head_explains_the_positive_logit():
    model, images = _small().eval(), torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(grad_cam(model, images), _class_activation_map(model, images, torch.tensor([0, 0])))
    with pytest.raises(ValueError, match="Expected argument `target` to be None or 1"):
        grad_cam(model, images, target=0)


def test_token_backbone_is_refused_with_its_shape():
    model = ClassifierModule(backbone="test_vit", pretrained="none").eval()
    with pytest.raises(MedtransferError, match=r"convolutional backbone .* shape \(1, 17, 64\)"):
        grad_cam(model, torch.randn(1, 3, 64, 64))


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
