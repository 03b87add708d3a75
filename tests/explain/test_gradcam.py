"""Grad-CAM: the heatmap of a trained classifier peaks on a lesion the test planted, and follows it.

The lesion test trains a real ``ClassifierModule`` (timm's tiny ``test_byobnet``, from scratch, a few dozen Adam
steps) to tell real PneumoniaMNIST normal X-rays with a bright blob planted at a random place from those without.
Images are 128 px, so the stride-32 backbone gives a 4x4 feature map of 32 px cells: the peak may lie up to half a
cell outside the blob's region (radius 16 px). By chance a peak would land that close in about 20 % of cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as nnf
from torch.optim.swa_utils import update_bn

from medtransfer.errors import MedtransferError
from medtransfer.explain import grad_cam, overlay, save_overlay
from medtransfer.models.classifier import ClassifierModule

SIZE = 128  # px; the feature map is SIZE / 32 = 4 cells a side
SIGMA = 8.0  # px; the planted blob's Gaussian width; its region is the disc of radius 2 * SIGMA
MARGIN = 16.0  # px; half a feature-map cell: how far off a peak on the coarse map can be


def _backgrounds(npz_path, split: str) -> torch.Tensor:
    """Real normal (label 0) chest X-rays of one split, upsampled to SIZE, in [0, 1]."""
    data = np.load(npz_path)
    normal = data[f"{split}_images"][data[f"{split}_labels"][:, 0] == 0]
    images = torch.as_tensor(normal, dtype=torch.float32)[:, None] / 255
    return nnf.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _plant(images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Add a bright Gaussian blob (the lesion) at each ``(y, x)`` centre."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cy, cx = centres[:, 0, None, None], centres[:, 1, None, None]
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * SIGMA**2))
    return (images + 0.8 * blob[:, None]).clamp(0, 1)


def _centres(n: int, generator: torch.Generator) -> torch.Tensor:
    return 2 * SIGMA + torch.rand(n, 2, generator=generator) * (SIZE - 4 * SIGMA)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25


def _peaks(heatmaps: torch.Tensor) -> torch.Tensor:
    """``(y, x)`` of each heatmap's maximum: the middle of its argmax pixels, as the bilinear upsampling of an
    edge cell is flat out to the border (a plain ``argmax`` would pick that plateau's first pixel)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    top = (heatmaps >= heatmaps.amax(dim=(1, 2), keepdim=True) - 1e-6).float()
    count = top.sum(dim=(1, 2))
    return torch.stack([(top * yy).sum(dim=(1, 2)) / count, (top * xx).sum(dim=(1, 2)) / count], dim=1)


def _train_lesion_model(npz_path, seed: int = 0) -> ClassifierModule:
    """A binary classifier trained, from scratch, to detect the planted blob on real normal X-rays."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = _backgrounds(npz_path, "train")
    model = ClassifierModule(
        backbone="test_byobnet", pretrained="none", in_chans=1, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)
    )
    optimizer = model.configure_optimizers()

    def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        images = train[torch.randint(len(train), (n,), generator=generator)]
        images[: n // 2] = _plant(images[: n // 2], _centres(n // 2, generator))
        return _normalise(images), (torch.arange(n) < n // 2).long()

    model.train()
    for _ in range(40):
        loss, _, _ = model.model_step(batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    update_bn([batch(64)[0] for _ in range(3)], model)  # running statistics for the final weights
    return model.eval()


@pytest.fixture(scope="module")
def lesion_model(pneumonia_npz):
    """The trained lesion detector and held-out (test split) normal X-rays to plant new lesions on."""
    return _train_lesion_model(pneumonia_npz), _backgrounds(pneumonia_npz, "test")


def test_heatmap_peaks_on_the_planted_lesion(lesion_model):
    model, backgrounds = lesion_model
    generator = torch.Generator().manual_seed(1)
    centres = _centres(40, generator)
    images = _normalise(_plant(backgrounds[:40], centres))
    with torch.no_grad():
        assert (model(images) > 0).float().mean() >= 0.8  # the model does detect the lesions
    distance = (_peaks(grad_cam(model, images)) - centres).norm(dim=1)
    assert (distance <= 2 * SIGMA + MARGIN).float().mean() >= 0.8, distance


def test_heatmap_follows_the_lesion_when_it_moves(lesion_model):
    model, backgrounds = lesion_model
    top_left, bottom_right = torch.tensor([[28.0, 28.0]]), torch.tensor([[100.0, 100.0]])
    background = backgrounds[40:48]
    images = torch.cat([_plant(background, top_left.expand(8, 2)), _plant(background, bottom_right.expand(8, 2))])
    peaks = _peaks(grad_cam(model, _normalise(images)))
    near_top_left = (peaks[:8] - top_left).norm(dim=1) <= 2 * SIGMA + MARGIN
    near_bottom_right = (peaks[8:] - bottom_right).norm(dim=1) <= 2 * SIGMA + MARGIN
    assert near_top_left.float().mean() >= 0.75 and near_bottom_right.float().mean() >= 0.75, peaks


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
def test_overlay_colours_the_hot_region_of_an_image_of_any_size(image):
    heatmap = torch.zeros(8, 8)
    heatmap[:4, :4] = 1.0  # hot top-left quarter
    blended = overlay(image, heatmap, alpha=0.5)
    assert blended.shape == (50, 70, 3) and blended.dtype == np.uint8
    hot, cold = blended[5, 5], blended[45, 65]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where hot, blue where cold
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.0), rgb)


def test_overlay_rejects_images_that_are_not_uint8():
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((4, 4), np.float32), np.zeros((2, 2)))


def test_save_overlay_writes_a_png_and_nothing_else(tmp_path):
    path = save_overlay(tmp_path / "heatmaps" / "case1.png", np.zeros((40, 30), np.uint8), np.ones((2, 2)))
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (30, 40) and written.mode == "RGB"
    assert [p.name for p in path.parent.iterdir()] == ["case1.png"]
