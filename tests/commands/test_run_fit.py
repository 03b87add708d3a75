"""``run_fit``: one fit from Python with typed values and callback objects, no argv strings or stdout parsing
(what ``search`` and ``learning-curve`` call)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import DEFAULT_CONFIG, tiny_fit_args
from lightning.pytorch import Callback
from mlflow.tracking import MlflowClient

from medtransfer.commands.run_fit import resolve_fit_config, run_fit

SMALL = tiny_fit_args()


def test_resolve_fit_config_stacks_files_mappings_fit_args_then_typed_overrides(workdir):
    lr = "model.optimizer.init_args.lr"
    text = resolve_fit_config(
        [DEFAULT_CONFIG, {"mlflow_model.enabled": False, "trainer.max_epochs": 7}],
        {lr: 0.25},
        fit_args=["--trainer.max_epochs=3", "--model.optimizer.init_args.lr=0.5"],
    )
    config = yaml.safe_load(text)
    assert config["mlflow_model"]["enabled"] is False  # the mapping layer, over the file's default
    assert config["trainer"]["max_epochs"] == 3  # fit_args over the mapping
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.25  # typed overrides last
    assert config["test_after_fit"] is True  # the file's, untouched


def test_run_fit_takes_typed_values_and_callback_objects_and_returns_the_run(workdir, pneumonia_npz):
    class Seen(Callback):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.epochs.append(trainer.current_epoch)

    seen = Seen()
    result = run_fit(
        DEFAULT_CONFIG,
        {"model.optimizer.init_args.lr": 0.002, "data.path": str(pneumonia_npz)},
        fit_args=SMALL,
        callbacks=[seen],
        run_name="typed-fit",
        tags={"origin": "python"},
        test_after_fit=False,
    )
    assert seen.epochs == [0, 1] and not result.interrupted
    run = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db").get_run(result.run_id)
    assert run.info.run_name == "typed-fit" and run.data.tags["origin"] == "python"
    assert float(run.data.params["model.optimizer.lr"]) == 0.002
    assert result.metrics["val/auroc"] == pytest.approx(run.data.metrics["val/auroc"])
    assert "test/auroc" not in run.data.metrics
    assert Path(result.best_model_path).is_file()
