"""The input spec of a timm backbone (:class:`~medtransfer.data.input_spec.InputSpec`, re-exported here for the
code that imports it from its old home)."""

from __future__ import annotations

import timm

from medtransfer.data.input_spec import InputSpec

__all__ = ["InputSpec", "backbone_input_spec"]


def backbone_input_spec(backbone: str, in_chans: int = 3) -> InputSpec:
    """The input spec of a timm backbone by name, from its pretrained config, without building the network:
    what ``ClassifierModule(backbone=..., in_chans=...).input_spec`` holds. LightningCLI links it to the data
    module when arguments are parsed (see ``medtransfer.commands.fit``)."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    config = timm.data.resolve_data_config({"in_chans": in_chans}, pretrained_cfg=cfg.to_dict() if cfg else None)
    return InputSpec.from_timm(config, in_chans)
