"""The input contract between a model and its data: what an image must look like when it reaches the network.

The model builds it from its backbone's timm data config, LightningCLI links it to the data module, which resolves
its own options over it, and the checkpoint keeps the resolved one (``checkpoint["input"]``) for test and predict.
It lives with the data so that ``models`` imports ``data`` and never the reverse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """Size, normalisation, channels, colour and DICOM frame of the images a model takes.

    Args:
        size: side length in pixels fed to the network.
        mean: per-channel mean in [0, 1] subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation in [0, 1].
        interpolation: resize filter (``bilinear``, ``bicubic``, ``area``, ...).
        channels: 3 (gray replicated, or colour) or 1.
        color: ``gray`` or ``rgb``: what training fed (checkpoints from before colour support: gray).
        dicom_frame: which frame of a multi-frame DICOM was read (``first``, ``middle``, ``error``).
        reference: statistics of the validation images (:mod:`medtransfer.data.unlike`), for predict's
            unlike-training check; ``None`` when not recorded.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    channels: int = 3
    color: Literal["gray", "rgb"] = "gray"
    dicom_frame: str = "middle"
    reference: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        # one canonical form, whether built from timm (tuples), YAML (lists) or a checkpoint (lists)
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "channels", int(self.channels))

    @classmethod
    def from_timm(cls, config: dict[str, Any], channels: int = 3) -> InputSpec:
        """From a timm data config (``resolve_model_data_config``): ``input_size``, ``mean``, ``std``,
        ``interpolation``."""
        return cls(int(config["input_size"][-1]), config["mean"], config["std"],
                   config.get("interpolation") or "bilinear", channels)  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputSpec:
        """From :meth:`to_dict`'s form, as checkpoints and MLflow models keep it. Keys it does not know are
        ignored; those missing take the defaults that held when they were added (``color: gray``, ...)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        """Plain values by name (lists, no tuples), for the checkpoint and MLflow metadata; no ``reference`` key
        when none was recorded."""
        values = asdict(self) | {"mean": list(self.mean), "std": list(self.std)}
        if self.reference is None:
            del values["reference"]
        return values
