"""``medtransfer prepare``: decode, crop and resize every split of a fit config's data once, for streaming.

    medtransfer prepare --config configs/chexnet_densenet121.yaml --data.prepared /shared/chestxray14-224
    medtransfer fit --config configs/chexnet_densenet121.yaml --data.prepared /shared/chestxray14-224

It takes ``fit``'s options, so the images get the size and interpolation training resolves; ``data.prepared`` is
the output folder or URI. Interrupted, it continues; after the source changed, it prepares afresh
(:mod:`medtransfer.data.prepared`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from medtransfer.errors import DataError

__all__ = ["PrepareResult", "run_prepare"]


@dataclass(frozen=True)
class PrepareResult:
    """Where the prepared splits are, how many images each holds, and the size they were resized to."""

    prepared: str
    counts: dict[str, int]
    size: int
    interpolation: str


def run_prepare(fit_args: Sequence[str] = ()) -> PrepareResult:
    """Decode, crop and resize every split of a fit config's data once into ``--data.prepared`` (LitData).

    Args:
        fit_args: ``fit``'s options as on its command line (``--config``, ``--data.prepared``, ...).
    """
    from medtransfer.commands.fit import build_cli
    from medtransfer.data.images import ImageDataModule
    from medtransfer.data.prepared import prepare

    # the weights do not change the input settings; no MLflow run is made for preparing
    with warnings.catch_warnings():  # the options come from the command line, through `args` on purpose
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
        cli = build_cli([*fit_args, "--model.pretrained=none", "--trainer.logger=false"], run=False)
    datamodule = cli.datamodule
    if not isinstance(datamodule, ImageDataModule) or datamodule.source is None:
        raise DataError("medtransfer prepare needs an ImageDataModule with a `source` (image files on disk)")
    if datamodule.hparams.prepared is None:
        raise DataError("medtransfer prepare: set --data.prepared to the output folder or URI")
    spec = datamodule.resolve_input_spec()  # as a fit resolves it: the data's options, else the model's
    info = prepare(datamodule, datamodule.hparams.prepared, spec.size, spec.interpolation,
                   num_workers=datamodule.hparams.num_workers)  # fmt: skip
    result = PrepareResult(datamodule.hparams.prepared, {split: entry["count"] for split, entry in info.splits.items()},
                           spec.size, spec.interpolation)  # fmt: skip
    counts = ", ".join(f"{split} {count}" for split, count in result.counts.items())
    print(f"Prepared {result.prepared}: {counts} images at {result.size}px ({result.interpolation})", flush=True)
    return result
