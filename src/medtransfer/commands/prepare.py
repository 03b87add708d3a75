"""``medtransfer prepare``: decode, crop and resize every split of a fit config's data once, for streaming.

    medtransfer prepare --config configs/chexnet_densenet121.yaml --data.prepared /shared/chestxray14-224
    medtransfer fit --config configs/chexnet_densenet121.yaml --data.prepared /shared/chestxray14-224

The command takes exactly the options of ``fit`` (the same config files), so the prepared images have the size
and interpolation that training resolves from the same data module and backbone; ``data.prepared`` names the
output folder or object-store URI and ``data.num_workers`` the decoding processes. Interrupted, it continues
with the splits not yet complete; after the source changed (other images, labels, splits or boxes) it prepares
afresh. See :mod:`medtransfer.data.prepared`.
"""

from __future__ import annotations

import logging
import sys
import warnings

from medtransfer.errors import DataError, exit_on_user_error

__all__ = ["main"]

_logger = logging.getLogger(__name__)


def main(args: list[str] | None = None) -> None:
    """Parse ``args`` as ``fit`` would (without loading weights or logging) and prepare ``data.prepared``."""
    argv = sys.argv[1:] if args is None else list(args)
    with exit_on_user_error():
        from medtransfer.commands.fit import build_cli
        from medtransfer.data.images import ImageDataModule
        from medtransfer.data.prepared import prepare

        # the weights do not change the input settings; no MLflow run is made for preparing
        with warnings.catch_warnings():  # the options come from the command line, through `args` on purpose
            warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
            cli = build_cli([*argv, "--model.pretrained=none", "--trainer.logger=false"], run=False)
        datamodule = cli.datamodule
        if not isinstance(datamodule, ImageDataModule) or datamodule.source is None:
            raise DataError("medtransfer prepare needs an ImageDataModule with a `source` (image files on disk)")
        if datamodule.hparams.prepared is None:
            raise DataError("medtransfer prepare: set --data.prepared to the output folder or URI")
        spec = datamodule.resolve_input_spec()  # as a fit resolves it: the data's options, else the model's
        size, interpolation = spec.size, spec.interpolation
        info = prepare(
            datamodule, datamodule.hparams.prepared, size, interpolation, num_workers=datamodule.hparams.num_workers
        )
        counts = ", ".join(f"{split} {entry['count']}" for split, entry in info.splits.items())
        print(f"Prepared {datamodule.hparams.prepared}: {counts} images at {size}px ({interpolation})", flush=True)


if __name__ == "__main__":
    main()
