"""The light commands print their options without importing the heavy libraries (speed itself is measured in
``bench/startup.py``): a fresh process runs ``medtransfer <command> --help`` and lists what it imported."""

from __future__ import annotations

import pytest
from helpers import HEAVY, help_in_fresh_process

#: The commands whose options are all plain types (no data module or Lightning class to describe).
LIGHT = ("predict", "evaluate", "compare", "prepare", "search", "learning-curve", "lr-find", "explain-eval")


@pytest.mark.parametrize("command", LIGHT)
def test_help_imports_no_heavy_library(command):
    text, modules = help_in_fresh_process(command)
    assert f"usage: medtransfer {command}" in text
    assert modules & HEAVY == set()


def test_predict_help_lists_the_heatmap_methods_without_torch():
    text, modules = help_in_fresh_process("predict")
    assert "occlusion" in text and "--explain_method" in text
    assert not modules & {"torch", "timm", "mlflow", "albumentations", "captum"}
