"""The light commands print their options without importing the heavy libraries (speed itself is measured in
``bench/startup.py``): a fresh process runs ``medtransfer <command> --help`` and lists what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = {"torch", "lightning", "timm", "torchmetrics", "albumentations", "mlflow", "optuna", "captum", "sklearn",
         "matplotlib", "scipy", "litdata", "pydicom"}  # fmt: skip
#: The commands whose options are all plain types (no data module or Lightning class to describe).
LIGHT = ("predict", "evaluate", "compare", "prepare", "search", "learning-curve", "lr-find", "explain-eval")


def _help_imports(command: str) -> tuple[str, set[str]]:
    """The help text and the top-level modules imported by ``medtransfer <command> --help`` in a fresh process."""
    code = (
        "import contextlib, io, json, sys\nfrom medtransfer.entry import main\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    main(sys.argv[1:])\n"
        "print(json.dumps([out.getvalue(), sorted({m.split('.')[0] for m in sys.modules})]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, command, "--help"], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip
    text, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return text, set(modules)


@pytest.mark.parametrize("command", LIGHT)
def test_help_imports_no_heavy_library(command):
    text, modules = _help_imports(command)
    assert f"usage: medtransfer {command}" in text
    assert modules & HEAVY == set()


def test_predict_help_lists_the_heatmap_methods_without_torch():
    text, modules = _help_imports("predict")
    assert "occlusion" in text and "--explain_method" in text
    assert not modules & {"torch", "timm", "mlflow", "albumentations", "captum"}
