"""Every shipped config parses, names a real timm backbone, and resolves to the documented schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

from medtransfer.entry import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_default_and_three_hub_configs_ship():
    names = {c.stem for c in CONFIGS}
    assert {
        "pneumonia_effnet_lite0",
        "pneumonia_densenet121",
        "pneumonia_resnet50",
        "pneumonia_efficientnet_b0",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_resolves_through_the_cli(config, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert timm.is_model(resolved["model"]["backbone"])
    if config.stem == "pneumonia_effnet_lite0":  # make fit: the searched recipe, confirmed by bench/recipes.py
        wanted = {"finetune_lr": 5.3e-4, "head_finetune_lr": 4.4e-4, "lr_decay": 0.91, "schedule": "cosine"}
        assert {k: resolved["finetuning"][k] for k in wanted} == wanted
        assert resolved["model"]["drop_rate"] == pytest.approx(0.41)
    else:  # the CheXNet-style two-phase recipe's phase 2 (1e-5)
        assert resolved["finetuning"]["finetune_lr"] == pytest.approx(1e-5)
    assert resolved["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(1e-3)
    assert resolved["checkpoint"]["monitor"] == "val/auroc" and resolved["checkpoint"]["mode"] == "max"
    assert resolved["test_after_fit"] is True


ROOT = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "learning_curve").glob("*.yaml")])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda c: f"{c.parent.name}/{c.stem}")
def test_every_recipe_stacks_on_the_default_config(recipe, capsys, monkeypatch):
    """Fine-tuning recipes and learning-curve recipes alike: what the file sets is what the fit gets."""
    monkeypatch.setattr("sys.argv", ["medtransfer"])
    default = ROOT / "pneumonia_effnet_lite0.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={default}", f"--config={recipe}", "--print_config"])
    assert exit_info.value.code == 0
    resolved, wanted = yaml.safe_load(capsys.readouterr().out), yaml.safe_load(recipe.read_text())
    assert {k: resolved["finetuning"][k] for k in wanted.get("finetuning", {})} == wanted.get("finetuning", {})
    assert {k: resolved["model"][k] for k in wanted.get("model", {})} == wanted.get("model", {})
    callbacks = [c["class_path"] for c in (resolved["trainer"]["callbacks"] or [])]
    assert callbacks == [c["class_path"] for c in wanted.get("trainer", {}).get("callbacks", [])]
