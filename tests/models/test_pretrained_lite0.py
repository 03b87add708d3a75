"""The packaged EfficientNet-Lite0 checkpoint maps onto timm and is really ImageNet-trained."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from skimage import data

from medtransfer.errors import WeightsError
from medtransfer.models.backbones import create_backbone
from medtransfer.models.pretrained_lite0 import load_lite0_package_state_dict, map_state_dict_by_order

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_state_dict():
    return load_lite0_package_state_dict()


def test_every_tensor_maps_onto_timm_lite0(lite0_state_dict):
    model = timm.create_model("tf_efficientnet_lite0")
    assert list(lite0_state_dict) == list(model.state_dict())
    model.load_state_dict(lite0_state_dict, strict=True)


def test_mapped_model_recognises_a_cat_photo(lite0_state_dict):
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(lite0_state_dict)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probs = model(transform(Image.fromarray(data.chelsea())).unsqueeze(0)).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in IMAGENET_CATS
    assert probs[sorted(IMAGENET_CATS)].sum() > 0.8


def test_random_init_does_not_recognise_the_cat():
    """Control: the cat check can fail, so passing it says something about the weights."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0").eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probs = model(transform(Image.fromarray(data.chelsea())).unsqueeze(0)).softmax(-1)[0]
    assert probs[sorted(IMAGENET_CATS)].sum() < 0.1


def test_mapping_onto_another_architecture_fails_naming_the_tensor(lite0_state_dict):
    target = timm.create_model("tf_efficientnet_b0").state_dict()
    with pytest.raises(WeightsError, match=r"tensors|tensor #\d+ '.+' has shape"):
        map_state_dict_by_order(lite0_state_dict, target)


def test_shape_mismatch_reports_index_keys_and_shapes():
    source = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    target = {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(3)}
    with pytest.raises(
        WeightsError, match=r"tensor #1 'a.bias' has shape \(2,\) but the model's 'x.bias' has shape \(3,\)"
    ):
        map_state_dict_by_order(source, target)


def test_lite0_package_weights_refuse_other_backbones():
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        create_backbone("resnet18", pretrained="lite0-package")


def test_backbone_gets_imagenet_features_and_grayscale_stem(lite0_state_dict):
    rgb = create_backbone("tf_efficientnet_lite0", pretrained="lite0-package")
    assert torch.equal(rgb.conv_stem.weight, lite0_state_dict["conv_stem.weight"])
    assert rgb.num_classes == 0 and not any(
        "classifier" in k for k in rgb.state_dict() if rgb.state_dict()[k].numel() > 0
    )
    gray = create_backbone("tf_efficientnet_lite0", pretrained="lite0-package", in_chans=1)
    assert gray.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(gray.conv_stem.weight, lite0_state_dict["conv_stem.weight"].sum(dim=1, keepdim=True))
