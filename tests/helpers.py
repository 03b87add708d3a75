"""Small builders shared by tests: a tiny two-class image task that a real timm backbone can fit, the default
config shrunk to a seconds-long CLI fit, and a command's ``--help`` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
#: The shipped default: ImageNet EfficientNet-Lite0 (offline weights) on PneumoniaMNIST.
DEFAULT_CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
#: The installed ``medtransfer`` console script, for tests that need a process of their own (DDP, kills).
CONSOLE_SCRIPT = Path(sys.executable).with_name("medtransfer")
#: Libraries that take seconds to import: a ``--help`` that imports none of them is instant.
HEAVY = {"torch", "lightning", "timm", "torchmetrics", "albumentations", "mlflow", "optuna", "captum", "sklearn",
         "matplotlib", "scipy", "litdata", "pydicom"}  # fmt: skip


def help_in_fresh_process(command: str, env: dict[str, str] | None = None) -> tuple[str, set[str]]:
    """What ``medtransfer <command> --help`` prints in a fresh process run as the console script (``sys.argv[0]``
    ``medtransfer``) with ``env`` added to the environment, and the top-level modules that process imported."""
    code = (
        "import contextlib, io, json, sys\nsys.argv[0] = 'medtransfer'\nfrom medtransfer.entry import main\n"
        "out = io.StringIO()\nwith contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(sys.argv[1:])\nprint(json.dumps([out.getvalue(), sorted({m.split('.')[0] for m in sys.modules})]))"
    )
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code, command, "--help"], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip
    text, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return text, set(modules)


def fit_in(folder: Path, args: list[str]) -> Any:
    """``medtransfer fit`` (LightningCLI) run in ``folder`` with a store of its own there, as from a fresh shell:
    no ``MLFLOW_TRACKING_URI``, a bare ``sys.argv``; the working folder and environment restored after."""
    import pytest

    from medtransfer.commands.fit import build_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("sys.argv", ["medtransfer"])
        return build_cli(args)


def tiny_fit_args(train_batches: int = 4, val_batches: int = 4, test_batches: int = 3) -> list[str]:
    """Options that shrink the default config to a seconds-long fit: 32 px, two epochs (head only, then
    fine-tuning) of a few batches, no progress bar."""
    return [
        "--trainer.max_epochs=2",
        f"--trainer.limit_train_batches={train_batches}",
        f"--trainer.limit_val_batches={val_batches}",
        f"--trainer.limit_test_batches={test_batches}",
        "--trainer.enable_progress_bar=false",
        "--finetuning.unfreeze_at_epoch=1",
        "--data.image_size=32",
    ]


def tiny_loaders(
    n: int = 32, size: int = 32, batch_size: int = 8, seed: int = 0, signal: float = 1.0
) -> tuple[DataLoader, DataLoader]:
    """Train/val loaders of noise images whose class is a brighter centre; both classes in each split."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, size, size, generator=generator)
    images[:, :, size // 4 : -size // 4, size // 4 : -size // 4] += signal * labels.view(-1, 1, 1, 1).float()
    dataset = TensorDataset(images, labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)


#: The unprivileged user that permission tests read as when they run as root (where ``chmod`` binds nothing).
NOBODY = 65534


def read_image_unprivileged(path: Path) -> tuple[str, str]:
    """``read_image(path)`` with the permissions of an ordinary user: ``("ok", shape)`` or ``(error type, message)``.

    Run as root, the read happens in a forked child that first drops to uid/gid ``NOBODY`` (no supplementary
    groups), so ``chmod`` binds as it does for users; forking, not executing, keeps the imported ``medtransfer``
    and needs no interpreter that ``NOBODY`` may run. Not as root, it reads in this process: permissions bind.
    """
    import os

    from medtransfer.data.readers import read_image

    def outcome() -> tuple[str, str]:
        try:
            return "ok", str(read_image(path).shape)
        except Exception as err:  # reported to the test, which asserts which one
            return type(err).__name__, str(err)

    if os.geteuid() != 0:
        return outcome()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, read, report, and leave without running any of pytest's cleanup
        status = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            kind, message = outcome() if os.geteuid() == NOBODY else ("StillRoot", "")
            os.write(writer, f"{kind}\n{message}".encode("utf-8", "backslashreplace"))
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as handle:
        data = handle.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the unprivileged reader failed: {data!r}"
    kind, _, message = data.partition("\n")
    return kind, message


def world_readable_dir(prefix: str) -> Path:
    """A new folder under /tmp that ``NOBODY`` can reach (pytest's own ``tmp_path`` sits under a 0700 folder)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder
