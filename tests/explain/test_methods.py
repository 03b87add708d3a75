"""Heatmaps that point at the finding at 64 px: the default method's peak lies inside a planted lesion's box.

A real ``ClassifierModule`` with the default backbone (ImageNet EfficientNet-Lite0, offline weights) is fine-tuned
for a few dozen Adam steps to tell real PneumoniaMNIST normal X-rays (upsampled to 64 px, the default size) with
a bright blob planted at a random place from those without. The blob's box (+-2 sigma, 10x10 px) covers 2.6 % of
the image: a random point lands in it 2.6 % of the time, and Grad-CAM on the last stage (2x2 cells) could not
do better than 25 %. The pointing game counts a hit only when the peak is inside the box itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as nnf
from torch.optim.swa_utils import update_bn

from medtransfer.errors import MedtransferError
from medtransfer.explain import DEFAULT_METHOD, METHODS, box_iou, explain, map_box, map_peak, pointing_hit
from medtransfer.explain.methods import resolve_layer
from medtransfer.models.classifier import ClassifierModule

SIZE = 64  # px, the default config's input size
SIGMA = 0.04 * SIZE  # px; the blob's Gaussian width; its box is +-2 sigma
MEAN, STD = 0.449, 0.226  # ImageNet's, averaged over RGB


def _backgrounds(npz_path, split: str) -> torch.Tensor:
    """Real normal (label 0) chest X-rays of one split, upsampled to SIZE, in [0, 1]."""
    data = np.load(npz_path)
    normal = data[f"{split}_images"][data[f"{split}_labels"][:, 0] == 0]
    images = torch.as_tensor(normal, dtype=torch.float32)[:, None] / 255
    return nnf.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _plant(images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Add a bright Gaussian blob (the lesion) at each ``(x, y)`` centre (pixel coordinates, edges at 0..SIZE)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    cx, cy = centres[:, 0, None, None], centres[:, 1, None, None]
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * SIGMA**2))
    return (images + 0.5 * blob[:, None]).clamp(0, 1)


def _centres(n: int, generator: torch.Generator) -> torch.Tensor:
    return 2 * SIGMA + torch.rand(n, 2, generator=generator) * (SIZE - 4 * SIGMA)


def _boxes(centres: torch.Tensor) -> np.ndarray:
    return torch.cat([centres - 2 * SIGMA, centres + 2 * SIGMA], dim=1).numpy()


def _input(images: torch.Tensor) -> torch.Tensor:
    return ((images - MEAN) / STD).expand(-1, 3, -1, -1)


@pytest.fixture(scope="module")
def lesion_model(pneumonia_npz):
    """Pretrained Lite0 fine-tuned (head and backbone, 60 steps of 32) to detect the planted blob, in eval mode,
    and held-out (test split) normal X-rays to plant new lesions on."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train = _backgrounds(pneumonia_npz, "train")
    model = ClassifierModule(
        backbone="tf_efficientnet_lite0",
        pretrained="lite0-package",
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    optimizer = model.configure_optimizers()

    def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        images = train[torch.randint(len(train), (n,), generator=generator)]
        images[: n // 2] = _plant(images[: n // 2], _centres(n // 2, generator))
        return _input(images), (torch.arange(n) < n // 2).long()

    model.train()
    for _ in range(60):
        loss, _, _ = model.model_step(batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    update_bn([batch(64)[0] for _ in range(3)], model)  # running statistics for the final weights
    return model.eval(), _backgrounds(pneumonia_npz, "test")


def test_default_method_points_inside_the_lesion_box_at_64px(lesion_model):
    model, backgrounds = lesion_model
    centres = _centres(60, torch.Generator().manual_seed(1))
    images = _input(_plant(backgrounds[:60], centres))
    with torch.no_grad():
        detected = model(images)[:, 0] > 0
    assert detected.float().mean() >= 0.8  # the model does detect the lesions
    maps = explain(model, images[detected])  # the default method, on the true positives
    hits = [pointing_hit(heat, box) for heat, box in zip(maps, _boxes(centres[detected]), strict=True)]
    assert np.mean(hits) >= 0.85, np.mean(hits)


def test_default_method_follows_the_lesion_when_it_moves(lesion_model):
    model, backgrounds = lesion_model
    top_left, bottom_right = torch.tensor([[14.0, 14.0]]), torch.tensor([[50.0, 50.0]])
    background = backgrounds[60:68]
    images = torch.cat([_plant(background, top_left.expand(8, 2)), _plant(background, bottom_right.expand(8, 2))])
    maps = explain(model, _input(images))
    boxes = _boxes(torch.cat([top_left.expand(8, 2), bottom_right.expand(8, 2)]))
    hits = np.array([pointing_hit(heat, box) for heat, box in zip(maps, boxes, strict=True)])
    assert hits[:8].mean() >= 0.75 and hits[8:].mean() >= 0.75, hits


def _small(task: str = "binary", num_classes: int = 2) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(backbone="test_efficientnet", pretrained="none", task=task, num_classes=num_classes)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_input_sized_maps_scaled_to_one_and_leaves_the_model_as_it_was(method):
    model = _small().train()
    for p in model.backbone.parameters():
        p.requires_grad = False  # a frozen backbone still gets heatmaps
    modes = {name: m.training for name, m in model.named_modules()}
    maps = explain(model, torch.randn(2, 3, 40, 48), method=method)
    assert maps.shape == (2, 40, 48) and maps.dtype == torch.float32
    for heat in maps:
        assert float(heat.min()) >= 0 and float(heat.max()) in (0.0, pytest.approx(1.0))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_the_default_method_is_a_multi_stage_fusion_finer_than_the_last_stage():
    model = _small().eval()
    assert DEFAULT_METHOD == "fusion"
    x = torch.randn(1, 3, 64, 64)
    last = explain(model, x, method="gradcam")  # 2x2 cells, upsampled
    fine = explain(model, x, method="layercam", layer=-3)  # stride 8: 8x8 cells
    assert len(torch.unique(nnf.avg_pool2d(last[:, None], 32))) <= 4
    assert len(torch.unique(nnf.avg_pool2d(fine[:, None], 8))) > 4


def test_layers_are_named_by_feature_info_index_or_module_name():
    backbone = _small().backbone
    stages = [entry["module"] for entry in backbone.feature_info]
    assert resolve_layer(backbone, -1)[0] == stages[-1] and resolve_layer(backbone, "1")[0] == stages[1]
    assert resolve_layer(backbone, "conv_stem")[0] == "conv_stem"
    with pytest.raises(MedtransferError, match=r"out of range: .* stages \(0: blocks\.0 \(stride 2\)"):
        resolve_layer(backbone, 9)
    with pytest.raises(MedtransferError, match=r"--explain_layer 'layer4': .* no such module; its stages: blocks"):
        resolve_layer(backbone, "layer4")


def test_multilabel_maps_explain_the_given_label():
    model, x = _small("multilabel", 4).eval(), torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(explain(model, x, target=[2, 2, 2]), explain(model, x, target=2))
    assert not torch.allclose(explain(model, x, target=0), explain(model, x, target=3))


def test_peak_box_and_pointing_game_on_a_known_map():
    heat = np.zeros((20, 30), np.float32)
    heat[5:9, 10:16] = 0.6  # a plateau: the peak is its centre
    heat[15, 2] = 0.2
    assert map_peak(heat) == (12.5, 6.5, pytest.approx(0.6))
    assert map_box(heat, 0.5) == (10.0, 5.0, 16.0, 9.0)  # pixel edges; the weak spot is below the threshold
    assert pointing_hit(heat, (10, 5, 16, 9)) and not pointing_hit(heat, (0, 0, 10, 20))
    assert not pointing_hit(np.zeros((4, 4)), (0, 0, 4, 4))  # an empty map points nowhere
    assert box_iou((10, 5, 16, 9), (10, 5, 16, 9)) == 1.0 and box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
