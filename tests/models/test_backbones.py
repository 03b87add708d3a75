"""create_backbone: timm names, weight sources and the errors users see."""

from __future__ import annotations

import pytest
import timm
import torch

from medtransfer.errors import BackboneError, WeightsError
from medtransfer.models.backbones import backbone_blocks, create_backbone


def test_unknown_backbone_names_it_and_suggests_close_names():
    with pytest.raises(BackboneError, match=r"Unknown backbone 'densenet12'.*'densenet121'"):
        create_backbone("densenet12", pretrained="none")


def test_random_backbone_returns_pooled_features():
    backbone = create_backbone("resnet18", pretrained="none")
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.num_features)


def test_local_checkpoint_file_loads_through_timm(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet18", pretrained=str(path))
    assert torch.equal(backbone.conv1.weight, source.conv1.weight)
    assert backbone.num_classes == 0


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit backbone 'resnet34'"):
        create_backbone("resnet34", pretrained=str(path))


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"'.*missing.pth' is neither one of none, hub, lite0-package"):
        create_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "densenet121", "resnet50", "efficientnet_b0"])
def test_blocks_cover_every_parameter_in_input_to_output_order(name):
    backbone = create_backbone(name, pretrained="none")
    blocks = backbone_blocks(backbone)
    in_blocks = [p for block in blocks for m in block for p in m.parameters(recurse=False)]
    assert len(in_blocks) == len(list(backbone.parameters()))
    assert len({id(p) for p in in_blocks}) == len(in_blocks)
    stem = {id(p) for m in blocks[0] for p in m.parameters(recurse=False)}
    first = next(iter(backbone.parameters()))
    assert id(first) in stem


def test_file_that_is_not_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(WeightsError, match=r"Cannot read weights from .*notes\.pth"):
        create_backbone("resnet18", pretrained=str(path))
